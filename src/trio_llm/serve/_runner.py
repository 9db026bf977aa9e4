"""Run the gateway on Hypercorn's Trio worker."""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio
from fastapi import FastAPI
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from .._client import Client
from ._app import create_app

__all__ = ["serve"]


async def serve(
    app_or_client: FastAPI | Client,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    grace: float = 30.0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app_or_client`` (a :func:`create_app` app, or a client to build one for).

    Use with ``await nursery.start(serve, app, ...)``: once listening, reports the base
    URL it is bound to (``"http://127.0.0.1:54321"``; ``port=0`` picks a free port).

    Args:
        app_or_client: the app, or a :class:`~trio_llm.Client` (served by
            ``create_app(client)`` with its defaults).
        host: the address to bind.
        port: the port to bind; 0 picks a free one.
        shutdown_trigger: an async function whose return starts a graceful shutdown:
            stop accepting, give requests in flight ``grace`` seconds, then run the app's
            lifespan shutdown (which drains its background work). Without it the server
            runs until cancelled.
        grace: seconds requests in flight may take to finish after the trigger.

    Raises:
        OSError: the address cannot be listened on (in use, permission denied, not an
            address of this machine; ``socket.gaierror`` for a host that does not
            resolve). Raised as itself, before the app starts and before ``task_status``
            reports anything.
        ValueError: ``port`` is not in 0-65535.

    Cancellation: cancelling the caller's scope stops at once, without the grace period;
    connections are closed and the lifespan's nursery is cancelled.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be from 0 to 65535, not {port}")
    app = app_or_client if isinstance(app_or_client, FastAPI) else create_app(app_or_client)
    config = Config()
    config.graceful_timeout = grace
    config.accesslog = None
    # Hypercorn logs "Running on ..." to stderr itself; the caller reports the address.
    config.errorlog = logging.getLogger("hypercorn.error")
    # Bound here, not by Hypercorn, which binds inside its nurseries (a busy port would
    # surface as an exception group) and after the app's startup.
    listener = await _listen(host, port, backlog=config.backlog)
    try:
        # Starlette's ASGI types are looser than Hypercorn's; the protocol is the same.
        wrapped = wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi")
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                functools.partial(
                    worker_serve,
                    wrapped,
                    config,
                    sockets=Sockets([], [listener], []),
                    shutdown_trigger=shutdown_trigger,
                )
            )
            task_status.started(binds[0])
    finally:
        listener.close()


async def _listen(host: str, port: int, *, backlog: int) -> socket.socket:
    """Return a socket listening on ``host:port`` (a name: its first address).

    Raises:
        OSError: the address cannot be resolved, bound or listened on.
    """
    family, kind, proto, _, address = (
        await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
