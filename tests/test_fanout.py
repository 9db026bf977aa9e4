"""Bounded fan-out: order, the window, laziness, cancellation and failure."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import pytest
import trio
import trio.testing

from trio_llm._fanout import as_completed, capture_errors, map_concurrently
from trio_llm._types import Result


class Tracker:
    """Counts calls in flight, the peak, and what became of each call."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started: list[int] = []
        self.finished: list[int] = []
        self.cancelled: list[int] = []
        self.tasks: set[trio.lowlevel.Task] = set()

    async def sleep_then_return(self, item: tuple[int, float]) -> int:
        index, delay = item
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.append(index)
        self.tasks.add(trio.lowlevel.current_task())
        try:
            await trio.sleep(delay)
        except trio.Cancelled:
            self.cancelled.append(index)
            raise
        finally:
            self.running -= 1
        self.finished.append(index)
        return index


async def test_map_preserves_input_order_with_random_delays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Results come back in input order whatever order the calls finish in."""
    rng = random.Random(7)
    tracker = Tracker()
    items = [(i, rng.uniform(0.1, 5.0)) for i in range(200)]
    results = await map_concurrently(tracker.sleep_then_return, items, limit=16)
    assert results == list(range(200))
    assert tracker.finished != sorted(tracker.finished)


@pytest.mark.parametrize(("n", "limit"), [(10, 3), (64, 8), (7, 7), (5, 1)])
async def test_window_stays_full_at_the_limit(
    autojump_clock: trio.testing.MockClock, n: int, limit: int
) -> None:
    """Peak concurrency equals the limit and N equal calls take ceil(N/limit) durations."""
    tracker = Tracker()
    start = trio.current_time()
    await map_concurrently(tracker.sleep_then_return, [(i, 1.0) for i in range(n)], limit=limit)
    assert trio.current_time() - start == math.ceil(n / limit) * 1.0
    assert tracker.peak == limit


async def test_only_min_limit_n_workers(autojump_clock: trio.testing.MockClock) -> None:
    """A short input runs on as many worker tasks as it has items, a long one on limit."""
    short, long = Tracker(), Tracker()
    await map_concurrently(short.sleep_then_return, [(i, 1.0) for i in range(3)], limit=50)
    await map_concurrently(long.sleep_then_return, [(i, 1.0) for i in range(30)], limit=4)
    assert len(short.tasks) == 3
    assert len(long.tasks) == 4


async def test_generator_is_consumed_lazily(autojump_clock: trio.testing.MockClock) -> None:
    """No more than limit items are pulled from a generator ahead of finished work."""
    pulled = 0
    done = 0
    ahead: list[int] = []

    def items() -> Iterator[int]:
        nonlocal pulled
        for i in range(100):
            pulled += 1
            ahead.append(pulled - done)
            yield i

    async def work(i: int) -> int:
        nonlocal done
        await trio.sleep(1 + i % 3)
        done += 1
        return i

    assert await map_concurrently(work, items(), limit=5) == list(range(100))
    assert max(ahead) <= 5


async def test_async_iterable_input(autojump_clock: trio.testing.MockClock) -> None:
    """An async iterable is accepted, consumed lazily, and results keep its order."""
    pulled = 0
    done = 0
    ahead: list[int] = []

    async def items() -> AsyncIterator[int]:
        nonlocal pulled
        for i in range(50):
            await trio.sleep(0.01)
            pulled += 1
            ahead.append(pulled - done)
            yield i

    async def work(i: int) -> int:
        nonlocal done
        await trio.sleep(5 - i % 5)
        done += 1
        return i * 2

    assert await map_concurrently(work, items(), limit=4) == [i * 2 for i in range(50)]
    assert max(ahead) <= 4 + 1


async def test_slow_async_source_spawns_no_idle_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When the source is slower than the work, one worker does it all."""
    tracker = Tracker()

    async def items() -> AsyncIterator[tuple[int, float]]:
        for i in range(10):
            await trio.sleep(1.0)
            yield (i, 0.5)

    assert await map_concurrently(tracker.sleep_then_return, items(), limit=8) == list(range(10))
    assert len(tracker.tasks) == 1


async def test_empty_input() -> None:
    """An empty input gives an empty list and an as_completed that yields nothing."""

    async def never(x: int) -> int:
        raise AssertionError("never called")

    async def nothing() -> AsyncIterator[int]:
        return
        yield

    assert await map_concurrently(never, [], limit=3) == []
    assert await map_concurrently(never, nothing(), limit=3) == []
    async with as_completed(never, [], limit=3) as results:
        assert [pair async for pair in results] == []


