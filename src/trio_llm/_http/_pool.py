"""The keep-alive pool of one origin: an O(1) LIFO stack of idle connections, FIFO waiters."""

from __future__ import annotations

import math
from collections import deque
from typing import final

import httpx2
import trio

from ._connection import Connection

__all__ = ["Pool"]


@final
class Pool:
    """The connections to one origin: a LIFO stack of idle ones and a FIFO of waiters.

    ``_slots`` counts connections that exist or are being opened; it never passes
    ``_max``. A slot or an idle connection given back while a task waits is handed to
    that task directly, so a waiter is never overtaken by a newcomer. Taking and giving
    back are O(1), whatever the number of connections (httpx2's pool rescans them all).
    """

    __slots__ = ("_expiry", "_handoff", "_idle", "_lot", "_max", "_max_idle", "_slots", "closed")

    def __init__(self, limits: httpx2.Limits) -> None:
        self._max = math.inf if limits.max_connections is None else limits.max_connections
        self._max_idle = (
            math.inf
            if limits.max_keepalive_connections is None
            else limits.max_keepalive_connections
        )
        self._expiry = math.inf if limits.keepalive_expiry is None else limits.keepalive_expiry
        self._idle: deque[Connection] = deque()  # oldest on the left, newest on the right
        self._slots = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._handoff: dict[trio.lowlevel.Task, Connection | None] = {}
        self.closed = False

    def acquire_nowait(self) -> Connection | None:
        """Take the newest usable idle connection, else a slot for a new one (``None``).

        Raises:
            trio.WouldBlock: every slot is taken, or other tasks are already waiting.
        """
        idle = self._idle
        if idle:
            oldest_allowed = trio.current_time() - self._expiry
            while idle:
                conn = idle.pop()
                if conn.idle_since >= oldest_allowed and conn.usable_after_idle():
                    return conn
                conn.close()  # expired, or closed by the server while idle
                self._slots -= 1
        if self._slots < self._max and not self._lot:
            self._slots += 1
            return None
        raise trio.WouldBlock

    async def acquire(self, seconds: float | None) -> Connection | None:
        """Wait for an idle connection or a free slot, at most ``seconds`` (the pool timeout).

        Returns:
            An idle connection, or ``None``: a slot reserved for a new connection.

        Raises:
            httpx2.PoolTimeout: none came in time.

        Cancellation: either a connection or slot is returned, or ``Cancelled`` is raised
        and nothing was taken.
        """
        try:
            return self.acquire_nowait()
        except trio.WouldBlock:
            pass
        task = trio.lowlevel.current_task()
        deadline = math.inf if seconds is None else trio.current_time() + seconds
        with trio.CancelScope(deadline=deadline):
            await self._lot.park()
        # Handed over by release()/discard(); once unparked, no Cancelled can intervene.
        try:
            return self._handoff.pop(task)
        except KeyError:
            raise httpx2.PoolTimeout(
                f"no connection free within the pool timeout ({seconds} s)"
            ) from None

    def _hand_over(self, conn: Connection | None) -> bool:
        """Give a connection or slot to the longest waiter; return whether there was one."""
        if not self._lot:
            return False
        (task,) = self._lot.unpark()
        self._handoff[task] = conn
        return True

    def release(self, conn: Connection) -> None:
        """Take back a connection whose body was read to its end; keep it if reusable."""
        body = conn.body
        if self.closed or body is None or not body.reusable:
            self.discard(conn)  # Connection: close, HTTP/1.0, or the transport is closed
            return
        conn.body = None
        if self._hand_over(conn):
            return
        idle = self._idle
        if len(idle) >= self._max_idle:
            self.discard(conn)
            return
        now = trio.current_time()
        conn.idle_since = now
        idle.append(conn)
        # Connections at the bottom of the stack may never be reached again: close the
        # expired ones from there, so the server is not left holding them.
        oldest_allowed = now - self._expiry
        while idle[0].idle_since < oldest_allowed:
            idle.popleft().close()
            self._slots -= 1

    def discard(self, conn: Connection | None) -> None:
        """Close ``conn`` (if any) and free its slot, for a waiter or for later."""
        if conn is not None:
            conn.close()
        if not self._hand_over(None):
            self._slots -= 1

    def close(self) -> None:
        """Close every idle connection; connections in use close when given back."""
        self.closed = True
        while self._idle:
            self._idle.pop().close()
            self._slots -= 1

    def statistics(self) -> tuple[int, int, int]:
        """Return ``(connections, idle connections, waiting tasks)``, for tests."""
        return self._slots, len(self._idle), len(self._lot)
