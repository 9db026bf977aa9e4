"""Server-side rate limits: continuously refilled token buckets, as OpenAI describes them.

A limit of ``N`` per minute is a bucket holding at most ``N`` that refills at ``N / 60`` per
second. A request is admitted only when every bucket holds what it costs (one request; its
prompt tokens plus the completion tokens the server will produce); admission takes the cost
from each bucket at once, refusal takes nothing.
"""

from __future__ import annotations

import math

import attrs


def go_duration(seconds: float) -> str:
    """Format a duration the way Go's ``time.Duration`` prints it (``12ms``, ``6m0s``).

    Sub-millisecond remainders round up, so the reset time is never understated.
    """
    millis = math.ceil(seconds * 1000 - 1e-9)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@attrs.define
class TokenBucket:
    """A bucket of ``capacity`` units refilling at ``capacity / 60`` per second."""

    capacity: int
    level: float
    updated: float

    @classmethod
    def full(cls, capacity: int, now: float) -> TokenBucket:
        """Return a full bucket of ``capacity`` units per minute."""
        return cls(capacity, float(capacity), now)

    @property
    def rate(self) -> float:
        """Units added per second."""
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        """Add what accumulated since the last update."""
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds ``amount`` (until full when it never can)."""
        missing = min(amount, self.capacity) - self.level
        # Forgive float dust: a client that waits exactly the advertised time must get in,
        # not a 1 ms retry-after for a bucket at 0.9999999.
        return missing / self.rate if missing > 1e-6 else 0.0

    def reset_after(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) / self.rate


@attrs.frozen
class Admission:
    """Outcome of a rate-limit check.

    Attributes:
        admitted: Whether the request may proceed (its cost has been taken).
        limit_type: ``"requests"`` or ``"tokens"``: which limit refused it.
        retry_after: Seconds until the request could be admitted.
        too_large: The request costs more tokens than the bucket holds.
        headers: ``x-ratelimit-*`` headers describing the buckets after the decision.
    """

    admitted: bool
    limit_type: str = ""
    retry_after: float = 0.0
    too_large: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = ()


class RateLimits:
    """The RPM and TPM buckets of one server; rebuilt (full) when a limit changes."""

    def __init__(self) -> None:
        self._requests: TokenBucket | None = None
        self._tokens: TokenBucket | None = None

    def _sync(self, rpm: int | None, tpm: int | None, now: float) -> None:
        if rpm is None:
            self._requests = None
        elif self._requests is None or self._requests.capacity != rpm:
            self._requests = TokenBucket.full(rpm, now)
        if tpm is None:
            self._tokens = None
        elif self._tokens is None or self._tokens.capacity != tpm:
            self._tokens = TokenBucket.full(tpm, now)

    def admit(self, rpm: int | None, tpm: int | None, tokens: int, now: float) -> Admission:
        """Charge one request and ``tokens`` tokens if both buckets allow it.

        Args:
            rpm: The current requests-per-minute limit (``None``: unlimited).
            tpm: The current tokens-per-minute limit (``None``: unlimited).
            tokens: What the request costs in tokens (prompt plus completion).
            now: The current ``trio.current_time()``.
        """
        self._sync(rpm, tpm, now)
        requests, token_bucket = self._requests, self._tokens
        wait_requests = wait_tokens = 0.0
        too_large = False
        if requests is not None:
            requests.refill(now)
            wait_requests = requests.wait_for(1)
        if token_bucket is not None:
            token_bucket.refill(now)
            too_large = tokens > token_bucket.capacity
            wait_tokens = token_bucket.wait_for(tokens)
            if too_large:
                wait_tokens = max(wait_tokens, token_bucket.reset_after(), 1.0)
        if wait_requests > 0 or wait_tokens > 0:
            kind = "requests" if wait_requests >= wait_tokens else "tokens"
            return Admission(
                admitted=False,
                limit_type=kind,
                retry_after=max(wait_requests, wait_tokens),
                too_large=too_large and kind == "tokens",
                headers=self.headers(),
            )
        if requests is not None:
            requests.level -= 1
        if token_bucket is not None:
            token_bucket.level -= tokens
        return Admission(admitted=True, headers=self.headers())

    def snapshot(
        self, rpm: int | None, tpm: int | None, now: float
    ) -> tuple[tuple[bytes, bytes], ...]:
        """Return the ``x-ratelimit-*`` headers as of ``now``, charging nothing."""
        self._sync(rpm, tpm, now)
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refill(now)
        return self.headers()

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """Return the ``x-ratelimit-*`` headers for the buckets as they are now."""
        out: list[tuple[bytes, bytes]] = []
        for name, bucket in (("requests", self._requests), ("tokens", self._tokens)):
            if bucket is None:
                continue
            out.append((f"x-ratelimit-limit-{name}".encode(), str(bucket.capacity).encode()))
            out.append(
                (
                    f"x-ratelimit-remaining-{name}".encode(),
                    str(max(0, math.floor(bucket.level))).encode(),
                )
            )
            out.append(
                (f"x-ratelimit-reset-{name}".encode(), go_duration(bucket.reset_after()).encode())
            )
        return tuple(out)