async def test_empty_input_is_still_a_checkpoint() -> None:
    """Even with nothing to do, map_concurrently is a cancellation point."""

    async def never(x: int) -> int:
        raise AssertionError("never called")

    with trio.CancelScope() as scope:
        scope.cancel()
        await map_concurrently(never, [], limit=3)
    assert scope.cancelled_caught


@pytest.mark.parametrize("limit", [0, -1])
async def test_limit_below_one_is_rejected(limit: int) -> None:
    """A limit below 1 raises ValueError, for as_completed already at the call."""

    async def fn(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="limit must be at least 1"):
        await map_concurrently(fn, [1], limit=limit)
    with pytest.raises(ValueError, match="limit must be at least 1"):
        as_completed(fn, [1], limit=limit)


@pytest.mark.parametrize("limit", [2.0, True, "3"])
async def test_limit_must_be_an_int(limit: object) -> None:
    """A limit that is not an int (bools included) raises TypeError."""

    async def fn(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="limit must be an int"):
        await map_concurrently(fn, [1], limit=limit)  # type: ignore[arg-type]


async def test_map_fails_fast_with_an_exception_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first failure cancels the other calls at once and propagates as a group."""
    tracker = Tracker()

    async def work(item: tuple[int, float]) -> int:
        if item[0] == 3:
            await trio.sleep(1.0)
            raise ValueError("item 3")
        return await tracker.sleep_then_return(item)

    start = trio.current_time()
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="item 3")):
        await map_concurrently(work, [(i, 10.0) for i in range(20)], limit=5)
    assert trio.current_time() - start == 1.0
    assert tracker.running == 0
    assert sorted(tracker.cancelled) == [0, 1, 2, 4]
    assert tracker.finished == []


async def test_error_from_the_iterable_fails_fast(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An exception raised while iterating the items cancels the work and propagates."""
    tracker = Tracker()

    def items() -> Iterator[tuple[int, float]]:
        yield (0, 5.0)
        yield (1, 1.0)
        raise KeyError("broken source")

    with pytest.RaisesGroup(KeyError):
        await map_concurrently(tracker.sleep_then_return, items(), limit=2)
    assert tracker.cancelled == [0]


async def test_capture_errors_gives_one_result_per_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With capture_errors a failing item becomes a failed Result and the rest finish."""

    async def work(i: int) -> int:
        await trio.sleep(i)
        if i % 3 == 0:
            raise ValueError(i)
        return i * 10

    results = await map_concurrently(capture_errors(work), range(7), limit=3)
    assert [r.ok for r in results] == [False, True, True, False, True, True, False]
    assert [r.value for r in results if r.ok] == [10, 20, 40, 50]
    assert all(isinstance(r.error, ValueError) for r in results if not r.ok)
    assert results[1] == Result(ok=True, value=10)


async def test_capture_errors_lets_cancellation_through(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """capture_errors captures Exceptions only: Cancelled still propagates."""

    async def work(i: int) -> int:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.move_on_after(0.01) as scope:
        await map_concurrently(capture_errors(work), range(3), limit=3)
    assert scope.cancelled_caught


async def test_as_completed_yields_in_completion_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """as_completed yields (index, result) pairs as calls finish."""
    tracker = Tracker()
    delays = [3.0, 1.0, 4.0, 1.5, 2.0]
    async with as_completed(tracker.sleep_then_return, list(enumerate(delays)), limit=5) as results:
        pairs = [pair async for pair in results]
    assert pairs == [(1, 1), (3, 3), (4, 4), (0, 0), (2, 2)]


async def test_as_completed_with_async_iterable_and_captured_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """as_completed accepts an async iterable, and capture_errors gives Results."""

    async def items() -> AsyncIterator[int]:
        for i in range(6):
            yield i

    async def work(i: int) -> int:
        await trio.sleep(6 - i)
        if i == 2:
            raise ValueError("two")
        return i

    async with as_completed(capture_errors(work), items(), limit=6) as results:
        pairs = [pair async for pair in results]
    assert [index for index, _ in pairs] == [5, 4, 3, 2, 1, 0]
    assert [r.ok for _, r in pairs] == [True, True, True, False, True, True]


async def test_break_cancels_the_remaining_work(autojump_clock: trio.testing.MockClock) -> None:
    """Leaving the block with break cancels every running call before the block exits."""
    tracker = Tracker()
    items = [(i, 1.0 + i) for i in range(20)]
    async with as_completed(tracker.sleep_then_return, items, limit=4) as results:
        async for index, _ in results:
            if index == 1:
                break
    assert trio.current_time() == 2.0
    assert tracker.running == 0
    assert sorted(tracker.cancelled) == [2, 3, 4, 5]
    assert set(tracker.started) == {0, 1, 2, 3, 4, 5}


async def test_break_stops_an_infinite_generator(autojump_clock: trio.testing.MockClock) -> None:
    """An infinite generator is consumed only as far as the work went before break."""
    pulled = 0

    def forever() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    async def work(i: int) -> int:
        await trio.sleep(1.0)
        return i

    seen = 0
    async with as_completed(work, forever(), limit=8) as results:
        async for _ in results:
            seen += 1
            if seen == 20:
                break
    assert pulled <= 20 + 2 * 8


async def test_slow_consumer_keeps_memory_bounded(autojump_clock: trio.testing.MockClock) -> None:
    """A slow consumer pauses the workers: at most limit results buffered, limit in flight."""
    pulled = 0
    consumed = 0
    ahead: list[int] = []

    def items() -> Iterator[int]:
        nonlocal pulled
        for i in range(200):
            pulled += 1
            ahead.append(pulled - consumed)
            yield i

    async def work(i: int) -> int:
        await trio.sleep(0.01)
        return i

    async with as_completed(work, items(), limit=4) as results:
        async for _ in results:
            consumed += 1
            await trio.sleep(1.0)
    assert consumed == 200
    assert max(ahead) <= 2 * 4 + 1


async def test_exception_in_the_block_propagates_unwrapped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An exception raised in the block cancels the work and comes out as itself."""
    tracker = Tracker()

    async def consume() -> None:
        async with as_completed(
            tracker.sleep_then_return, [(i, 1.0) for i in range(9)], limit=3
        ) as results:
            async for _ in results:
                raise KeyError("stop")

    with pytest.raises(KeyError, match="stop") as caught:
        await consume()
    assert caught.value.__context__ is None
    assert tracker.running == 0
    assert sorted(tracker.cancelled) == [3, 4, 5]


