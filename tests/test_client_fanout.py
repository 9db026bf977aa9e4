"""chat_many / chat_as_completed and the client's shared rate limit, against the fake server."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import pytest
import trio
import trio.testing

import trio_llm
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm


async def test_chat_many_keeps_input_order_and_captures_failures(
    fake_llm: FakeLLMServer,
) -> None:
    """Results come in input order; a failing item is captured and the others succeed."""
    items: list[trio_llm.ChatItem] = [
        "first",
        [{"role": "user", "content": "second"}],
        {"messages": [{"role": "user", "content": "third"}], "max_tokens": 2},
        {"prompt": "fourth", "model": "other-model"},
        [{"role": "user", "content": 42}],  # the server rejects this one: 400
        {"temperature": 0},  # no messages: a TypeError, captured
    ]
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        results = await client.chat_many(items, max_tokens=5)
        single = await client.chat("first", max_tokens=5)
    assert [r.ok for r in results] == [True, True, True, True, False, False]
    assert results[0].unwrap().text == single.text
    assert results[2].unwrap().usage.completion_tokens == 2  # the item's field wins
    assert results[1].unwrap().usage.completion_tokens <= 5  # the shared field applies
    assert results[3].unwrap().model == "other-model"
    assert isinstance(results[4].error, trio_llm.BadRequestError)
    assert isinstance(results[5].error, TypeError)
    with pytest.raises(trio_llm.BadRequestError):
        results[4].unwrap()


async def test_chat_many_keeps_the_window_full(autojump_clock: trio.abc.Clock) -> None:
    """40 requests of 1 s at concurrency 8 take exactly 5 s: the window never drains."""
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=8) as client,
    ):
        start = trio.current_time()
        results = await client.chat_many(f"q{i}" for i in range(40))
        elapsed = trio.current_time() - start
    assert all(r.ok for r in results)
    assert elapsed == pytest.approx(5.0, abs=0.05)
    assert server.stats.peak_concurrency == 8


async def test_chat_many_pulls_items_lazily(autojump_clock: trio.abc.Clock) -> None:
    """A generator is consumed as workers free up, not materialised up front."""
    pulled = 0

    def prompts() -> Iterator[str]:
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield f"q{i}"

    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=4) as client,
    ):
        with trio.move_on_after(2.5):
            await client.chat_many(prompts())
    assert 8 <= pulled <= 13  # ~3 rounds of 4 started, never the thousand


async def test_chat_as_completed_yields_in_completion_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    """(index, Result) pairs arrive as requests finish, fastest first."""
    config = FakeLLMConfig(tokens_per_second=1.0)
    items: list[trio_llm.ChatItem] = [
        {"prompt": "slow", "max_tokens": 5},
        {"prompt": "fast", "max_tokens": 1},
        {"prompt": "middle", "max_tokens": 3},
    ]
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
        client.chat_as_completed(items) as results,
    ):
        order = [index async for index, result in results if result.ok]
    assert order == [1, 2, 0]


async def test_leaving_chat_as_completed_early_cancels_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A break after the first result cancels every other request at once."""
    items: list[trio_llm.ChatItem] = [{"prompt": "fast", "max_tokens": 1}]
    items += [{"prompt": f"slow {i}", "max_tokens": 20} for i in range(100)]
    async with (
        open_fake_llm(FakeLLMConfig(tokens_per_second=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=5) as client,
    ):
        async with client.chat_as_completed(items) as results:
            async for index, result in results:
                assert (index, result.ok) == (0, True)
                break
        assert client.statistics().in_flight == 0
        await trio.testing.wait_all_tasks_blocked()
        assert server.stats.disconnects >= 4  # the slow requests in flight were abandoned
        assert client.statistics().sent <= 6
        assert server.stats.requests_by_status == {200: 1}


async def test_rate_limit_runs_at_the_limit_without_429s(autojump_clock: trio.abc.Clock) -> None:
    """With a matching RateLimit, 150 requests at 60/min finish in ~90 s with no 429."""
    config = FakeLLMConfig(requests_per_minute=60)
    limit = trio_llm.RateLimit(requests_per_minute=60)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", rate_limit=limit) as client,
    ):
        start = trio.current_time()
        results = await client.chat_many(f"q{i}" for i in range(150))
        elapsed = trio.current_time() - start
    assert all(r.ok for r in results)
    assert server.stats.rate_limited == 0
    assert elapsed == pytest.approx(89.0, abs=2.0)  # 60 at once, then one a second


