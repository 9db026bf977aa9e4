"""Client-side rate limits: bucket arithmetic, fairness, feedback, estimates.

Feedback from real provider headers is tested in test_provider_headers.py.
"""

from __future__ import annotations

import math
import random
import sys
import types
from collections.abc import Iterator

import attrs
import pytest
import trio
import trio.testing

from trio_llm import _estimate
from trio_llm._estimate import DEFAULT_COMPLETION_TOKENS, estimate_tokens
from trio_llm._ratelimit import (
    RateLimit,
    RateLimiter,
    RateLimitLevel,
    RateLimitLevels,
    Reservation,
)


async def acquire_and_log(
    limiter: RateLimiter, tokens: int, name: str, log: list[tuple[str, float]]
) -> Reservation:
    """Acquire, then note the name and the time it was granted."""
    reservation = await limiter.acquire(tokens)
    log.append((name, trio.current_time()))
    return reservation


async def acquire_cancellably(
    limiter: RateLimiter,
    name: str,
    log: list[tuple[str, float]],
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Acquire one request inside a cancel scope handed to the caller."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await acquire_and_log(limiter, 0, name, log)


def names(log: list[tuple[str, float]]) -> list[str]:
    """The names in a grant log, in grant order."""
    return [name for name, _ in log]


def times(log: list[tuple[str, float]]) -> list[float]:
    """The grant times in a grant log."""
    return [moment for _, moment in log]


async def start_in_order(
    nursery: trio.Nursery, limiter: RateLimiter, log: list[tuple[str, float]], *requests: int
) -> None:
    """Start one acquire per token count, each queued before the next one starts."""
    for number, tokens in enumerate(requests):
        nursery.start_soon(acquire_and_log, limiter, tokens, f"r{number}", log)
        await trio.testing.wait_all_tasks_blocked()


# --- RateLimit ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, True, "60"])
def test_rate_limit_rejects_non_positive_values(bad: object) -> None:
    """RateLimit accepts positive numbers or None and rejects anything else."""
    with pytest.raises(ValueError, match="requests_per_minute must be a positive number"):
        RateLimit(requests_per_minute=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens_per_minute must be a positive number"):
        RateLimit(tokens_per_minute=bad)  # type: ignore[arg-type]


def test_rate_limit_is_frozen_and_keyword_only() -> None:
    """RateLimit is a frozen, keyword-only attrs class that defaults to no limits."""
    limit = RateLimit(requests_per_minute=60)
    assert RateLimit() == RateLimit(requests_per_minute=None, tokens_per_minute=None)
    assert attrs.evolve(limit, tokens_per_minute=1000.5).tokens_per_minute == 1000.5
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        limit.requests_per_minute = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        RateLimit(60)  # type: ignore[call-arg]


def test_limiter_can_be_built_outside_trio() -> None:
    """A limiter is built before trio runs and reports its configured limit."""
    limiter = RateLimiter(RateLimit(requests_per_minute=5))
    assert limiter.limit.requests_per_minute == 5
    assert RateLimiter().limit == RateLimit()


# --- bucket arithmetic --------------------------------------------------------------------


async def test_requests_bucket_bursts_then_refills(autojump_clock: trio.testing.MockClock) -> None:
    """At 60 rpm, 60 requests pass at once, then one per second."""
    limiter = RateLimiter(RateLimit(requests_per_minute=60))
    times = []
    for _ in range(120):
        await limiter.acquire(0)
        times.append(trio.current_time())
    assert times[:60] == [0.0] * 60
    assert times[60:] == pytest.approx([float(k) for k in range(1, 61)])


async def test_tokens_bucket_bursts_then_refills(autojump_clock: trio.testing.MockClock) -> None:
    """At 600 tpm, 600 tokens pass at once, then 10 per second."""
    limiter = RateLimiter(RateLimit(tokens_per_minute=600))
    times = []
    for _ in range(9):
        await limiter.acquire(100)
        times.append(trio.current_time())
    assert times == pytest.approx([0, 0, 0, 0, 0, 0, 10, 20, 30])


async def test_the_tighter_bucket_decides(autojump_clock: trio.testing.MockClock) -> None:
    """With both limits, each request waits for whichever bucket is slower."""
    limiter = RateLimiter(RateLimit(requests_per_minute=120, tokens_per_minute=60))
    await limiter.acquire(60)
    await limiter.acquire(1)
    assert trio.current_time() == pytest.approx(1.0)
    for _ in range(119):
        await limiter.acquire(0)
    assert trio.current_time() == pytest.approx(1.0)
    await limiter.acquire(0)
    assert trio.current_time() == pytest.approx(1.5)


async def test_oversized_request_is_admitted_when_the_bucket_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request above capacity waits for a full bucket, then takes it below zero."""
    limiter = RateLimiter(RateLimit(tokens_per_minute=60))
    await limiter.acquire(30)
    await limiter.acquire(150)
    assert trio.current_time() == pytest.approx(30.0)
    assert limiter.statistics().tokens_available == pytest.approx(-90)
    await limiter.acquire(10)
    assert trio.current_time() == pytest.approx(130.0)


async def test_unlimited_limiter_never_waits(autojump_clock: trio.testing.MockClock) -> None:
    """A limiter with no limits grants everything at once and reports no levels."""
    limiter = RateLimiter()
    for _ in range(1000):
        await limiter.acquire(10**9)
    stats = limiter.statistics()
    assert trio.current_time() == 0
    assert stats.requests_available is None
    assert stats.tokens_available is None
    assert stats.requests_per_minute is None
    (await limiter.acquire(5)).refund()
    assert limiter.statistics() == stats


async def test_acquire_is_a_checkpoint_even_when_free() -> None:
    """A cancelled acquire raises Cancelled and takes nothing, even with capacity free."""
    limiter = RateLimiter(RateLimit(requests_per_minute=10))
    with trio.CancelScope() as scope:
        scope.cancel()
        await limiter.acquire(1)
    assert scope.cancelled_caught
    assert limiter.statistics().requests_available == 10


async def test_acquire_nowait(autojump_clock: trio.testing.MockClock) -> None:
    """acquire_nowait takes capacity or raises WouldBlock, and validates its argument."""
    limiter = RateLimiter(RateLimit(requests_per_minute=2))
    limiter.acquire_nowait(5)
    limiter.acquire_nowait(5)
    with pytest.raises(trio.WouldBlock):
        limiter.acquire_nowait(0)
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        limiter.acquire_nowait(-1)
    with pytest.raises(TypeError, match="tokens must be an int"):
        await limiter.acquire(1.5)  # type: ignore[arg-type]


# --- fairness and cancellation --------------------------------------------------------------


async def test_big_request_is_not_starved_by_later_small_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Waiters are served in arrival order: small ones queue behind the big one."""
    limiter = RateLimiter(RateLimit(tokens_per_minute=600))
    await limiter.acquire(600)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, limiter, log, 500, *[10] * 5)
    assert names(log) == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert times(log) == pytest.approx([50, 51, 52, 53, 54, 55])


async def test_newcomer_waits_behind_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    """While anyone waits, a new acquire queues even if the buckets could cover it."""
    limiter = RateLimiter(RateLimit(tokens_per_minute=60))
    await limiter.acquire(50)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, limiter, log, 60)
        with pytest.raises(trio.WouldBlock):
            limiter.acquire_nowait(1)
        nursery.start_soon(acquire_and_log, limiter, 1, "newcomer", log)
    assert names(log) == ["r0", "newcomer"]
    assert times(log) == pytest.approx([50, 51])


