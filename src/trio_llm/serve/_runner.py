"""Run the gateway on Hypercorn's Trio worker."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio
from fastapi import FastAPI
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

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

    Cancellation: cancelling the caller's scope stops at once, without the grace period;
    connections are closed and the lifespan's nursery is cancelled.
    """
    app = app_or_client if isinstance(app_or_client, FastAPI) else create_app(app_or_client)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = grace
    config.accesslog = None
    # Hypercorn logs "Running on ..." to stderr itself; the caller reports the address.
    config.errorlog = logging.getLogger("hypercorn.error")
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            # Starlette's ASGI types are looser than Hypercorn's; the protocol is the same.
            functools.partial(
                hypercorn_serve, cast(Any, app), config, shutdown_trigger=shutdown_trigger
            )
        )
        task_status.started(binds[0])
