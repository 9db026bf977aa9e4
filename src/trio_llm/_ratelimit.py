"""Client-side rate limits: requests and tokens per minute, shared by every task of a client.

A limit of ``N`` per minute is a continuously refilled token bucket holding at most ``N``
and refilling at ``N / 60`` per second, starting full: the model the providers describe
for their own limits, so a client that paces itself by the same rule runs at the limit
without being refused. One :class:`RateLimiter` holds two such buckets (requests and
tokens) and serves waiters strictly first come, first served.

A request's token cost is unknown until its response arrives, so it is estimated before
sending (``trio_llm._estimate``), then corrected (:meth:`Reservation.reconcile`) or
given back (:meth:`Reservation.refund`). The levels a response reports (its rate-limit
headers, translated by the provider adapter into :class:`RateLimitLevels`) correct the
buckets further (:meth:`RateLimiter.update`), and a 429 pauses the whole client
(:meth:`RateLimiter.pause`).

All times come from ``trio.current_time()``, so ``trio.testing.MockClock`` drives them.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, TypeGuard, final

import attrs
import trio

__all__ = [
    "RateLimit",
    "RateLimitLevel",
    "RateLimitLevels",
    "RateLimiter",
    "RateLimiterStatistics",
    "Reservation",
]


def _is_number(value: object) -> TypeGuard[float]:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_or_none(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not (_is_number(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a positive number or None, not {value!r}")


def _non_negative_or_none(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not (_is_number(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a number >= 0 or None, not {value!r}")


@final
@attrs.frozen(kw_only=True)
class RateLimit:
    """Requests and tokens a client may use per minute (``None``: no limit of that kind).

    ``RateLimit()`` sets no limit, but the client's limiter still learns the server's
    limits from its responses' rate-limit headers (see :class:`RateLimiter`).

    Attributes:
        requests_per_minute: Requests started per minute.
        tokens_per_minute: Tokens (prompt plus completion) used per minute.
    """

    requests_per_minute: float | None = attrs.field(default=None, validator=_positive_or_none)
    tokens_per_minute: float | None = attrs.field(default=None, validator=_positive_or_none)


@final
@attrs.frozen(kw_only=True)
class RateLimitLevel:
    """One kind of server limit (requests or tokens) as a response reports it.

    ``None`` stands for a value the response did not give (or gave malformed).

    Attributes:
        limit: The server's limit, taken as per minute.
        remaining: What the server's bucket holds now.
        reset_seconds: Seconds until the server's bucket is full again.
    """

    limit: float | None = attrs.field(default=None, validator=_positive_or_none)
    remaining: float | None = attrs.field(default=None, validator=_non_negative_or_none)
    reset_seconds: float | None = attrs.field(default=None, validator=_non_negative_or_none)


@final
@attrs.frozen(kw_only=True)
class RateLimitLevels:
    """A response's rate-limit headers as neutral numbers, built by the provider adapter.

    Attributes:
        requests: The requests limit.
        tokens: The tokens limit.
        tokens_per_direction: The server limits input and output tokens separately
            (``tokens`` is the tighter of the two), so the tokens in flight (estimated as
            totals) do not count against a first ``tokens`` limit.
    """

    requests: RateLimitLevel = attrs.Factory(RateLimitLevel)
    tokens: RateLimitLevel = attrs.Factory(RateLimitLevel)
    tokens_per_direction: bool = False


# Float error in refill arithmetic must not turn "exactly enough" into one more tiny sleep.
_EPSILON = 1e-9


@final
class _Bucket:
    """A continuous token bucket; ``capacity is None`` means no limit (yet)."""

    __slots__ = ("capacity", "configured", "level", "rate", "stamp")

    def __init__(self, per_minute: float | None) -> None:
        self.configured = per_minute
        self.capacity = per_minute
        self.rate = per_minute / 60.0 if per_minute is not None else 0.0
        self.level = float(per_minute) if per_minute is not None else 0.0
        # Set on first use: the limiter may be built before trio runs.
        self.stamp: float | None = None

    def refill(self, now: float) -> None:
        capacity = self.capacity
        if capacity is None:
            return
        stamp = self.stamp
        if stamp is not None and now > stamp:
            self.level = min(capacity, self.level + (now - stamp) * self.rate)
        self.stamp = now

    def wait(self, amount: float) -> float:
        """Seconds until the (refilled) bucket holds ``amount``, or is full if it never can."""
        capacity = self.capacity
        if capacity is None:
            return 0.0
        missing = min(amount, capacity) - self.level
        if missing <= _EPSILON * capacity:
            return 0.0
        return missing / self.rate

    def take(self, amount: float) -> None:
        if self.capacity is not None:
            self.level -= amount

    def give(self, now: float, amount: float) -> None:
        capacity = self.capacity
        if capacity is not None:
            self.refill(now)
            self.level = min(capacity, self.level + amount)

    def learn(self, now: float, limit: float, in_flight: float = 0.0) -> bool:
        """Adopt the server's per-minute ``limit`` (the lower one wins); True if it changed.

        ``in_flight``: what the client has taken and not yet settled. A bucket that had no
        limit took none of it, so a first limit starts that much below full, as if it
        had been known from the start.
        """
        capacity = limit if self.configured is None else min(self.configured, limit)
        if capacity == self.capacity:
            return False
        if self.capacity is None:
            # No lower than empty: a count inflated by reservations never settled must
            # not hold the client back for long.
            self.level = max(0.0, capacity - in_flight)
        else:
            self.refill(now)
            self.level = min(self.level, capacity)
        self.capacity = capacity
        self.rate = capacity / 60.0
        self.stamp = now
        return True

    def correct(self, now: float, level: RateLimitLevel, in_flight: float = 0.0) -> bool:
        """Apply the server's ``level``; True if waiters should look again (the limit changed).

        ``in_flight``: see :meth:`learn`.
        """
        limit, remaining, reset = level.limit, level.remaining, level.reset_seconds
        changed = self.learn(now, limit, in_flight) if limit is not None else False
        capacity = self.capacity
        if capacity is None or remaining is None:
            return changed
        self.refill(now)
        # Never believe in more than the server says remains. Our level already counts
        # requests sent but not yet seen by the server, so this binds only when the
        # server's bucket is lower than ours (other clients on the same key, drift).
        self.level = min(self.level, remaining)
        if remaining < 1 and reset is not None and reset > 0:
            # Exhausted: the server refills to ``limit`` in ``reset``, so its next unit is
            # due in ``reset / limit``; make ours come no sooner. With a per-minute limit
            # this is what the refill does anyway; it matters when the server's window is
            # longer (a per-day limit) or our rate is set higher than the server's.
            server_limit = limit if limit is not None else capacity
            self.level = min(self.level, 1.0 - self.rate * reset / server_limit)
        return changed


@final
@attrs.frozen(kw_only=True)
class RateLimiterStatistics:
    """A snapshot of a :class:`RateLimiter`.

    Attributes:
        waiting: Tasks blocked in :meth:`RateLimiter.acquire`.
        requests_available: Requests the bucket holds now (negative after an oversized
            request or a reconcile; ``None`` without a requests limit).
        tokens_available: Tokens the bucket holds now (``None`` without a tokens limit).
        pause_remaining: Seconds left of a pause set by :meth:`RateLimiter.pause`.
        requests_per_minute: The requests limit in force, configured or learned.
        tokens_per_minute: The tokens limit in force, configured or learned.
    """

    waiting: int
    requests_available: float | None
    tokens_available: float | None
    pause_remaining: float
    requests_per_minute: float | None
    tokens_per_minute: float | None


@final
class Reservation:
    """The capacity one :meth:`RateLimiter.acquire` took: one request and ``tokens``.

    Settle it once the outcome is known, with :meth:`reconcile` (the response's real
    usage), :meth:`refund` (nothing reached the server) or :meth:`keep` (sent, usage
    unknown). Only the first settling call counts; later ones do nothing. An unsettled
    reservation keeps its estimate and counts as in flight.
    """

    __slots__ = ("_limiter", "_settled", "tokens")

    def __init__(self, limiter: RateLimiter, tokens: int) -> None:
        self._limiter = limiter
        self._settled = False
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"<Reservation tokens={self.tokens} settled={self._settled}>"

    def reconcile(self, actual_tokens: int) -> None:
        """Charge ``actual_tokens`` instead of the estimate.

        A smaller actual use returns the difference (waiters may proceed sooner); a larger
        one takes more, possibly below zero, which delays later requests.

        Raises:
            ValueError: ``actual_tokens`` is negative.
        """
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, not {actual_tokens}")
        if self._settled:
            return
        self._settled = True
        self._limiter._settle(self.tokens)
        if actual_tokens != self.tokens:
            self._limiter._give(0, self.tokens - actual_tokens)

    def refund(self) -> None:
        """Give back the request and all its tokens: it was never sent (or was refused)."""
        if self._settled:
            return
        self._settled = True
        self._limiter._settle(self.tokens)
        self._limiter._give(1, self.tokens)

    def keep(self) -> None:
        """Settle at the estimate: the request was sent, and its real usage is unknown.

        For an answer without usage, or a stream left before its end: the reservation
        stops counting as in flight, and its estimate stays charged.
        """
        if self._settled:
            return
        self._settled = True
        self._limiter._settle(self.tokens)


@final
class _Waiter:
    """A place in the queue; its event is set when it becomes (or, as head, may be) served."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()