async def test_many_waiters_get_exactly_the_rate_in_arrival_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Hundreds of queued requests of mixed sizes are served in order at the full rate."""
    rng = random.Random(3)
    sizes = [rng.randint(1, 500) for _ in range(300)]
    limiter = RateLimiter(RateLimit(tokens_per_minute=6000))
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, limiter, log, *sizes)
    assert names(log) == [f"r{number}" for number in range(300)]
    # No capacity is lost between one waiter and the next: the last is granted exactly
    # when the bucket has produced everything asked beyond its initial 6000.
    assert log[-1][1] == pytest.approx((sum(sizes) - 6000) / 100)


async def test_cancelled_head_takes_nothing_and_the_next_proceeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling the first waiter lets the second have the capacity it would have had."""
    limiter = RateLimiter(RateLimit(requests_per_minute=60))
    for _ in range(60):
        await limiter.acquire(0)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        head_scope = await nursery.start(acquire_cancellably, limiter, "head", log)
        await trio.testing.wait_all_tasks_blocked()
        await start_in_order(nursery, limiter, log, 0)
        assert limiter.statistics().waiting == 2
        await trio.sleep(0.5)
        head_scope.cancel()
    assert names(log) == ["r0"]
    assert times(log) == pytest.approx([1.0])
    assert limiter.statistics().requests_available == pytest.approx(0.0)
    assert limiter.statistics().waiting == 0


