"""Several endpoints in one client: balancing, failover, health, priorities, fallbacks.

Every test runs over real sockets against fake LLM servers on 127.0.0.1 (a dead endpoint
is a port nobody listens on), on trio's MockClock: cooldowns, pauses and latencies are
virtual seconds.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import httpx2
import pytest
import trio

import trio_llm
from trio_llm import Endpoint, EndpointStatistics, RetryPolicy
from trio_llm._routing import COOLDOWN_FIRST, COOLDOWN_MAX, FAILURES_TO_COOL
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm, serve_fake_llm

PROMPTS = [f"question {i}" for i in range(400)]


def dead_url() -> str:
    """A URL on a loopback port that nobody listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@asynccontextmanager
async def fake_servers(*configs: FakeLLMConfig) -> AsyncIterator[list[FakeLLMServer]]:
    """Run one fake server per config."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_fake_llm(config)) for config in configs]


def by_name(client: trio_llm.Client) -> dict[str, EndpointStatistics]:
    return {stats.name: stats for stats in client.statistics().endpoints}


def failing(status: int = 503) -> FakeLLMConfig:
    return FakeLLMConfig(error_rate=1.0, error_status=status)


async def test_dead_and_failing_endpoints_take_almost_no_traffic(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A closed port and an always-503 server get their first failures, then only probes."""
    async with fake_servers(FakeLLMConfig(latency=0.05), failing()) as (good, broken):
        endpoints = [
            Endpoint(good.base_url, name="good"),
            Endpoint(broken.base_url, name="503"),
            Endpoint(dead_url(), name="dead"),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            succeeded = 0
            for _ in range(12):  # 600 calls over about a minute
                results = await client.chat_many(PROMPTS[:50], limit=16)
                succeeded += sum(result.ok for result in results)
                await trio.sleep(5)
            stats = by_name(client)
    assert succeeded == 600
    sent = sum(s.sent for s in stats.values())
    # The first burst (about a third of the first 16 calls each) and one probe per
    # cooldown (2, 4, 8, 16, 32 s): about 2% of the attempts each.
    assert stats["dead"].sent <= 0.04 * sent, stats
    assert stats["503"].sent <= 0.04 * sent, stats
    assert stats["good"].succeeded == 600
    assert stats["dead"].state == stats["503"].state == "cooling"
    assert stats["dead"].failed == stats["dead"].sent


async def test_cooldowns_grow_and_probes_decide(autojump_clock: trio.abc.Clock) -> None:
    """Consecutive failures cool an endpoint: 2 s, then doubling per failed probe, to 60 s."""
    async with fake_servers(FakeLLMConfig()) as (good,):
        endpoints = [Endpoint(dead_url(), name="dead"), Endpoint(good.base_url, name="good")]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            start = trio.current_time()
            tried_at = []
            for step in range(260):  # a call every 0.5 s for 130 s
                before = by_name(client)["dead"].sent
                reply = await client.chat("hi")
                assert reply.endpoint == "good"
                if by_name(client)["dead"].sent > before:
                    tried_at.append(step * 0.5)
                await trio.sleep(0.5)
                assert trio.current_time() - start == pytest.approx((step + 1) * 0.5)
    first = (FAILURES_TO_COOL - 1) * 0.5  # the third consecutive failure cools it
    assert (COOLDOWN_FIRST, COOLDOWN_MAX) == (2.0, 60.0)
    expected = [0.0, 0.5, first]
    cooldown, at = COOLDOWN_FIRST, first
    while at + cooldown < 130:
        at += cooldown
        expected.append(at)
        cooldown = min(cooldown * 2, COOLDOWN_MAX)
    assert tried_at == expected  # 0, 0.5, 1, then probes at 3, 7, 15, 31, 63, 123


async def test_endpoint_killed_mid_run_costs_no_failed_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Requests cut by a server that goes away fail over; new ones avoid it."""
    async with (
        fake_servers(FakeLLMConfig(latency=0.05)) as (stays,),
        trio.open_nursery() as nursery,
    ):
        doomed_scope = trio.CancelScope()

        async def run_doomed(*, task_status: trio.TaskStatus[FakeLLMServer]) -> None:
            with doomed_scope:
                await serve_fake_llm(FakeLLMConfig(latency=0.05), task_status=task_status)

        doomed: FakeLLMServer = await nursery.start(run_doomed)
        endpoints = [
            Endpoint(stays.base_url, name="stays"),
            Endpoint(doomed.base_url, name="doomed"),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:

            async def kill_soon() -> None:
                await trio.sleep(0.3)
                doomed_scope.cancel()

            nursery.start_soon(kill_soon)
            results = await client.chat_many(PROMPTS, limit=32)
            stats = by_name(client)
    assert all(result.ok for result in results)
    assert stats["doomed"].succeeded > 50  # it took its share before it went
    assert stats["doomed"].failed >= FAILURES_TO_COOL  # the requests it cut, and more
    assert stats["doomed"].state == "cooling"
    assert stats["stays"].succeeded + stats["doomed"].succeeded == len(PROMPTS)
    assert client.statistics().failed == 0


async def test_shares_follow_weights(autojump_clock: trio.abc.Clock) -> None:
    """Equal servers with weights 1 and 3 get a quarter and three quarters."""
    async with fake_servers(FakeLLMConfig(latency=0.1), FakeLLMConfig(latency=0.1)) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b", weight=3)]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            results = await client.chat_many(PROMPTS, limit=40)
            stats = by_name(client)
    assert all(result.ok for result in results)
    assert stats["b"].sent / len(PROMPTS) == pytest.approx(0.75, abs=0.03)


async def test_shares_follow_speed(autojump_clock: trio.abc.Clock) -> None:
    """A server four times slower holds its requests longer and gets about a fifth."""
    async with fake_servers(FakeLLMConfig(latency=0.05), FakeLLMConfig(latency=0.2)) as (a, b):
        endpoints = [Endpoint(a.base_url, name="fast"), Endpoint(b.base_url, name="slow")]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            results = await client.chat_many(PROMPTS, limit=40)
            stats = by_name(client)
            latencies = (stats["fast"].latency, stats["slow"].latency)
    assert all(result.ok for result in results)
    assert stats["slow"].sent / len(PROMPTS) == pytest.approx(0.2, abs=0.04)
    assert latencies == (pytest.approx(0.05, abs=0.01), pytest.approx(0.2, abs=0.01))


async def test_a_lone_caller_rotates_over_equal_endpoints(autojump_clock: trio.abc.Clock) -> None:
    """With nothing in flight, equal endpoints take turns (the least recently chosen first)."""
    async with fake_servers(FakeLLMConfig(), FakeLLMConfig(), FakeLLMConfig()) as servers:
        endpoints = [Endpoint(s.base_url, name=str(i)) for i, s in enumerate(servers)]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            names = [(await client.chat("hi")).endpoint for _ in range(6)]
    assert names == ["0", "1", "2", "0", "1", "2"]


async def test_priority_levels_fall_back_and_give_the_traffic_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Priority 1 gets nothing while priority 0 is up, all of it while it is down, then none."""
    async with fake_servers(FakeLLMConfig(latency=0.01), FakeLLMConfig(latency=0.01)) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b", priority=1)]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:

            async def run() -> tuple[int, int]:
                before = by_name(client)
                results = await client.chat_many(PROMPTS[:100], limit=10)
                assert all(result.ok for result in results)
                after = by_name(client)
                return after["a"].sent - before["a"].sent, after["b"].sent - before["b"].sent

            assert await run() == (100, 0)
            a.config = failing()
            to_a, to_b = await run()
            assert to_a <= 10 + 1  # the first wave, then nothing but probes
            assert to_b == 100
            assert by_name(client)["a"].state == "cooling"
            a.config = FakeLLMConfig(latency=0.01)
            await trio.sleep(COOLDOWN_MAX)
            to_a, to_b = await run()
            assert to_b < 20  # calls that started while a's probe was out
            assert by_name(client)["a"].state == "up"
            assert await run() == (100, 0)  # its full share at once


async def test_all_priority_zero_down_sends_everything_to_the_next_level(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Two levels below: the next available one, in order."""
    async with fake_servers(failing(), FakeLLMConfig(), FakeLLMConfig()) as (a, b, c):
        endpoints = [
            Endpoint(a.base_url, name="a"),
            Endpoint(dead_url(), name="dead"),
            Endpoint(b.base_url, name="b", priority=1),
            Endpoint(c.base_url, name="c", priority=2),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            results = await client.chat_many(PROMPTS[:200], limit=8)
            stats = by_name(client)
    assert all(result.ok for result in results)
    assert stats["b"].succeeded == 200
    assert stats["c"].sent == 0


async def test_with_every_endpoint_down_calls_still_go_and_find_the_first_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """All cooling: calls go to the soonest anyway, and the first to answer is back at once."""
    async with fake_servers(failing(), failing()) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b")]
        retry = RetryPolicy(attempts=2, wait_initial=0.1, wait_jitter=0)
        async with trio_llm.open_client(endpoints=endpoints, model="m", retry=retry) as client:
            for _ in range(FAILURES_TO_COOL):
                with pytest.raises(trio_llm.ServerError):
                    await client.chat("hi")
            assert {s.state for s in client.statistics().endpoints} == {"cooling"}
            sent = a.stats.total_requests + b.stats.total_requests
            with pytest.raises(trio_llm.ServerError):
                await client.chat("hi")  # sent although both cool: nothing else to do
            assert a.stats.total_requests + b.stats.total_requests == sent + 2
            b.config = FakeLLMConfig()
            reply = await client.chat("hi")  # a (or b) first, then the other: b answers
            stats = by_name(client)
    assert reply.endpoint == "b"
    assert (stats["a"].state, stats["b"].state) == ("cooling", "up")


async def test_a_shorter_pause_never_cuts_a_longer_one(autojump_clock: trio.abc.Clock) -> None:
    """Two 429s: retry-after 10 then 1; the endpoint stays paused for the 10 s (not 1 s)."""
    async with fake_servers(FakeLLMConfig()) as (b,):
        arrived: list[int] = []
        both = trio.Event()

        async def refuse(request: httpx2.Request) -> httpx2.Response:
            arrived.append(len(arrived))
            if len(arrived) == 2:
                both.set()
            await both.wait()
            wait = "10" if len(arrived) == 2 and arrived.pop(0) == 0 else "1"
            await trio.sleep(0.1 if wait == "1" else 0)  # the shorter one comes later
            return httpx2.Response(429, headers={"retry-after": wait}, json={})

        async with trio_llm.open_client(
            endpoints=[
                Endpoint("http://127.0.0.1:9/v1", name="a"),
                Endpoint(b.base_url, name="b", priority=1),
            ],
            model="m",
            transport=_RouteByHost({"127.0.0.1:9": httpx2.MockTransport(refuse)}),
        ) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.chat, "one")
                nursery.start_soon(client.chat, "two")
            stats = by_name(client)["a"]
    assert stats.rate_limited == 2
    assert stats.paused_for == pytest.approx(9.9)


async def test_429_moves_the_traffic_without_waiting(autojump_clock: trio.abc.Clock) -> None:
    """A 429's retry-after pauses its endpoint; the call goes elsewhere at once."""
    async with fake_servers(failing(429), FakeLLMConfig()) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b")]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            start = trio.current_time()
            reply = await client.chat("hi")
            assert trio.current_time() == start  # no wait at all
            assert reply.endpoint == "b"
            stats = by_name(client)["a"]
            assert (stats.rate_limited, stats.state) == (1, "up")  # paused, not unhealthy
            assert stats.paused_for == pytest.approx(1.0)  # the fake server's retry-after
            for _ in range(20):
                assert (await client.chat("hi")).endpoint == "b"
            assert by_name(client)["a"].sent == 1
            a.config = FakeLLMConfig()
            await trio.sleep(1.0)
            names = [(await client.chat("hi")).endpoint for _ in range(4)]
    assert sorted(names) == ["a", "a", "b", "b"]  # turns again, nothing owed for the pause


async def test_429_without_a_retry_after_counts_as_a_failure(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A 429 that says nothing of when to come back fails over, and cools its endpoint."""
    async with fake_servers(FakeLLMConfig()) as (b,):
        requests = 0

        def refuse(request: httpx2.Request) -> httpx2.Response:
            nonlocal requests
            requests += 1
            return httpx2.Response(429, json={"error": {"message": "slow down"}})

        async with trio_llm.open_client(
            endpoints=[Endpoint("http://127.0.0.1:9/v1", name="a"), Endpoint(b.base_url, name="b")],
            model="m",
            transport=_RouteByHost({"127.0.0.1:9": httpx2.MockTransport(refuse)}),
        ) as client:
            for _ in range(10):
                assert (await client.chat("hi")).endpoint == "b"
            stats = by_name(client)["a"]
    assert requests == FAILURES_TO_COOL
    assert (stats.state, stats.rate_limited, stats.paused_for) == ("cooling", 3, 0.0)


async def test_429_with_an_exhausted_limit_pauses_until_its_reset(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Without retry-after, an exhausted rate-limit header's reset is the pause."""
    async with fake_servers(FakeLLMConfig()) as (b,):
        refused_at: list[float] = []

        def refuse(request: httpx2.Request) -> httpx2.Response:
            refused_at.append(trio.current_time())
            headers = {
                "x-ratelimit-limit-requests": "100",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "3s",
            }
            return httpx2.Response(429, headers=headers, json={"error": {"message": "slow"}})

        async with trio_llm.open_client(
            endpoints=[Endpoint("http://127.0.0.1:9/v1", name="a"), Endpoint(b.base_url, name="b")],
            model="m",
            transport=_RouteByHost({"127.0.0.1:9": httpx2.MockTransport(refuse)}),
        ) as client:
            start = trio.current_time()
            for _ in range(8):
                assert (await client.chat("hi")).endpoint == "b"
                await trio.sleep(1)
            stats = by_name(client)["a"]
    assert refused_at == [start, start + 3, start + 6]  # once per reset, never waited for
    assert (stats.state, stats.rate_limited) == ("up", 3)


@attrs.define
class _RouteByHost(httpx2.AsyncBaseTransport):
    """A transport that sends some hosts to mock transports and the rest over the network."""

    mocks: dict[str, httpx2.AsyncBaseTransport]
    network: httpx2.AsyncBaseTransport = attrs.Factory(httpx2.AsyncHTTPTransport)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        host = f"{request.url.host}:{request.url.port}"
        return await self.mocks.get(host, self.network).handle_async_request(request)

    async def aclose(self) -> None:
        await self.network.aclose()


async def test_a_stream_fails_over_before_its_first_event(autojump_clock: trio.abc.Clock) -> None:
    """An error before the first event sends the stream to another endpoint."""
    async with fake_servers(failing(), FakeLLMConfig()) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b", priority=1)]
        async with (
            trio_llm.open_client(endpoints=endpoints, model="m") as client,
            trio_llm.open_client(base_url=b.base_url, model="m") as direct,
        ):
            async with client.stream("Tell me a story.") as stream:
                text = "".join([chunk.text async for chunk in stream])
            expected = await direct.chat("Tell me a story.")
    assert stream.response.endpoint == "b"
    assert text == stream.response.text == expected.text
    assert a.stats.injected_errors == 1


async def test_a_stream_does_not_fail_over_after_its_first_event(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Once output may have reached the caller, a cut stream is a StreamError."""
    cut = FakeLLMConfig(disconnect_rate=1.0, tokens_per_second=50)
    async with fake_servers(cut, FakeLLMConfig()) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b", priority=1)]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:

            async def read_all() -> None:
                async with client.stream("Tell me a story.", max_tokens=40) as stream:
                    async for _ in stream:
                        pass

            with pytest.raises(trio_llm.StreamError) as raised:
                await read_all()
            stats = by_name(client)
    assert raised.value.text_so_far
    assert b.stats.total_requests == 0
    assert (stats["a"].failed, stats["a"].succeeded) == (1, 0)


async def test_attempts_bound_the_call_across_endpoints(autojump_clock: trio.abc.Clock) -> None:
    """The retry policy's attempts count every endpoint's attempts together."""
    async with fake_servers(failing(), failing()) as (a, b):
        endpoints = [Endpoint(a.base_url), Endpoint(b.base_url)]
        async with trio_llm.open_client(
            endpoints=endpoints, model="m", retry=RetryPolicy(attempts=5)
        ) as client:
            with pytest.raises(trio_llm.ServerError):
                await client.chat("hi")
            stats = client.statistics()
    assert a.stats.total_requests + b.stats.total_requests == 5
    assert (stats.sent, stats.retried, stats.failed) == (5, 4, 1)
    assert {s.sent for s in stats.endpoints} == {2, 3}


async def test_the_deadline_bounds_the_call_across_endpoints(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Timeouts fail over at once; the deadline ends the call wherever it is."""
    stalls = FakeLLMConfig(stall_rate=1.0)
    async with (
        fake_servers(stalls, stalls) as (a, b),
        trio_llm.open_client(
            endpoints=[Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b")],
            model="m",
            retry=RetryPolicy(deadline=5.0),
            timeouts=trio_llm.Timeouts(read=1.0),
        ) as client,
    ):
        start = trio.current_time()
        with pytest.raises(trio_llm.RetryDeadlineExceeded) as raised:
            await client.chat("hi")
        elapsed = trio.current_time() - start
        stats = by_name(client)
    # At the deadline, or sooner when the next backoff would pass it.
    assert 4.0 <= elapsed <= 5.0
    assert isinstance(raised.value.last_error, trio_llm.APITimeoutError)
    # a at 0 s, b at once at 1 s (failover), then backoffs between the two.
    assert (stats["a"].sent >= 2, stats["b"].sent >= 1) == (True, True)
    assert all(s.in_flight == s.waiting == 0 for s in stats.values())


async def test_cancellation_leaves_nothing_held_at_any_endpoint(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A cancelled call releases its endpoint's load and slots."""
    stalls = FakeLLMConfig(stall_rate=1.0)
    async with fake_servers(stalls, stalls) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a", max_concurrency=2), Endpoint(b.base_url)]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(client.chat, "hi")
                await trio.sleep(1)
                in_flight = {
                    s.name: (s.in_flight, s.waiting) for s in client.statistics().endpoints
                }
                nursery.cancel_scope.cancel()
            stats = client.statistics()
    assert in_flight == {"a": (2, 0), "127.0.0.1:" + str(b.port): (4, 0)}
    assert stats.in_flight == 0
    assert all((s.in_flight, s.waiting, s.state) == (0, 0, "up") for s in stats.endpoints)
    assert (stats.succeeded, stats.failed) == (0, 0)


async def test_a_cancelled_probe_lets_the_next_call_probe(autojump_clock: trio.abc.Clock) -> None:
    """A probe that never got its answer leaves the endpoint cooling, due for a probe."""
    async with fake_servers(failing(), FakeLLMConfig()) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b", priority=1)]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            for _ in range(FAILURES_TO_COOL):
                assert (await client.chat("hi")).endpoint == "b"
            assert by_name(client)["a"].state == "cooling"
            a.config = FakeLLMConfig(stall_rate=1.0)
            await trio.sleep(COOLDOWN_FIRST)
            with trio.move_on_after(1):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.chat, "hi")
                    await trio.sleep(0.5)
                    assert by_name(client)["a"].state == "probing"
            assert by_name(client)["a"].state == "cooling"
            a.config = FakeLLMConfig()
            reply = await client.chat("hi")
            assert (reply.endpoint, by_name(client)["a"].state) == ("a", "up")


async def test_fallback_to_another_provider_and_model(autojump_clock: trio.abc.Clock) -> None:
    """A fallback of another provider gets its own wire format and its own model."""
    async with fake_servers(failing(), FakeLLMConfig()) as (local, hosted):
        endpoints = [
            Endpoint(local.base_url, name="local", model="llama-3.3-70b"),
            Endpoint(
                hosted.root_url,
                name="hosted",
                provider="anthropic",
                model="claude-haiku-4-5",
                priority=1,
            ),
        ]
        async with (
            trio_llm.open_client(endpoints=endpoints) as client,
            trio_llm.open_client(
                base_url=hosted.root_url, provider="anthropic", model="claude-haiku-4-5"
            ) as direct,
        ):
            reply = await client.chat("What is Trio?", max_tokens=30)
            async with client.stream("What is Trio?", max_tokens=30) as stream:
                async for _ in stream:
                    pass
            expected = await direct.chat("What is Trio?", max_tokens=30)
    assert (reply.endpoint, reply.model) == ("hosted", "claude-haiku-4-5")
    assert reply.text == stream.response.text == expected.text
    assert hosted.stats.requests_by_endpoint == {"/v1/messages": 3}
    assert local.stats.injected_errors == 2


async def test_a_body_another_provider_refuses_fails_the_call_and_no_probe_is_lost(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A fallback that cannot build the body (its provider refuses an argument) fails the
    call with that error; the probe it was to be is due again."""
    async with fake_servers(failing(), failing()) as (local, hosted):
        endpoints = [
            Endpoint(local.base_url, name="local", model="m"),
            Endpoint(hosted.root_url, name="claude", provider="anthropic", model="c", priority=1),
        ]
        retry = RetryPolicy(attempts=2, wait_initial=0.1, wait_jitter=0)
        async with trio_llm.open_client(endpoints=endpoints, retry=retry) as client:
            for _ in range(FAILURES_TO_COOL):
                with pytest.raises(trio_llm.ServerError):
                    await client.chat("hi")
            hosted.config = FakeLLMConfig()
            await trio.sleep(COOLDOWN_FIRST)
            with pytest.raises(TypeError, match="unknown tool_choice"):
                await client.chat("hi", tool_choice="bogus")  # fine for OpenAI only
            assert by_name(client)["claude"].state == "cooling"
            reply = await client.chat("hi")
            stats = by_name(client)
    assert (reply.endpoint, stats["claude"].state) == ("claude", "up")
    assert all((s.in_flight, s.waiting) == (0, 0) for s in stats.values())


async def test_embeddings_skip_endpoints_without_them(autojump_clock: trio.abc.Clock) -> None:
    """An Anthropic endpoint never takes an embeddings request."""
    async with fake_servers(FakeLLMConfig(), FakeLLMConfig()) as (a, b):
        endpoints = [
            Endpoint(a.root_url, name="claude", provider="anthropic", model="claude-haiku-4-5"),
            Endpoint(b.base_url, name="openai", model="text-embedding-3-small", priority=1),
        ]
        async with trio_llm.open_client(endpoints=endpoints) as client:
            vectors = await client.embed(["a", "b"])
            reply = await client.chat("hi")
    assert (vectors.endpoint, len(vectors.vectors)) == ("openai", 2)
    assert reply.endpoint == "claude"


async def test_an_endpoint_model_replaces_the_calls(autojump_clock: trio.abc.Clock) -> None:
    """An endpoint's model is what it is sent; the call's model goes to those without one."""
    async with fake_servers(FakeLLMConfig(), FakeLLMConfig()) as (a, b):
        endpoints = [
            Endpoint(a.base_url, name="a", model="model-a"),
            Endpoint(b.base_url, name="b"),
        ]
        async with trio_llm.open_client(endpoints=endpoints) as client:
            with pytest.raises(trio_llm.ConfigurationError, match="no model given"):
                await client.chat("hi")
            replies = [await client.chat("hi", model="from-call") for _ in range(2)]
    assert {(r.endpoint, r.model) for r in replies} == {("a", "model-a"), ("b", "from-call")}


async def test_every_reply_names_its_endpoint(fake_llm: FakeLLMServer) -> None:
    """reply.endpoint on chat, embed and stream replies; host:port for a base_url client."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        chat = await client.chat("hi")
        vectors = await client.embed("hi")
        async with client.stream("hi") as stream:
            async for _ in stream:
                pass
        async with client.stream_many(["a", "b"]) as streams:
            async for _ in streams:
                pass
        stats = client.statistics().endpoints
    name = f"127.0.0.1:{fake_llm.port}"
    assert chat.endpoint == vectors.endpoint == stream.response.endpoint == name
    assert {result.unwrap().endpoint for result in streams.results} == {name}
    assert chat == attrs.evolve(chat, endpoint="elsewhere")  # not part of equality
    assert [(s.name, s.state, s.sent, s.succeeded, s.in_flight) for s in stats] == [
        (name, "up", 5, 5, 0)
    ]


async def test_retry_log_names_the_endpoint(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """Each retry's record says which endpoint failed, and whether it failed over."""
    caplog.set_level(logging.INFO, logger="trio_llm.retry")
    async with fake_servers(failing(), FakeLLMConfig()) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b", priority=1)]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            await client.chat("hi")
    (record,) = [r for r in caplog.records if r.name == "trio_llm.retry"]
    message = record.getMessage()
    assert f"POST {a.base_url}/chat/completions" in message
    assert "failed at endpoint a with ServerError" in message
    assert message.endswith("failing over to another endpoint at once")
    assert getattr(record, "endpoint") == "a"  # noqa: B009 - set through `extra`


async def test_each_endpoint_has_its_own_rate_limiter_and_pool(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A rate-limited endpoint takes what its limit allows; the other takes the rest."""
    async with fake_servers(FakeLLMConfig(latency=0.01), FakeLLMConfig(latency=0.01)) as (a, b):
        endpoints = [
            Endpoint(
                a.base_url, name="limited", rate_limit=trio_llm.RateLimit(requests_per_minute=30)
            ),
            Endpoint(b.base_url, name="free"),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            start = trio.current_time()
            results = await client.chat_many(PROMPTS[:200], limit=20)
            elapsed = trio.current_time() - start
            stats = by_name(client)
            routes = client._router.routes
    assert all(result.ok for result in results)
    assert elapsed < 1.0  # nobody waited for the limited one
    assert 25 <= stats["limited"].sent <= 31  # its bucket's 30 (a few refilled)
    assert routes[0].direct is not routes[1].direct
    assert None is not routes[0].rate is not routes[1].rate is not None


async def test_a_shared_transport_serves_every_endpoint(autojump_clock: trio.abc.Clock) -> None:
    """transport= is shared by the endpoints, each with its own headers; closed once."""
    seen: list[tuple[str, str]] = []

    def reply(request: httpx2.Request) -> httpx2.Response:
        seen.append((request.url.host, request.headers["authorization"]))
        body = {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
        return httpx2.Response(200, json=body)

    closed: list[bool] = []

    class Recording(httpx2.MockTransport):
        async def aclose(self) -> None:
            closed.append(True)

    endpoints = [
        Endpoint("https://one.example/v1", api_key="key-1"),
        Endpoint("https://two.example/v1", api_key="key-2"),
    ]
    async with trio_llm.open_client(
        endpoints=endpoints, model="m", transport=Recording(reply)
    ) as client:
        replies = [await client.chat("hi") for _ in range(2)]
    assert {r.endpoint for r in replies} == {"one.example:443", "two.example:443"}
    assert sorted(seen) == [("one.example", "Bearer key-1"), ("two.example", "Bearer key-2")]
    assert closed == [True]


async def test_statistics_of_an_endpoint_in_flight(autojump_clock: trio.abc.Clock) -> None:
    """in_flight and waiting per endpoint, as the client sees them."""
    async with fake_servers(FakeLLMConfig(latency=1.0)) as (a,):
        endpoints = [Endpoint(a.base_url, name="a", max_concurrency=2)]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(client.chat, "hi")
                await trio.sleep(0.5)
                during = client.statistics()
            after = client.statistics()
    (stats,) = during.endpoints
    assert (stats.in_flight, stats.waiting, during.in_flight, during.waiting) == (2, 1, 3, 0)
    (stats,) = after.endpoints
    assert (stats.in_flight, stats.waiting, stats.succeeded) == (0, 0, 3)
    assert stats.latency == pytest.approx(1.0)


async def test_cancelled_while_waiting_for_an_endpoint_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A call cancelled in the wait for its endpoint's slot gives back the client's slot."""
    async with fake_servers(FakeLLMConfig(latency=1.0)) as (a,):
        endpoints = [Endpoint(a.base_url, name="a", max_concurrency=1)]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.chat, "first")
                await trio.sleep(0.1)
                with trio.move_on_after(0.2):
                    await client.chat("second")
                during = client.statistics()
            after = client.statistics()
    assert (during.in_flight, during.endpoints[0].in_flight, during.endpoints[0].waiting) == (
        1,
        1,
        0,
    )
    assert (after.in_flight, after.succeeded, after.failed) == (0, 1, 0)


def test_client_repr_lists_the_endpoints() -> None:
    """repr(client) names the endpoints (never a key)."""

    async def main() -> str:
        endpoints = [
            Endpoint("http://127.0.0.1:1/v1", name="a", api_key="sk-secret"),
            Endpoint("http://127.0.0.1:2/v1", name="b"),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            return repr(client)

    text = trio.run(main)
    assert "endpoints=['a', 'b']" in text
    assert "sk-secret" not in text