async def test_as_completed_fails_fast_with_an_exception_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failing call cancels the others and the block, leaving it with a group."""
    tracker = Tracker()

    async def work(item: tuple[int, float]) -> int:
        if item[0] == 2:
            raise ValueError("boom")
        return await tracker.sleep_then_return(item)

    seen = []
    with pytest.RaisesGroup(ValueError):
        async with as_completed(work, [(i, 5.0) for i in range(6)], limit=3) as results:
            async for pair in results:
                seen.append(pair)
    assert seen == []
    assert tracker.running == 0
    assert sorted(tracker.cancelled) == [0, 1]


async def test_outer_cancellation_cancels_the_work(autojump_clock: trio.testing.MockClock) -> None:
    """Cancelling the block from outside cancels every call and is absorbed by its scope."""
    tracker = Tracker()
    with trio.move_on_after(2.5) as scope:
        async with as_completed(
            tracker.sleep_then_return, [(i, 10.0) for i in range(5)], limit=5
        ) as results:
            async for _ in results:
                raise AssertionError("nothing finishes")
    assert scope.cancelled_caught
    assert tracker.running == 0
    assert sorted(tracker.cancelled) == [0, 1, 2, 3, 4]


async def test_closing_the_channel_in_the_block_stops_the_work(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Closing the results channel early cancels the remaining calls without an error."""
    tracker = Tracker()
    async with as_completed(
        tracker.sleep_then_return, [(i, 1.0 + i) for i in range(10)], limit=2
    ) as results:
        await results.receive()
        await results.aclose()
        await trio.sleep(100)
        assert tracker.running == 0
    assert tracker.finished == [0, 1]


@pytest.mark.parametrize("make_items", ["sync", "async"])
async def test_closing_the_channel_before_any_result_stops_at_once(
    autojump_clock: trio.testing.MockClock, make_items: str
) -> None:
    """Closing the channel on entry ends the fan-out after at most one call per worker."""
    pulled = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    async def async_numbers() -> AsyncGenerator[int, None]:
        for i in numbers():
            yield i

    calls: list[int] = []

    async def work(i: int) -> int:
        calls.append(i)
        return i

    # The caller owns an async generator: aclosing() finalises what the fan-out left.
    async with contextlib.aclosing(async_numbers()) as async_items:
        items = numbers() if make_items == "sync" else async_items
        async with as_completed(work, items, limit=3) as results:
            results.close()
            await trio.sleep(1)
    assert len(calls) <= 3
    assert pulled <= 4
