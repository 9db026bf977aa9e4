"""Client-side rate limits: requests and tokens per minute, shared by every task of a client.

A limit of ``N`` per minute is a continuously refilled token bucket holding at most ``N``
and refilling at ``N / 60`` per second, starting full: the model OpenAI and Anthropic
describe for their own limits, so a client that paces itself by the same rule runs at the
limit without being refused. One :class:`RateLimiter` holds two such buckets (requests and
tokens) and serves waiters strictly first come, first served.

A request's token cost is unknown until its response arrives, so it is estimated before
sending (:func:`estimate_tokens`), then corrected (:meth:`Reservation.reconcile`) or
given back (:meth:`Reservation.refund`). The server's ``x-ratelimit-*`` (OpenAI) and
``anthropic-ratelimit-*`` headers correct the buckets further
(:meth:`RateLimiter.update_from_headers`), and a 429 pauses the whole client
(:meth:`RateLimiter.pause`).

All times come from ``trio.current_time()``, so ``trio.testing.MockClock`` drives them.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, final

import attrs
import trio

__all__ = [
    "DEFAULT_COMPLETION_TOKENS",
    "RateLimit",
    "RateLimiter",
    "RateLimiterStatistics",
    "Reservation",
    "estimate_tokens",
]


def _positive_or_none(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{attribute.name} must be a positive number or None, not {value!r}")


@final
@attrs.frozen(kw_only=True)
class RateLimit:
    """Requests and tokens a client may use per minute (``None``: no limit of that kind).

    ``RateLimit()`` sets no limit, but the client's limiter still learns the server's
    limits from its ``x-ratelimit-limit-*`` headers (see :class:`RateLimiter`).

    Attributes:
        requests_per_minute: Requests started per minute.
        tokens_per_minute: Tokens (prompt plus completion) used per minute.
    """

    requests_per_minute: float | None = attrs.field(default=None, validator=_positive_or_none)
    tokens_per_minute: float | None = attrs.field(default=None, validator=_positive_or_none)


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

    def correct(
        self,
        now: float,
        limit: float | None,
        remaining: float | None,
        reset: float | None,
        in_flight: float = 0.0,
    ) -> bool:
        """Apply one header group; True if waiters should look again (the limit changed).

        ``in_flight``: see :meth:`learn`.
        """
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
    limit of a kind, the limiter adopts the server's ``x-ratelimit-limit-*`` (or
    ``anthropic-ratelimit-*-limit``) as its per-minute limit; with one, the lower of the
    two is in force. See :meth:`update_from_headers`.
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

    def update_from_headers(self, headers: Mapping[str, str]) -> None:
        """Correct the buckets from a response's rate-limit headers.

        Reads OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (resets as
        Go durations: ``6m0s``, ``12ms``, ``1m30.5s``) and Anthropic's
        ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` (resets as RFC
        3339 times; when only ``input-tokens``/``output-tokens`` groups are sent, the one
        with less remaining counts).

        - ``limit``: becomes the per-minute limit of a kind that has none configured (or
          lowers a configured one that is higher). A first limit starts its bucket below
          full by what is in flight (taken, not yet settled): an adaptive client learns
          the limits from the first response of its first burst, and the rest of that
          burst counts.
        - ``remaining``: lowers the bucket to it, never raises it. This keeps the client
          in step with the server when its bucket started at another moment or other
          clients share the key (without it, a client whose bucket runs a fraction of a
          second ahead of the server's gets refused at every refill). ``remaining`` is
          as old as the response's latency, so a burst answered late can cost up to
          ``rate * latency`` of capacity, once.
        - ``reset`` (time until the server's bucket is full again): used only when
          ``remaining`` is 0, so that the next unit comes no sooner than the server's
          (``reset / limit`` from now).

        Call it with every response, 429s included. Header names are matched
        case-insensitively; malformed values are ignored.
        """
        openai: dict[str, str] = {}
        anthropic: dict[str, str] = {}
        for name, value in headers.items():
            lower = name.lower()
            if lower.startswith("x-ratelimit-"):
                openai[lower[12:]] = value
            elif lower.startswith("anthropic-ratelimit-"):
                anthropic[lower[20:]] = value
        if not openai and not anthropic:
            return
        now = trio.current_time()
        changed = False
        for bucket, kind, in_flight in (
            (self._requests, "requests", self._in_flight_requests),
            (self._tokens, "tokens", self._in_flight_tokens),
        ):
            if openai:
                changed |= bucket.correct(
                    now,
                    _parse_limit(openai.get(f"limit-{kind}")),
                    _parse_count(openai.get(f"remaining-{kind}")),
                    _parse_duration(openai.get(f"reset-{kind}")),
                    in_flight,
                )
            if anthropic:
                # Anthropic's token limits are per direction (input, output) while the
                # estimates are totals: what is in flight is counted against requests only.
                counted = in_flight if kind == "requests" else 0
                changed |= bucket.correct(now, *_anthropic_group(anthropic, kind), counted)
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


# --- header parsing ----------------------------------------------------------------------

_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_SECONDS_PER_UNIT = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 MICRO SIGN, what Go prints
    "μs": 1e-6,  # U+03BC GREEK SMALL LETTER MU
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:?\d\d)?")


def _parse_count(value: str | None) -> float | None:
    """A non-negative finite number, or None."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _parse_limit(value: str | None) -> float | None:
    number = _parse_count(value)
    return number if number else None


def _parse_duration(value: str | None) -> float | None:
    """Seconds in a Go duration (``1m30.5s``, ``12ms``, ``0s``, ``0``), or plain seconds."""
    if value is None:
        return None
    text = value.strip()
    if _PLAIN_NUMBER.fullmatch(text):
        return float(text)
    total = 0.0
    position = 0
    for match in _GO_DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match[1]) * _SECONDS_PER_UNIT[match[2]]
        position = match.end()
    if position == 0 or position != len(text):
        return None
    return total


def _parse_rfc3339_delay(value: str | None) -> float | None:
    """Seconds from now (wall clock) until an RFC 3339 time; a duration is accepted too."""
    if value is None:
        return None
    text = value.strip()
    match = _RFC3339.fullmatch(text)
    if match is None:
        return _parse_duration(text)
    day, clock, fraction, zone = match.groups()
    # datetime.fromisoformat before 3.11 takes neither "Z" nor fractions other than 3 or
    # 6 digits, so normalise both.
    fraction = f".{(fraction or '')[:6]:0<6}"
    if zone is None or zone in "Zz":
        zone = "+00:00"
    elif ":" not in zone:
        zone = f"{zone[:3]}:{zone[3:]}"
    try:
        moment = datetime.fromisoformat(f"{day}T{clock}{fraction}{zone}")
    except ValueError:
        return None
    return max(0.0, moment.astimezone(timezone.utc).timestamp() - time.time())


def _anthropic_group(
    fields: Mapping[str, str], kind: str
) -> tuple[float | None, float | None, float | None]:
    """``(limit, remaining, reset)`` for ``requests`` or ``tokens`` from Anthropic headers."""
    groups = [kind]
    if kind == "tokens" and not any(name.startswith("tokens-") for name in fields):
        groups = ["input-tokens", "output-tokens"]
    best: tuple[float | None, float | None, float | None] = (None, None, None)
    for group in groups:
        parsed = (
            _parse_limit(fields.get(f"{group}-limit")),
            _parse_count(fields.get(f"{group}-remaining")),
            _parse_rfc3339_delay(fields.get(f"{group}-reset")),
        )
        # The most restrictive group counts: the one with the least remaining.
        if best[1] is None or (parsed[1] is not None and parsed[1] < best[1]):
            best = parsed
    return best


# --- token estimates ---------------------------------------------------------------------

DEFAULT_COMPLETION_TOKENS = 256
"""Completion tokens assumed for a chat request that sets no ``max_tokens``."""

_CHARS_PER_TOKEN = 4
# OpenAI's accounting: each message costs a few tokens of framing, the reply 3 of priming.
_TOKENS_PER_MESSAGE = 4
_TOKENS_REPLY_PRIMING = 3
# Images, audio and documents are counted as one 1024x1024 high-detail image; their bytes
# are not text. Reconciling with the real usage corrects the guess.
_TOKENS_PER_MEDIA_PART = 765
_MEDIA_TYPES = frozenset(
    {"image_url", "image", "input_image", "input_audio", "audio", "document", "file"}
)
# Framing the per-message overhead already covers.
_SKIPPED_KEYS = frozenset({"role", "type", "cache_control"})


@functools.cache
def _tiktoken_encoding() -> Any:
    """tiktoken's ``o200k_base`` encoding, or None if tiktoken is missing or cannot load it."""
    try:
        tiktoken = importlib.import_module("tiktoken")
        return tiktoken.get_encoding("o200k_base")
    except Exception:  # not installed, or its BPE file is neither cached nor downloadable
        return None


def _collect(value: object, texts: list[str]) -> int:
    """Append the text strings inside ``value`` to ``texts``; return tokens for media."""
    if isinstance(value, str):
        texts.append(value)
        return 0
    fixed = 0
    if isinstance(value, Mapping):
        if value.get("type") in _MEDIA_TYPES:
            return _TOKENS_PER_MEDIA_PART
        for key, item in value.items():
            if key not in _SKIPPED_KEYS:
                fixed += _collect(item, texts)
    elif isinstance(value, (list, tuple)):
        for item in value:
            fixed += _collect(item, texts)
    return fixed


def _count_text(texts: list[str]) -> int:
    encoding = _tiktoken_encoding()
    if encoding is not None:
        return sum(len(encoding.encode(text, disallowed_special=())) for text in texts)
    return math.ceil(sum(map(len, texts)) / _CHARS_PER_TOKEN)


def _non_negative_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Estimate the tokens a request will use, before sending it.

    The prompt counts ``ceil(characters / 4)`` of its text (message contents, content-part
    lists, names, tool calls, Anthropic's ``system``, tool definitions), plus 4 tokens per
    message and 3 for the reply, plus 765 per image, audio or document part. When
    `tiktoken <https://github.com/openai/tiktoken>`_ is installed and can load
    ``o200k_base`` (the first call may block while it does), the text is counted with it
    instead. The completion counts ``max_completion_tokens`` or ``max_tokens`` (times
    ``n``), or :data:`DEFAULT_COMPLETION_TOKENS` when neither is set. An embeddings body
    (``input``) counts its input only; token-id inputs count exactly.

    Reconcile the estimate with the response's real usage (:meth:`Reservation.reconcile`).
    """
    texts: list[str] = []
    fixed = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        fixed += _TOKENS_REPLY_PRIMING + _TOKENS_PER_MESSAGE * len(messages)
        fixed += _collect(messages, texts)
    for key in ("system", "prompt"):
        fixed += _collect(body.get(key), texts)
    tools = body.get("tools")
    if tools:
        # Schemas count by their JSON: keys and punctuation are tokens too.
        texts.append(json.dumps(tools, separators=(",", ":"), default=str))
    if "input" in body and messages is None and "prompt" not in body:
        return fixed + _count_input(body["input"])
    completion = _non_negative_int(body.get("max_completion_tokens"))
    if completion is None:
        completion = _non_negative_int(body.get("max_tokens"))
    if completion is None:
        completion = DEFAULT_COMPLETION_TOKENS
    choices = _non_negative_int(body.get("n")) or 1
    return fixed + _count_text(texts) + completion * choices


def _count_input(value: object) -> int:
    """Tokens of an embeddings ``input``: text, a token-id list, or a list of either."""
    if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
        return len(value)
    if isinstance(value, list) and all(isinstance(x, list) for x in value):
        return sum(_count_input(x) for x in value)
    texts: list[str] = []
    fixed = _collect(value, texts)
    return fixed + _count_text(texts)