async def test_cancelled_middle_waiter_leaves_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter cancelled mid-queue is removed; the ones around it keep their turns."""
    limiter = RateLimiter(RateLimit(requests_per_minute=60))
    for _ in range(60):
        await limiter.acquire(0)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, limiter, log, 0)
        middle_scope = await nursery.start(acquire_cancellably, limiter, "middle", log)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(acquire_and_log, limiter, 0, "last", log)
        await trio.testing.wait_all_tasks_blocked()
        middle_scope.cancel()
    assert names(log) == ["r0", "last"]
    assert times(log) == pytest.approx([1.0, 2.0])


# --- reservations -----------------------------------------------------------------------------


async def test_refund_restores_capacity_and_wakes_the_head(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A refund returns the request and its tokens; a waiter proceeds at once."""
    limiter = RateLimiter(RateLimit(requests_per_minute=2, tokens_per_minute=1000))
    first = await limiter.acquire(400)
    await limiter.acquire(400)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, limiter, log, 300)
        await trio.sleep(0.25)
        first.refund()
    assert times(log) == pytest.approx([0.25])
    stats = limiter.statistics()
    assert stats.requests_available == pytest.approx(2 / 60 * 0.25)
    assert stats.tokens_available == pytest.approx(1000 / 60 * 0.25 + 300)


async def test_reconcile_returns_or_charges_the_difference(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Reconcile gives back an overestimate and charges an underestimate."""
    limiter = RateLimiter(RateLimit(tokens_per_minute=600))
    over = await limiter.acquire(300)
    over.reconcile(100)
    assert limiter.statistics().tokens_available == 500
    under = await limiter.acquire(300)
    under.reconcile(700)
    assert limiter.statistics().tokens_available == -200
    await limiter.acquire(100)
    assert trio.current_time() == pytest.approx(30.0)


async def test_settling_is_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    """Only the first reconcile or refund counts; later calls change nothing."""
    limiter = RateLimiter(RateLimit(requests_per_minute=10, tokens_per_minute=600))
    reservation = await limiter.acquire(100)
    reservation.reconcile(50)
    reservation.refund()
    reservation.reconcile(0)
    reservation.refund()
    stats = limiter.statistics()
    assert (stats.requests_available, stats.tokens_available) == (9, 550)
    refunded = await limiter.acquire(100)
    refunded.refund()
    refunded.refund()
    refunded.reconcile(1000)
    stats = limiter.statistics()
    assert (stats.requests_available, stats.tokens_available) == (9, 550)
    assert "settled=True" in repr(refunded)
    exact = await limiter.acquire(50)
    exact.reconcile(50)
    assert limiter.statistics().tokens_available == 500
    with pytest.raises(ValueError, match="actual_tokens"):
        (await limiter.acquire(1)).reconcile(-1)


async def test_refund_never_overfills(autojump_clock: trio.testing.MockClock) -> None:
    """A refund into a bucket that refilled meanwhile stops at capacity."""
    limiter = RateLimiter(RateLimit(requests_per_minute=60, tokens_per_minute=60))
    reservation = await limiter.acquire(30)
    await trio.sleep(60)
    reservation.refund()
    stats = limiter.statistics()
    assert (stats.requests_available, stats.tokens_available) == (60, 60)


# --- pause ------------------------------------------------------------------------------------


async def test_pause_blocks_everyone_and_only_extends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A pause holds every acquire until it ends; a shorter pause does not shorten it."""
    limiter = RateLimiter(RateLimit(requests_per_minute=1000))
    limiter.pause(10)
    with pytest.raises(trio.WouldBlock):
        limiter.acquire_nowait(0)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, limiter, log, 0, 0, 0)
        await trio.sleep(2)
        limiter.pause(3)
        assert limiter.statistics().pause_remaining == pytest.approx(8)
        await trio.sleep(2)
        limiter.pause(11)
    assert times(log) == pytest.approx([15, 15, 15])
    assert limiter.statistics().pause_remaining == 0