async def test_token_rate_limit_paces_by_tokens(autojump_clock: trio.abc.Clock) -> None:
    """A tokens-per-minute limit paces requests by their estimated and real token cost."""
    config = FakeLLMConfig(tokens_per_minute=2_000)
    limit = trio_llm.RateLimit(tokens_per_minute=2_000)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", rate_limit=limit) as client,
    ):
        start = trio.current_time()
        results = await client.chat_many([f"question {i}" for i in range(60)], max_tokens=40)
        elapsed = trio.current_time() - start
        used = client.statistics().prompt_tokens + client.statistics().completion_tokens
    assert all(r.ok for r in results)
    assert server.stats.rate_limited <= 1
    ideal = (used - 2_000) / 2_000 * 60  # a full bucket first, then the refill rate
    assert elapsed >= ideal * 0.9


async def test_without_a_limit_the_same_job_is_refused(autojump_clock: trio.abc.Clock) -> None:
    """The baseline: with no client limit, a burst over the server's limit gets 429s."""
    config = FakeLLMConfig(requests_per_minute=60)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="m", rate_limit=None, retry=None
        ) as client,
    ):
        results = await client.chat_many(f"q{i}" for i in range(100))
    refused = [r for r in results if not r.ok]
    assert len(refused) >= 30
    assert all(isinstance(r.error, trio_llm.RateLimitError) for r in refused)


async def test_default_client_adopts_the_servers_limit(autojump_clock: trio.abc.Clock) -> None:
    """With no RateLimit set, the x-ratelimit headers teach the client the server's limit."""
    config = FakeLLMConfig(requests_per_minute=30)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=4) as client,
    ):
        results = await client.chat_many(f"q{i}" for i in range(60))
    assert [r.error for r in results if not r.ok] == []
    assert server.stats.rate_limited <= 4  # at most the first window, before it learned


async def test_adaptive_client_drains_the_servers_bucket_without_429s(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Learning the limit mid-burst, the client counts its burst and is never refused."""
    config = FakeLLMConfig(tokens_per_minute=3000, latency=0.2)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=32) as client,
    ):
        results = await client.chat_many((f"q{i}" for i in range(300)), max_tokens=16)
    assert all(r.ok for r in results)
    assert server.stats.rate_limited == 0
    # ... and it still runs at the limit once the first (free) bucket is spent.
    tokens = server.stats.prompt_tokens + server.stats.completion_tokens
    assert tokens > 3000


async def test_a_429_pauses_every_task(autojump_clock: trio.abc.Clock) -> None:
    """After a 429 with Retry-After, other tasks' new requests wait it out too."""
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=429)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", retry=None) as client,
    ):
        with pytest.raises(trio_llm.RateLimitError) as caught:
            await client.chat("refused")
        assert caught.value.retry_after == 1.0
        server.config = attrs.evolve(server.config, error_rate=0.0)
        start = trio.current_time()
        await client.chat("another task's request")
        assert trio.current_time() - start == pytest.approx(1.0, abs=0.01)
        assert client.statistics().rate_limited == 1


async def test_cancelled_wait_for_capacity_takes_none(autojump_clock: trio.abc.Clock) -> None:
    """A call cancelled while waiting for rate capacity leaves that capacity to others."""
    limit = trio_llm.RateLimit(requests_per_minute=60)
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model="m", rate_limit=limit) as client,
    ):
        await client.chat_many(f"drain {i}" for i in range(60))  # empties the bucket
        with trio.move_on_after(0.5):
            await client.chat("gives up")
        start = trio.current_time()
        await client.chat("next")
        assert trio.current_time() - start <= 1.0
