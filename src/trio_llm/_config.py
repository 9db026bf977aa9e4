"""Configuration objects: frozen, validated, overridable per call with ``attrs.evolve``."""

from __future__ import annotations

from typing import Any, final

import attrs
import httpx2

__all__ = ["RetryPolicy", "Timeouts"]


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


def _at_least_one(_instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, not {value!r}")


def _non_negative(_instance: Any, attribute: Any, value: Any) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0 seconds, not {value!r}")


@final
@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a call is retried: attempts, exponential backoff with jitter, and a deadline.

    Retried: connection errors and timeouts, 408, 409, 429 and 5xx statuses (but 501 and
    505, which no retry can fix), and any response with ``x-should-retry: true``. Never
    retried: other statuses, ``x-should-retry: false``, and cancellation. The wait before
    attempt *n* + 1 is the server's ``retry-after-ms`` / ``retry-after`` when it sent one,
    else ``min(wait_max, wait_initial * 2 ** (n - 1)) + uniform(0, wait_jitter)``.

    Attributes:
        attempts: the most attempts a call makes, the first included (1 = no retries).
        wait_initial: the backoff before the first retry, in seconds.
        wait_max: the longest backoff, in seconds (server-requested waits may be longer).
        wait_jitter: the most random extra wait added to each backoff, in seconds.
        deadline: seconds for the whole call, every attempt and wait included
            (``None``: no limit). When it passes, the attempt in flight is cancelled and
            :class:`RetryDeadlineExceeded` raised; a server-requested wait that would end
            past it fails at once instead of sleeping into it.
    """

    attempts: int = attrs.field(default=6, validator=_at_least_one)
    wait_initial: float = attrs.field(default=0.5, validator=_non_negative)
    wait_max: float = attrs.field(default=30.0, validator=_non_negative)
    wait_jitter: float = attrs.field(default=0.5, validator=_non_negative)
    deadline: float | None = attrs.field(default=120.0, validator=_positive_or_none)