async def test_pause_ignores_nonsense(autojump_clock: trio.testing.MockClock) -> None:
    """Non-positive, NaN and infinite pauses are ignored."""
    limiter = RateLimiter()
    for seconds in (0, -5, math.nan, math.inf):
        limiter.pause(seconds)
    assert limiter.statistics().pause_remaining == 0
    limiter.acquire_nowait(1)


async def test_statistics_count_waiters(autojump_clock: trio.testing.MockClock) -> None:
    """statistics() reports the tasks waiting, the levels and the limits in force."""
    limiter = RateLimiter(RateLimit(requests_per_minute=1, tokens_per_minute=100))
    await limiter.acquire(40)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        await start_in_order(nursery, limiter, log, 1, 1, 1)
        stats = limiter.statistics()
        assert stats.waiting == 3
        assert (stats.requests_available, stats.tokens_available) == (0, 60)
        assert (stats.requests_per_minute, stats.tokens_per_minute) == (1, 100)
        assert "waiting=3" in repr(limiter)
    assert times(log) == pytest.approx([60, 120, 180])


# --- server feedback ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"limit": 0},
        {"limit": True},
        {"limit": math.inf},
        {"remaining": -1},
        {"remaining": math.nan},
        {"reset_seconds": -0.5},
        {"reset_seconds": "1s"},
    ],
)
def test_levels_reject_nonsense(fields: dict[str, object]) -> None:
    """A level holds no zero or negative limit, negative count, non-finite or non-number."""
    with pytest.raises(ValueError, match="must be"):
        RateLimitLevel(**fields)  # type: ignore[arg-type]


async def test_update_without_levels_changes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """update(None) and levels that report nothing leave the limiter as it was."""
    limiter = RateLimiter(RateLimit(requests_per_minute=60))
    await limiter.acquire(10)
    before = limiter.statistics()
    limiter.update(None)
    limiter.update(RateLimitLevels())
    assert limiter.statistics() == before


@pytest.mark.parametrize(("per_direction", "tokens_available"), [(False, 0), (True, 9990)])
async def test_per_direction_token_limits_leave_out_what_is_in_flight(
    autojump_clock: trio.testing.MockClock, per_direction: bool, tokens_available: float
) -> None:
    """In-flight totals count against a first tokens limit unless it is per direction."""
    limiter = RateLimiter()
    for _ in range(5):
        await limiter.acquire(2300)
    limiter.update(
        RateLimitLevels(
            requests=RateLimitLevel(limit=50, remaining=49),
            tokens=RateLimitLevel(limit=10_000, remaining=9990),
            tokens_per_direction=per_direction,
        )
    )
    stats = limiter.statistics()
    assert stats.requests_available == 45
    assert stats.tokens_available == tokens_available


# --- estimates --------------------------------------------------------------------------------


