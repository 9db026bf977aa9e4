"""The gateway's access log, and the logging set-up behind ``trio-llm serve -v``.

Logger ``trio_llm.serve.access`` gets one INFO line per HTTP request:
``127.0.0.1 POST /v1/chat/completions 200 12.3ms`` (client address, method, path, status,
time until the app finished answering; a stream's time runs to its last event). Nothing
shows until logging is configured, e.g. by :func:`configure_logging`.
"""

from __future__ import annotations

import logging
import sys
from typing import Final, TextIO, final

import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ACCESS_LOGGER", "AccessLog", "configure_logging"]

ACCESS_LOGGER: Final = "trio_llm.serve.access"

access_logger = logging.getLogger(ACCESS_LOGGER)


def _printable(text: str) -> str:
    # The path is percent-decoded: a "%0A" in it must not start a forged log line.
    return text if text.isprintable() else ascii(text)


@final
class AccessLog:
    """Pure ASGI middleware: log method, path, status and duration of each request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = trio.current_time()
        # An exception that escapes the app becomes Starlette's plain 500 further out.
        status = 500

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, status_send)
        finally:
            client = scope.get("client")
            access_logger.info(
                "%s %s %s %d %.1fms",
                client[0] if client else "-",
                scope["method"],
                _printable(scope["path"]),
                status,
                (trio.current_time() - started) * 1000,
            )


def configure_logging(*, verbose: bool, stream: TextIO | None = None) -> logging.Handler:
    """Print trio-llm's log lines on ``stream`` (stderr by default), for ``trio-llm serve``.

    Warnings and errors always show (e.g. the upstream refusing the gateway's key); with
    ``verbose``, so do the INFO lines: one access line per request, one line per upstream
    call (``trio_llm.serve``) and one per retry (``trio_llm.retry``). Other libraries'
    loggers (Hypercorn, httpx2) are left as they are.

    Args:
        verbose: show INFO lines too.
        stream: where to write; ``sys.stderr`` if ``None``.

    Returns:
        The handler added to the ``trio_llm`` logger (to undo: remove it, and set the
        logger's level back to ``logging.NOTSET``).
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("trio_llm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    return handler
