"""The fake LLM server in a child process pinned to CPU 0, for the benchmarks.

Shared by ``fan_out.py`` and ``rate_limits.py``: the server gets a core of its own, the
client the other, so neither measures the other's CPU.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from trio_llm.testing import FakeLLMConfig, serve_fake_llm


def _serve(conn: multiprocessing.connection.Connection, fields: dict[str, Any]) -> None:
    """Child process: serve until the pipe closes; answer each message with the stats."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_fake_llm, FakeLLMConfig(**fields))
            conn.send(server.base_url)
            while True:
                try:
                    await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)
                except EOFError:
                    break
                conn.send({**attrs.asdict(server.stats), "cpu": time.process_time()})
            nursery.cancel_scope.cancel()

    trio.run(main)


@attrs.define
class ServerHandle:
    """A fake server running in a child process."""

    base_url: str
    conn: multiprocessing.connection.Connection

    async def stats(self) -> dict[str, Any]:
        """Return the server's counters (``FakeLLMStats`` fields) and its CPU seconds."""
        self.conn.send("stats")
        result: dict[str, Any] = await trio.to_thread.run_sync(self.conn.recv)
        return result


@asynccontextmanager
async def fake_server(**fields: Any) -> AsyncIterator[ServerHandle]:
    """Start a fake server (``FakeLLMConfig(**fields)``) in a child process pinned to CPU 0."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(child, fields), daemon=True)
    process.start()
    child.close()
    try:
        base_url: str = await trio.to_thread.run_sync(parent.recv)
        yield ServerHandle(base_url, parent)
    finally:
        parent.close()
        await trio.to_thread.run_sync(process.join, 10)
        if process.is_alive():
            process.terminate()


def pin_client() -> None:
    """Keep this process off the server's CPU, so each side has a core."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