@pytest.fixture
def no_tiktoken(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make tiktoken unimportable, as when it is not installed."""
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    _estimate._tiktoken_encoding.cache_clear()
    yield
    _estimate._tiktoken_encoding.cache_clear()


@pytest.mark.usefixtures("no_tiktoken")
def test_estimate_for_a_string_prompt() -> None:
    """A chat counts ceil(chars/4), 4 per message, 3 for the reply, and the default."""
    body = {"messages": [{"role": "user", "content": "a" * 41}]}
    assert estimate_tokens(body) == 11 + 4 + 3 + DEFAULT_COMPLETION_TOKENS


@pytest.mark.usefixtures("no_tiktoken")
def test_estimate_uses_max_tokens() -> None:
    """max_completion_tokens, else max_tokens, sets the completion part, times n."""
    messages = [
        {"role": "system", "content": "b" * 20},
        {"role": "user", "content": "a" * 20, "name": "cara"},
    ]
    prompt = 11 + 2 * 4 + 3
    assert estimate_tokens({"messages": messages, "max_tokens": 100}) == prompt + 100
    assert (
        estimate_tokens({"messages": messages, "max_tokens": 100, "max_completion_tokens": 7})
        == prompt + 7
    )
    assert estimate_tokens({"messages": messages, "max_tokens": 10, "n": 3}) == prompt + 30
    assert estimate_tokens({"messages": messages, "max_tokens": True}) == (
        prompt + DEFAULT_COMPLETION_TOKENS
    )


@pytest.mark.usefixtures("no_tiktoken")
def test_estimate_for_content_parts() -> None:
    """Text parts count by characters and each image as a fixed cost, not its bytes."""
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a" * 40},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + "x" * 10**5},
                    },
                ],
            }
        ],
        "max_tokens": 0,
    }
    assert estimate_tokens(body) == 10 + 765 + 4 + 3


@pytest.mark.usefixtures("no_tiktoken")
def test_estimate_for_anthropic_system_tools_and_tool_calls() -> None:
    """Anthropic system prompts, tool calls and tool definitions count too."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {
        "system": [{"type": "text", "text": "s" * 8, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}" * 4}}]},
        ],
        "tools": tools,
        "max_tokens": 1,
    }
    tools_chars = len('[{"type":"function","function":{"name":"f","parameters":{}}}]')
    assert estimate_tokens(body) == math.ceil((8 + 8 + tools_chars) / 4) + 4 + 3 + 1


@pytest.mark.usefixtures("no_tiktoken")
def test_estimate_for_embeddings_counts_input_only() -> None:
    """An embeddings body counts its input: text by characters, token ids exactly."""
    assert estimate_tokens({"model": "e", "input": "a" * 10}) == 3
    assert estimate_tokens({"input": ["aaaa", "bbbbbbbb"]}) == 3
    assert estimate_tokens({"input": [1, 2, 3]}) == 3
    assert estimate_tokens({"input": [[1, 2], [3]]}) == 3
    assert estimate_tokens({"input": []}) == 0


@pytest.mark.usefixtures("no_tiktoken")
def test_estimate_for_a_legacy_prompt() -> None:
    """A completions-style prompt counts its text plus the completion."""
    assert estimate_tokens({"prompt": "a" * 8, "max_tokens": 2}) == 4


def test_estimate_falls_back_when_tiktoken_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """When tiktoken is installed but cannot load its encoding, characters count."""

    def get_encoding(name: str) -> object:
        raise OSError("offline: cannot download o200k_base")

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=get_encoding))
    _estimate._tiktoken_encoding.cache_clear()
    try:
        assert estimate_tokens({"input": "a" * 12}) == 3
    finally:
        _estimate._tiktoken_encoding.cache_clear()


def test_estimate_uses_tiktoken_when_it_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a loadable encoding, text is counted by the encoder."""

    class Encoding:
        def encode(self, text: str, disallowed_special: object = ()) -> list[str]:
            return text.split()

    names: list[str] = []

    def get_encoding(name: str) -> Encoding:
        names.append(name)
        return Encoding()

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=get_encoding))
    _estimate._tiktoken_encoding.cache_clear()
    try:
        assert estimate_tokens({"input": "one two three four five"}) == 5
        assert estimate_tokens({"input": "six"}) == 1
        assert names == ["o200k_base"]
    finally:
        _estimate._tiktoken_encoding.cache_clear()
