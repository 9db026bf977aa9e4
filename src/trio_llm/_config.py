"""Configuration objects: frozen, validated, overridable per call with ``attrs.evolve``."""

from __future__ import annotations

from typing import Any, final

import attrs
import httpx2

__all__ = ["Timeouts"]


def _positive_or_none(_instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number or None, not {value!r}")


@final
@attrs.frozen(kw_only=True)
class Timeouts:
    """Per-phase I/O limits, in seconds (``None`` waits forever).

    These bound single I/O phases of one HTTP attempt. An overall deadline for a call is a
    trio cancel scope around it (``with trio.fail_after(30): await client.chat(...)``).

    Attributes:
        connect: establishing a connection (TCP and TLS).
        read: the wait for each chunk of the response (the time to first byte included).
        write: the wait for each chunk of the request to be sent.
        pool: the wait for a free connection in the pool.
        stream_idle: the longest wait for the next event of a streamed reply, from the
            request to the first event and between events after it; keep-alive comments
            do not count as events. It expires as ``APITimeoutError`` before the first
            event and as ``StreamError`` after it.
    """

    connect: float | None = attrs.field(default=10.0, validator=_positive_or_none)
    read: float | None = attrs.field(default=120.0, validator=_positive_or_none)
    write: float | None = attrs.field(default=30.0, validator=_positive_or_none)
    pool: float | None = attrs.field(default=60.0, validator=_positive_or_none)
    stream_idle: float | None = attrs.field(default=60.0, validator=_positive_or_none)

    def to_httpx(self) -> httpx2.Timeout:
        """Return the equivalent :class:`httpx2.Timeout`."""
        return httpx2.Timeout(
            connect=self.connect, read=self.read, write=self.write, pool=self.pool
        )
