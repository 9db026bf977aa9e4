"""Rate limits shared through Redis: the buckets of :class:`RateLimiter`, kept in Redis.

A limit shared by several processes (replicas of ``trio-llm serve``, shards of a batch
job, on any number of machines) is one Redis hash holding two continuous token buckets
(requests and tokens per minute, the model of ``_ratelimit``), the limits learned from
rate-limit headers, and the end of the pause after a 429. One Lua script does every
operation atomically, on Redis's own clock (``TIME``), so the machines' clocks never
meet:

- settle: give back (a refund, a reconcile's difference: possibly negative), then apply
  the levels a response reported, then extend the pause; one call carries every
  settlement made since the previous one;
- then take: one request and the token estimate if both buckets hold them (and no pause
  runs), else say how many seconds until they would;
- or peek: the state, for statistics.

:class:`RateLimiter` keeps its queue (strict arrival order within a process) and calls
:meth:`RedisBuckets.take` for its head; the settlements, which happen where no ``await``
is possible, are queued, and go out with the next take, or are sent by a background task
when none comes: one round trip per request when requests follow each other. A process
that dies with reservations held leaks nothing for longer than the window: what it took
is refilled at the limit's rate like any use, and the hash expires once the buckets would
be full.

A waiting process asks again when the script said (with jitter, so that processes told
the same do not come back at once), and at least every second, so that capacity another
process gives back is found soon; this process's own give-backs wake its first waiter as
soon as they reach Redis.

When Redis stops answering, calls wait for it and try again (backing off up to a second,
with jitter), and raise :class:`SharedLimitError` only when the next try would come after
their retry deadline: a call never runs without its limit. Settlements that did not reach
Redis go with the next try, except the capacity one gave back if it timed out (Redis may
run it later): that comes back with the refill instead, never twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final, Protocol, final

import trio

from ._errors import SharedLimitError, redact_url
from ._fanout import open_owning_nursery
from ._ratelimit import RateLimit, RateLimiter, RateLimitLevel, RateLimitLevels
from ._redis import RedisConnection, RedisUnavailable, open_redis

__all__ = ["RedisBuckets", "SharedBuckets", "limit_key", "open_rate_limiter"]

logger = logging.getLogger("trio_llm.ratelimit")

#: The prefix of every key trio-llm's shared limits use.
KEY_PREFIX: Final = "trio-llm:limit:"
# Waits while Redis does not answer: the first, and the longest (doubling in between).
_FIRST_BACKOFF: Final = 0.05
_MAX_BACKOFF: Final = 1.0
# A wait the script asks for gets up to this share more, so that processes told the
# same time do not all come back at once; at most _MAX_JITTER seconds more.
_JITTER: Final = 0.1
_MAX_JITTER: Final = 0.05
# The longest a waiting process goes without asking again: capacity another process gives
# back (a refund, an estimate reconciled) is found within it.
_MAX_WAIT: Final = 1.0
# Seconds the last settlements may take to reach Redis when the client closes.
_CLOSE_FLUSH_TIMEOUT: Final = 2.0

# KEYS[1]: the hash. ARGV[1]: "peek", or "run" (settle, then take); ARGV[2], ARGV[3]: the
# caller's configured requests and tokens per minute ("" for none); ARGV[4]: the tokens
# to take ("": take nothing); ARGV[5..16]: the settlement (see _Pending.args). Numbers
# cross as strings: a Lua number returned to Redis is truncated to an integer, and
# tostring() keeps 14 digits.
_SCRIPT: Final = """
local key = KEYS[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local WINDOW = 60
local op = ARGV[1]
local f = redis.call('HMGET', key, 'rc', 'rl', 'rs', 'rn', 'tc', 'tl', 'ts', 'tn', 'p')

local function num(v)
  if v == false or v == nil or v == '' then return nil end
  return tonumber(v)
end
local function str(v)
  if v == nil then return '' end
  return string.format('%.17g', v)
end

local function bucket(i, configured)
  return {cap = num(f[i]), level = num(f[i + 1]), stamp = num(f[i + 2]),
          learned = num(f[i + 3]), configured = num(configured)}
end
local r = bucket(1, ARGV[2])
local t = bucket(5, ARGV[3])
local pause = num(f[9])

local function refill(b)
  if b.cap == nil then return end
  if b.stamp ~= nil and now > b.stamp then
    b.level = math.min(b.cap, b.level + (now - b.stamp) * b.cap / WINDOW)
  end
  b.stamp = now
end

-- The capacity in force: the lower of the caller's configured limit and the learned one;
-- with neither, the one in force already (another process's). A new bucket starts full
-- (less what the caller has in flight); a changed one keeps its level, up to the cap.
local function enforce(b, in_flight)
  local cap = b.configured
  if b.learned ~= nil and (cap == nil or b.learned < cap) then cap = b.learned end
  if cap == nil then cap = b.cap end
  if cap == nil then return end
  if b.cap == nil or b.level == nil then
    b.level = math.max(0, cap - in_flight)
  else
    refill(b)
    b.level = math.min(b.level, cap)
  end
  b.cap = cap
  b.stamp = now
end

local function need(b, amount)
  if b.cap == nil then return 0 end
  local missing = math.min(amount, b.cap) - b.level
  if missing <= 1e-9 * b.cap then return 0 end
  return missing / (b.cap / WINDOW)
end

local function give(b, amount)
  if b.cap ~= nil and amount ~= 0 then b.level = math.min(b.cap, b.level + amount) end
end

-- The server's level: the lower remaining wins; an exhausted bucket refills no sooner
-- than the server's (see RateLimiter.update).
local function correct(b, limit, remaining, reset, in_flight)
  if limit ~= nil then
    b.learned = limit
    enforce(b, in_flight)
  end
  if b.cap == nil or remaining == nil then return end
  b.level = math.min(b.level, remaining)
  if remaining < 1 and reset ~= nil and reset > 0 then
    local server = limit or b.cap
    b.level = math.min(b.level, 1 - (b.cap / WINDOW) * reset / server)
  end
end

local function pause_left()
  if pause ~= nil and pause > now then return pause - now end
  return 0
end

local function reply(granted, wait)
  return {granted, str(wait), str(r.cap), str(r.level), str(t.cap), str(t.level),
          str(pause_left())}
end

if op == 'peek' then
  refill(r)
  refill(t)
  return reply('0', 0)
end

enforce(r, 0)
enforce(t, 0)
give(r, tonumber(ARGV[5]))
give(t, tonumber(ARGV[6]))
if ARGV[8] == '1' then
  correct(r, num(ARGV[9]), num(ARGV[10]), num(ARGV[11]), tonumber(ARGV[15]))
  correct(t, num(ARGV[12]), num(ARGV[13]), num(ARGV[14]), tonumber(ARGV[16]))
end
local seconds = tonumber(ARGV[7])
if seconds > 0 and (pause == nil or now + seconds > pause) then pause = now + seconds end
local granted = '1'
local wait = 0
local tokens = num(ARGV[4])
if tokens ~= nil then
  wait = math.max(pause_left(), need(r, 1), need(t, tokens))
  if wait > 0 then
    granted = '0'
  else
    if r.cap ~= nil then r.level = r.level - 1 end
    if t.cap ~= nil then t.level = t.level - tokens end
  end
end

redis.call('HSET', key, 'rc', str(r.cap), 'rl', str(r.level), 'rs', str(r.stamp),
           'rn', str(r.learned), 'tc', str(t.cap), 'tl', str(t.level), 'ts', str(t.stamp),
           'tn', str(t.learned), 'p', str(pause))
-- Kept while it matters: until both buckets would be full and the pause over, and at
-- least a window (for the learned limits); a process that died leaks nothing longer.
local ttl = WINDOW + 1
for _, b in ipairs({r, t}) do
  if b.cap ~= nil then ttl = math.max(ttl, (b.cap - b.level) / (b.cap / WINDOW) + 1) end
end
ttl = math.max(ttl, pause_left() + 1)
redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
return reply(granted, wait)
"""


def limit_key(limit: RateLimit, base_url: str, api_key: str | None) -> str:
    """Return the Redis key of ``limit``'s shared buckets.

    ``limit.name`` if given; else the base URL (credentials hidden) and a hash of the
    full base URL and the API key: every client of the same key and URL shares it, and
    the key itself never reaches Redis.
    """
    if limit.name is not None:
        return KEY_PREFIX + limit.name
    digest = hashlib.sha256(f"{base_url}\n{api_key or ''}".encode()).hexdigest()[:32]
    return f"{KEY_PREFIX}{redact_url(base_url)}:{digest}"


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _parse(value: bytes) -> float | None:
    return float(value) if value else None


def _jittered(seconds: float) -> float:
    seconds = min(seconds, _MAX_WAIT)
    return seconds + random.uniform(0.0, min(seconds * _JITTER, _MAX_JITTER))


@final
class _Pending:
    """Settlements not yet sent: sums of what is given back, the pause, the last levels."""

    __slots__ = ("levels", "pause_until", "requests", "tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.tokens = 0
        self.pause_until = -math.inf  # trio time
        # The latest levels reported, with the requests and tokens in flight then.
        self.levels: tuple[RateLimitLevels, int, int] | None = None

    def __bool__(self) -> bool:
        return bool(self.requests or self.tokens or self.levels) or self.pause_until > -math.inf

    def args(self) -> list[str]:
        """The script's ARGV[5..16]: give back, pause, and the levels (if any)."""
        pause = max(0.0, self.pause_until - trio.current_time())
        args = [str(self.requests), str(self.tokens), repr(pause)]
        if self.levels is None:
            return [*args, "0"]
        levels, in_flight_requests, in_flight_tokens = self.levels
        args += ["1", *_level_args(levels.requests), *_level_args(levels.tokens)]
        return [*args, str(in_flight_requests), str(in_flight_tokens)]

    def merge(self, later: _Pending) -> None:
        """Add ``later``'s settlements to these (a failed send is tried again with them)."""
        self.requests += later.requests
        self.tokens += later.tokens
        self.pause_until = max(self.pause_until, later.pause_until)
        if later.levels is not None:
            self.levels = later.levels


def _level_args(level: RateLimitLevel) -> list[str]:
    return [_number(level.limit), _number(level.remaining), _number(level.reset_seconds)]


_NOTHING_PENDING: Final = ["0", "0", "0.0", "0"]


class SharedBuckets(Protocol):
    """Buckets kept outside the process, as a :class:`RateLimiter` uses them (``RedisBuckets``).

    A :class:`RateLimiter` built with them keeps its queue, its statistics and its own
    pause (at once, before the shared one lands), and leaves the buckets to them.
    """

    async def take(self, tokens: int) -> float:
        """Take one request and ``tokens`` (return 0), or return the seconds to wait."""
        ...

    def give(self, requests: int, tokens: int) -> None:
        """Give back ``requests`` and ``tokens`` (negative: charge more)."""
        ...

    def pause(self, seconds: float) -> None:
        """Pause every client of the buckets for ``seconds``."""
        ...

    def update(
        self, levels: RateLimitLevels, in_flight_requests: int, in_flight_tokens: int
    ) -> None:
        """Apply the levels a response reported (see :meth:`RateLimiter.update`)."""
        ...

    #: Set by the limiter: called when give-backs have reached the shared buckets.
    on_capacity: Callable[[], None]

    @property
    def state(self) -> tuple[float | None, ...]:
        """The last state seen: requests limit and level, tokens limit and level."""
        ...


@final
class RedisBuckets:
    """The shared buckets of one limit, as a :class:`RateLimiter` uses them.

    Built by :func:`open_rate_limiter`, which runs :meth:`run` (the sender of the
    settlements) in its nursery.
    """

    def __init__(self, redis: RedisConnection, key: str, limit: RateLimit) -> None:
        self._redis = redis
        self._script = redis.script(_SCRIPT)
        self._keys = (key,)
        self._configured = (_number(limit.requests_per_minute), _number(limit.tokens_per_minute))
        self._pending = _Pending()
        self._wake = trio.Event()
        self._down_since: float | None = None
        self.key = key
        # The state the last reply showed: (requests cap, level, tokens cap, level).
        self.state: tuple[float | None, ...] = (None, None, None, None)
        self.round_trips = 0
        #: Called when settlements that gave capacity back reached Redis (set by the
        #: limiter that uses these buckets).
        self.on_capacity: Callable[[], None]

    @property
    def url(self) -> str:
        """The Redis URL, credentials hidden."""
        return self._redis.url

    async def _call(
        self, op: str, tokens: str = "", pending: _Pending | None = None
    ) -> tuple[bool, float]:
        """Run the script once; return (granted, seconds to wait), keeping the state.

        ``pending`` goes with it; if the call fails, it is queued again, but for what it
        gave back when the call may have run (a timeout): given twice, capacity would be
        made up, while capacity not given back comes back with the refill anyway.

        Raises:
            RedisUnavailable: Redis refused or did not answer.
        """
        settle = _NOTHING_PENDING if pending is None else pending.args()
        args = (op, *self._configured, tokens, *settle)
        try:
            reply = await self._redis.run(self._script, self._keys, args)
        except RedisUnavailable as exc:
            if pending is not None:
                if exc.maybe_ran:  # charges, the pause and levels may apply twice
                    pending.requests = min(pending.requests, 0)
                    pending.tokens = min(pending.tokens, 0)
                pending.merge(self._pending)
                self._pending = pending
            raise
        self.round_trips += 1
        self.state = tuple(_parse(value) for value in reply[2:6])
        if self._down_since is not None:
            logger.warning(
                "the shared rate limit's Redis at %s answers again (after %.1f s)",
                self.url,
                trio.current_time() - self._down_since,
            )
            self._down_since = None
        return reply[0] == b"1", float(reply[1])

    def _unavailable(self, exc: RedisUnavailable) -> float:
        """Note an outage; return how long it has lasted."""
        now = trio.current_time()
        if self._down_since is None:
            self._down_since = now
            logger.warning(
                "the shared rate limit's Redis at %s does not answer (%s); calls wait for "
                "it, each up to its retry deadline",
                self.url,
                str(exc),
            )
        return now - self._down_since

    async def check(self) -> None:
        """Run the script once (it is loaded, and the state read).

        Raises:
            RedisUnavailable: Redis refused or did not answer.
        """
        await self._call("peek")

    async def take(self, tokens: int) -> float:
        """Take one request and ``tokens`` if the shared buckets hold them; else say when.

        Returns:
            0 if taken; else the seconds to wait before asking again (with jitter).

        Raises:
            SharedLimitError: Redis has not answered, and the next try would come after
                the deadline of the enclosing cancel scopes (the call's retry deadline).

        Cancellation: nothing is taken (a take that Redis made as the call was cancelled
        is given back).
        """
        backoff = _FIRST_BACKOFF
        while True:
            try:
                # Shielded (the script is bounded by its own timeout): a take must not
                # be lost between Redis doing it and this process knowing.
                pending, self._pending = self._pending, _Pending()
                with trio.CancelScope(shield=True):
                    granted, wait = await self._call("run", str(tokens), pending)
            except RedisUnavailable as exc:
                lasted = self._unavailable(exc)
                pause = _jittered(backoff)
                if trio.current_time() + pause >= trio.current_effective_deadline():
                    raise SharedLimitError(
                        f"the shared rate limit's Redis at {self.url} has not answered for "
                        f"{lasted:.1f} s ({exc}); the call's deadline passes before it "
                        "could be asked again",
                        url=self.url,
                    ) from exc
                await trio.sleep(pause)
                backoff = min(backoff * 2.0, _MAX_BACKOFF)
                continue
            if not granted:
                return _jittered(wait)
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except trio.Cancelled:
                self.give(1, tokens)
                raise
            return 0.0

    def give(self, requests: int, tokens: int) -> None:
        """Give back ``requests`` and ``tokens`` (negative: charge more), soon."""
        self._pending.requests += requests
        self._pending.tokens += tokens
        self._wake.set()

    def pause(self, seconds: float) -> None:
        """Pause every client of the limit for ``seconds`` from now, soon."""
        self._pending.pause_until = max(self._pending.pause_until, trio.current_time() + seconds)
        self._wake.set()

    def update(
        self, levels: RateLimitLevels, in_flight_requests: int, in_flight_tokens: int
    ) -> None:
        """Apply the ``levels`` a response reported, soon (see :meth:`RateLimiter.update`)."""
        self._pending.levels = (levels, in_flight_requests, in_flight_tokens)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the settlements as they come, batched; retry while Redis does not answer.

        Cancellation: a settlement being sent is sent (or fails) first; those not sent
        yet stay queued (see :meth:`flush`).
        """
        task_status.started()
        backoff = _FIRST_BACKOFF
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            pending, self._pending = self._pending, _Pending()
            if not pending:
                continue  # a take carried it
            try:
                # Shielded (bounded by the command timeout): a settlement in flight is
                # not lost when the client closes.
                with trio.CancelScope(shield=True):
                    await self._call("run", "", pending)
            except RedisUnavailable as exc:
                self._unavailable(exc)
                await trio.sleep(_jittered(backoff))
                backoff = min(backoff * 2.0, _MAX_BACKOFF)
                self._wake.set()
                continue
            backoff = _FIRST_BACKOFF
            if pending.requests > 0 or pending.tokens > 0:
                self.on_capacity()

    async def flush(self) -> None:
        """Send what is still queued, for up to a few seconds (when the client closes).

        Never raises: settlements Redis cannot take are dropped with a warning (what
        they would have given back is refilled within the window anyway).

        Cancellation: shielded; bounded by its own timeout.
        """
        pending, self._pending = self._pending, _Pending()
        if not pending:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_FLUSH_TIMEOUT):
            try:
                await self._call("run", "", pending)
            except RedisUnavailable as exc:
                logger.warning(
                    "the last settlements of the shared rate limit could not reach Redis at "
                    "%s (%s); the capacity they held comes back within a minute",
                    self.url,
                    str(exc),
                )


@asynccontextmanager
async def open_rate_limiter(
    limit: RateLimit | None, *, base_url: str, api_key: str | None
) -> AsyncIterator[RateLimiter | None]:
    """Open the rate limiter ``limit`` describes: none, this client's own, or shared.

    A shared one connects to Redis at once, so a wrong URL or a Redis that is down fails
    here, not at the first call.

    Raises:
        SharedLimitError: the shared limit's Redis does not answer (or refuses).
        ConfigurationError: the ``redis`` extra is missing, or the URL is unusable.

    Leaving the block sends the last settlements (a few seconds at most) and closes the
    connections. Cancellation: the same.
    """
    if limit is None or limit.shared is None:
        yield None if limit is None else RateLimiter(limit)
        return
    shown = redact_url(limit.shared)
    failure: RedisUnavailable | None = None
    try:
        async with open_redis(limit.shared) as redis:
            buckets = RedisBuckets(redis, limit_key(limit, base_url, api_key), limit)
            try:
                await buckets.check()
            except RedisUnavailable as exc:
                failure = exc
            if failure is None:
                async with open_owning_nursery() as nursery:
                    await nursery.start(buckets.run)
                    try:
                        yield RateLimiter(limit, shared=buckets)
                    finally:
                        await buckets.flush()
                    nursery.cancel_scope.cancel()
    except RedisUnavailable as exc:
        failure = exc
    if failure is not None:
        raise SharedLimitError(
            f"cannot use the shared rate limit's Redis at {shown}: {failure}", url=shown
        ) from failure