def _check_tokens(tokens: int) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise TypeError(f"tokens must be an int, not {type(tokens).__name__}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, not {tokens}")


@final
class RateLimiter:
    """Token buckets for requests and tokens per minute, shared by every task of a client.

    Each :meth:`acquire` takes one request and an estimated number of tokens. Waiters are
    served strictly in arrival order: a large request at the head of the queue is never
    overtaken by small ones arriving after it, and a request larger than a bucket's
    capacity is admitted when that bucket is full, taking it below zero (the deficit then
    delays the requests after it) rather than waiting forever.

    Limits come from the :class:`RateLimit` and from the server: with no configured
    limit of a kind, the limiter adopts the limit the server's headers report as its
    per-minute limit; with one, the lower of the two is in force. See :meth:`update`.
    """

    def __init__(self, limit: RateLimit | None = None) -> None:
        self._limit = limit if limit is not None else RateLimit()
        self._requests = _Bucket(self._limit.requests_per_minute)
        self._tokens = _Bucket(self._limit.tokens_per_minute)
        self._queue: deque[_Waiter] = deque()
        self._paused_until = -math.inf
        # Taken and not yet settled, limits known or not (see _Bucket.learn).
        self._in_flight_requests = 0
        self._in_flight_tokens = 0

    def __repr__(self) -> str:
        return f"<RateLimiter {self._limit!r} waiting={len(self._queue)}>"

    @property
    def limit(self) -> RateLimit:
        """The configured limits (learned ones are in :meth:`statistics`)."""
        return self._limit

    def _delay(self, now: float, tokens: int) -> float:
        """Seconds until one request and ``tokens`` could be taken (<= 0: now)."""
        self._requests.refill(now)
        self._tokens.refill(now)
        return max(self._paused_until - now, self._requests.wait(1.0), self._tokens.wait(tokens))

    def _take(self, tokens: int) -> Reservation:
        self._requests.take(1.0)
        self._tokens.take(tokens)
        self._in_flight_requests += 1
        self._in_flight_tokens += tokens
        return Reservation(self, tokens)

    def _settle(self, tokens: int) -> None:
        self._in_flight_requests -= 1
        self._in_flight_tokens -= tokens

    def acquire_nowait(self, tokens: int) -> Reservation:
        """Take one request and ``tokens`` tokens if that is possible without waiting.

        Raises:
            trio.WouldBlock: The buckets cannot cover it now, the limiter is paused, or
                other tasks are already waiting (they come first).
            ValueError: ``tokens`` is negative.
            TypeError: ``tokens`` is not an int.
        """
        _check_tokens(tokens)
        if self._queue or self._delay(trio.current_time(), tokens) > 0:
            raise trio.WouldBlock
        return self._take(tokens)

    def ready(self, tokens: int) -> bool:
        """Whether :meth:`acquire_nowait` of ``tokens`` would succeed now (nothing taken)."""
        return not self._queue and self._delay(trio.current_time(), tokens) <= 0

    async def acquire(self, tokens: int) -> Reservation:
        """Wait until one request and ``tokens`` tokens are available, and take them.

        Always a checkpoint. When capacity is free and nobody waits, it costs one
        schedule point and no more. A cancelled acquire takes nothing and leaves the
        queue as if it had never joined.

        Args:
            tokens: The request's estimated token cost (see :func:`estimate_tokens`).

        Returns:
            The :class:`Reservation` to settle once the outcome is known.

        Raises:
            ValueError: ``tokens`` is negative.
            TypeError: ``tokens`` is not an int.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            reservation = self.acquire_nowait(tokens)
        except trio.WouldBlock:
            return await self._acquire_slowly(tokens)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return reservation

    async def _acquire_slowly(self, tokens: int) -> Reservation:
        waiter = _Waiter()
        queue = self._queue
        queue.append(waiter)
        try:
            while True:
                if queue[0] is waiter:
                    # Only the head waits on the clock; the others wait for their turn.
                    now = trio.current_time()
                    delay = self._delay(now, tokens)
                    if delay <= 0:
                        # No checkpoint between taking and returning: a Cancelled can
                        # only arrive while nothing has been taken.
                        return self._take(tokens)
                    with trio.move_on_at(now + delay):
                        await waiter.event.wait()
                else:
                    await waiter.event.wait()
                if waiter.event.is_set():
                    waiter.event = trio.Event()
        finally:
            if queue[0] is waiter:
                queue.popleft()
                if queue:
                    queue[0].event.set()
            else:
                queue.remove(waiter)

    def _wake_head(self) -> None:
        # The head sleeps until the time it computed; capacity arriving earlier (a refund,
        # a raised limit) must make it look again.
        if self._queue:
            self._queue[0].event.set()

    def _give(self, requests: int, tokens: int) -> None:
        """Return capacity (``tokens`` may be negative: a reconcile charging more)."""
        now = trio.current_time()
        if requests:
            self._requests.give(now, requests)
        if tokens:
            self._tokens.give(now, tokens)
        if requests > 0 or tokens > 0:
            self._wake_head()

    def pause(self, seconds: float) -> None:
        """Let no acquire succeed for ``seconds`` from now (a client-wide cooldown).

        Meant for a 429's ``Retry-After``: every task of the client waits, not just the
        one that was refused. A pause only ever extends: a shorter one than the pause in
        force changes nothing. Non-positive or non-finite values are ignored.
        """
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        until = trio.current_time() + seconds
        if until > self._paused_until:
            self._paused_until = until

    def update(self, levels: RateLimitLevels | None) -> None:
        """Correct the buckets from the levels a response reported (``None``: it had none).

        - ``limit``: becomes the per-minute limit of a kind that has none configured (or
          lowers a configured one that is higher). A first limit starts its bucket below
          full by what is in flight (taken, not yet settled): an adaptive client learns
          the limits from the first response of its first burst, and the rest of that
          burst counts. With ``tokens_per_direction``, the tokens in flight do not count:
          they are totals, and the limit is on one direction only.
        - ``remaining``: lowers the bucket to it, never raises it. This keeps the client
          in step with the server when its bucket started at another moment or other
          clients share the key (without it, a client whose bucket runs a fraction of a
          second ahead of the server's gets refused at every refill). ``remaining`` is
          as old as the response's latency, so a burst answered late can cost up to
          ``rate * latency`` of capacity, once.
        - ``reset_seconds`` (time until the server's bucket is full again): used only
          when ``remaining`` is 0, so that the next unit comes no sooner than the
          server's (``reset_seconds / limit`` from now).

        Call it with every response, 429s included.
        """
        if levels is None:
            return
        now = trio.current_time()
        changed = self._requests.correct(now, levels.requests, self._in_flight_requests)
        in_flight_tokens = 0 if levels.tokens_per_direction else self._in_flight_tokens
        changed |= self._tokens.correct(now, levels.tokens, in_flight_tokens)
        if changed:
            self._wake_head()

    def statistics(self) -> RateLimiterStatistics:
        """Return a snapshot of the limiter's state."""
        now = trio.current_time()
        self._requests.refill(now)
        self._tokens.refill(now)
        return RateLimiterStatistics(
            waiting=len(self._queue),
            requests_available=None if self._requests.capacity is None else self._requests.level,
            tokens_available=None if self._tokens.capacity is None else self._tokens.level,
            pause_remaining=max(0.0, self._paused_until - now),
            requests_per_minute=self._requests.capacity,
            tokens_per_minute=self._tokens.capacity,
        )
