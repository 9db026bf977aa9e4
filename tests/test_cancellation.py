"""Cancel scopes around calls leave no connection, pool slot or task behind.

Regression for the reason trio-llm uses httpx2 and not httpx 0.28: that version loses a pool
slot for each request cancelled while the pool is full (httpcore #1093, #658), until every
later request fails with PoolTimeout.
"""

from __future__ import annotations

import httpx2
import pytest
import trio
import trio.testing

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm


async def test_client_survives_many_cancelled_calls(autojump_clock: trio.abc.Clock) -> None:
    """After 200 calls cancelled at all stages, a full window of calls still succeeds."""
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=4) as client,
    ):

        async def cancelled_call(i: int) -> None:
            # Deadlines spread over the wait for a slot, the wait for the reply and after it.
            with trio.move_on_after(0.05 * (i % 40)):
                await client.chat(f"q{i}")

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(cancelled_call, i)
        assert client.statistics().in_flight == 0
        assert client.statistics().waiting == 0

        with trio.fail_after(5):  # four rounds would take 1 s each if slots leaked nothing
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(client.chat, f"after {i}")
        assert server.stats.disconnects > 0  # the server saw the cancelled requests leave


async def test_httpx2_pool_survives_cancellation_under_contention(
    autojump_clock: trio.abc.Clock,
) -> None:
    """httpx2's own pool, full and contended, frees the slots of cancelled requests."""
    async with open_fake_llm(FakeLLMConfig(latency=1.0)) as server:
        limits = httpx2.Limits(max_connections=2, max_keepalive_connections=2)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx2.AsyncClient(limits=limits, timeout=httpx2.Timeout(30.0)) as http:

            async def cancelled_post(i: int) -> None:
                with trio.move_on_after(0.01 + 0.1 * (i % 15)):
                    await http.post(server.base_url + "/chat/completions", json=body)

            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(cancelled_post, i)

            with trio.fail_after(10):
                response = await http.post(server.base_url + "/chat/completions", json=body)
            assert response.status_code == 200


async def test_caller_deadline_cancels_the_request_at_once(autojump_clock: trio.abc.Clock) -> None:
    """A caller's move_on_after ends a stalled call at its deadline, and the server sees it go."""
    async with (
        open_fake_llm(FakeLLMConfig(stall_rate=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        start = trio.current_time()
        with trio.move_on_after(3.0) as scope:
            await client.chat("hi")
        assert scope.cancelled_caught
        assert trio.current_time() - start == pytest.approx(3.0)
        await trio.testing.wait_all_tasks_blocked()
        assert server.stats.disconnects == 1
        assert client.statistics().in_flight == 0
