"""Retries, waits and deadlines (virtual time: every test here runs on a MockClock)."""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from functools import partial

import httpx2
import pytest
import trio
import trio.testing

import trio_llm
from trio_llm._retry import is_retryable
from trio_llm.testing import FakeLLMConfig, open_fake_llm

OK_BODY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}

NO_JITTER = trio_llm.RetryPolicy(attempts=6, wait_initial=1.0, wait_max=30.0, wait_jitter=0.0)

Step = Callable[[httpx2.Request], httpx2.Response]


def status(code: int, **headers: str) -> Step:
    """A scripted response with an OpenAI-style error body."""
    body = {"error": {"message": f"scripted {code}", "type": "server_error", "code": None}}
    return lambda request: httpx2.Response(code, json=body, headers=headers)


def ok(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, json=OK_BODY)


def refused(request: httpx2.Request) -> httpx2.Response:
    raise httpx2.ConnectError("connection refused", request=request)


class Script:
    """A MockTransport that plays scripted steps and records when each attempt came."""

    def __init__(self, *steps: Step) -> None:
        self._steps: Iterator[Step] = iter(steps)
        self.times: list[float] = []
        self.transport = httpx2.MockTransport(self._handle)

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        self.times.append(trio.current_time())
        return next(self._steps)(request)

    @property
    def gaps(self) -> list[float]:
        return [round(b - a, 3) for a, b in zip(self.times, self.times[1:], strict=False)]


def scripted_client(
    script: Script, retry: trio_llm.RetryPolicy | None = NO_JITTER
) -> AbstractAsyncContextManager[trio_llm.Client]:
    return trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1", model="m", transport=script.transport, retry=retry
    )


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503, 504, 529])
async def test_retryable_statuses_are_retried(code: int, autojump_clock: trio.abc.Clock) -> None:
    """Each retryable status is retried until the call succeeds."""
    script = Script(status(code), status(code), ok)
    async with scripted_client(script) as client:
        reply = await client.chat("hi")
        stats = client.statistics()
    assert reply.text == "ok"
    assert len(script.times) == 3
    assert (stats.sent, stats.retried, stats.succeeded, stats.failed) == (3, 2, 1, 0)


@pytest.mark.parametrize("code", [400, 401, 403, 404, 418, 422, 501, 505])
async def test_other_statuses_fail_after_one_attempt(
    code: int, autojump_clock: trio.abc.Clock
) -> None:
    """Client errors (and 501/505) are raised at once, never retried."""
    script = Script(status(code), ok)
    async with scripted_client(script) as client:
        with pytest.raises(trio_llm.APIStatusError) as caught:
            await client.chat("hi")
        assert client.statistics().retried == 0
    assert caught.value.status_code == code
    assert len(script.times) == 1


async def test_x_should_retry_overrides_the_status(autojump_clock: trio.abc.Clock) -> None:
    """x-should-retry: true retries a 400; x-should-retry: false stops a 503."""
    script = Script(status(400, **{"x-should-retry": "true"}), ok)
    async with scripted_client(script) as client:
        assert (await client.chat("hi")).text == "ok"
    script = Script(status(503, **{"x-should-retry": "false"}), ok)
    async with scripted_client(script) as client:
        with pytest.raises(trio_llm.ServerError):
            await client.chat("hi")
    assert len(script.times) == 1


async def test_connection_errors_are_retried(autojump_clock: trio.abc.Clock) -> None:
    """A refused connection is retried like a 5xx."""
    script = Script(refused, refused, ok)
    async with scripted_client(script) as client:
        assert (await client.chat("hi")).text == "ok"
    assert len(script.times) == 3


async def test_exhausted_attempts_raise_the_last_error(autojump_clock: trio.abc.Clock) -> None:
    """When the attempts run out, the last attempt's error is raised as it is."""
    script = Script(*[status(503)] * 3, ok)
    policy = trio_llm.RetryPolicy(attempts=3, wait_initial=1.0, wait_jitter=0.0)
    async with scripted_client(script, policy) as client:
        with pytest.raises(trio_llm.ServerError, match="scripted 503"):
            await client.chat("hi")
        stats = client.statistics()
    assert (stats.sent, stats.retried, stats.failed) == (3, 2, 1)


async def test_backoff_grows_exponentially_up_to_wait_max(autojump_clock: trio.abc.Clock) -> None:
    """Waits between attempts follow wait_initial * 2**n, capped at wait_max."""
    script = Script(*[status(500)] * 5, ok)
    policy = trio_llm.RetryPolicy(attempts=6, wait_initial=1.0, wait_max=5.0, wait_jitter=0.0)
    async with scripted_client(script, policy) as client:
        await client.chat("hi")
    assert script.gaps == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_jitter_adds_at_most_wait_jitter(autojump_clock: trio.abc.Clock) -> None:
    """Jitter lengthens each wait by a random amount no larger than wait_jitter."""
    script = Script(*[status(500)] * 4, ok)
    policy = trio_llm.RetryPolicy(attempts=6, wait_initial=1.0, wait_max=30.0, wait_jitter=0.5)
    async with scripted_client(script, policy) as client:
        await client.chat("hi")
    for gap, base in zip(script.gaps, [1.0, 2.0, 4.0, 8.0], strict=True):
        assert base <= gap <= base + 0.5


async def test_retry_after_seconds_sets_the_wait(autojump_clock: trio.abc.Clock) -> None:
    """Retry-After in seconds replaces the backoff, even beyond wait_max."""
    script = Script(status(429, **{"retry-after": "7"}), status(503, **{"retry-after": "40"}), ok)
    async with scripted_client(script) as client:
        await client.chat("hi")
    assert script.gaps == [7.0, 40.0]


async def test_retry_after_http_date_sets_the_wait(autojump_clock: trio.abc.Clock) -> None:
    """Retry-After as an HTTP date waits until that (wall-clock) time."""
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    script = Script(status(429, **{"retry-after": when}), ok)
    async with scripted_client(script) as client:
        await client.chat("hi")
    assert 28.5 <= script.gaps[0] <= 30.0


async def test_retry_after_ms_wins(autojump_clock: trio.abc.Clock) -> None:
    """retry-after-ms takes precedence over retry-after."""
    script = Script(status(429, **{"retry-after-ms": "250", "retry-after": "9"}), ok)
    async with scripted_client(script) as client:
        await client.chat("hi")
    assert script.gaps == [0.25]


async def test_wait_past_the_deadline_fails_at_once(autojump_clock: trio.abc.Clock) -> None:
    """A Retry-After longer than the time left raises RetryDeadlineExceeded without sleeping."""
    script = Script(status(429, **{"retry-after": "30"}), ok)
    policy = trio_llm.RetryPolicy(deadline=10.0)
    async with scripted_client(script, policy) as client:
        start = trio.current_time()
        with pytest.raises(trio_llm.RetryDeadlineExceeded) as caught:
            await client.chat("hi")
        assert trio.current_time() == start
        assert client.statistics().failed == 1
    assert isinstance(caught.value.__cause__, trio_llm.RateLimitError)
    assert caught.value.last_error is caught.value.__cause__
    assert caught.value.attempts == 1
    assert "30 s" in str(caught.value)
    assert len(script.times) == 1


async def test_deadline_cuts_a_stalled_attempt(autojump_clock: trio.abc.Clock) -> None:
    """The deadline cancels an attempt the server never answers, at the deadline exactly."""
    policy = trio_llm.RetryPolicy(deadline=5.0)
    async with (
        open_fake_llm(FakeLLMConfig(stall_rate=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", retry=policy) as client,
    ):
        start = trio.current_time()
        with pytest.raises(trio_llm.RetryDeadlineExceeded, match="no response yet"):
            await client.chat("hi")
        assert trio.current_time() - start == pytest.approx(5.0)
        await trio.testing.wait_all_tasks_blocked()
        assert server.stats.disconnects == 1
        assert client.statistics().in_flight == 0


async def test_deadline_cuts_the_wait_for_a_concurrency_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A call queued behind a stalled one fails at its deadline; the slot stays usable."""
    async with (
        open_fake_llm(FakeLLMConfig(stall_rate=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=1) as client,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.chat, "stalls", retry=None))
            await trio.testing.wait_all_tasks_blocked()
            assert client.statistics().in_flight == 1
            start = trio.current_time()
            with pytest.raises(trio_llm.RetryDeadlineExceeded, match="no response yet"):
                await client.chat("waits", retry=trio_llm.RetryPolicy(deadline=3.0))
            assert trio.current_time() - start == pytest.approx(3.0)
            assert client.statistics().sent == 1  # the second was never sent
            nursery.cancel_scope.cancel()
        assert client.statistics().in_flight == 0
        server.config = FakeLLMConfig()
        assert (await client.chat("hi")).text


async def test_deadline_cuts_a_rate_limit_wait(autojump_clock: trio.abc.Clock) -> None:
    """A call that would wait past its deadline for the rate limiter fails at the deadline."""
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(
            base_url=server.base_url,
            model="m",
            rate_limit=trio_llm.RateLimit(requests_per_minute=1),
            retry=trio_llm.RetryPolicy(deadline=4.0),
        ) as client,
    ):
        await client.chat("takes the only request of this minute")
        start = trio.current_time()
        with pytest.raises(trio_llm.RetryDeadlineExceeded, match="no response yet"):
            await client.chat("waits")
        assert trio.current_time() - start == pytest.approx(4.0)
        assert client.statistics().sent == 1
        assert server.stats.total_requests == 1


@pytest.mark.parametrize("own_transport", [True, False])
async def test_error_at_the_deadline_is_reported_as_the_deadline(
    own_transport: bool, autojump_clock: trio.abc.Clock
) -> None:
    """A read timeout that coincides with the deadline counts as the deadline passing."""
    policy = trio_llm.RetryPolicy(deadline=2.0)
    transport = None if own_transport else httpx2.AsyncHTTPTransport()
    async with (
        open_fake_llm(FakeLLMConfig(stall_rate=1.0)) as server,
        trio_llm.open_client(
            base_url=server.base_url,
            model="m",
            retry=policy,
            timeouts=trio_llm.Timeouts(read=2.0),
            transport=transport,
        ) as client,
    ):
        with pytest.raises(trio_llm.RetryDeadlineExceeded, match="deadline of 2 s passed"):
            await client.chat("hi")


async def test_deadline_during_backoff_chains_the_last_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A deadline that passes while waiting raises RetryDeadlineExceeded from the last error."""
    script = Script(*[status(503)] * 10)
    policy = trio_llm.RetryPolicy(
        attempts=10, wait_initial=2.0, wait_max=2.0, wait_jitter=0.0, deadline=5.0
    )
    async with scripted_client(script, policy) as client:
        with pytest.raises(trio_llm.RetryDeadlineExceeded) as caught:
            await client.chat("hi")
    assert isinstance(caught.value.__cause__, trio_llm.ServerError)
    assert script.times[-1] - script.times[0] == pytest.approx(4.0)
    assert len(script.times) == 3


async def test_cancellation_during_backoff_stops_retrying(autojump_clock: trio.abc.Clock) -> None:
    """A caller's cancel scope during the wait ends the call; no attempt follows it."""
    script = Script(status(503), ok)
    policy = trio_llm.RetryPolicy(wait_initial=10.0, wait_jitter=0.0)
    async with scripted_client(script, policy) as client:
        with trio.move_on_after(0.5) as scope:
            await client.chat("hi")
        assert scope.cancelled_caught
        await trio.sleep(60)
        stats = client.statistics()
    assert len(script.times) == 1
    assert (stats.sent, stats.succeeded, stats.failed) == (1, 0, 0)


async def test_per_call_policy_overrides_the_client(autojump_clock: trio.abc.Clock) -> None:
    """retry=None on a call disables retries; another policy replaces the client's."""
    script = Script(status(503), status(503), ok)
    async with scripted_client(script) as client:
        with pytest.raises(trio_llm.ServerError):
            await client.chat("hi", retry=None)
        single = trio_llm.RetryPolicy(attempts=2, wait_initial=0.0, wait_jitter=0.0)
        assert (await client.chat("hi", retry=single)).text == "ok"
    assert len(script.times) == 3


async def test_no_policy_means_no_retries_and_no_deadline(autojump_clock: trio.abc.Clock) -> None:
    """A client opened with retry=None makes one attempt per call."""
    script = Script(status(500), ok)
    async with scripted_client(script, None) as client:
        with pytest.raises(trio_llm.ServerError):
            await client.chat("hi")


async def test_each_retry_is_logged(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """A log record says which request, which attempt, why, and how long it waits."""
    caplog.set_level(logging.INFO, logger="trio_llm.retry")
    script = Script(status(429, **{"retry-after": "3"}), status(502), ok)
    async with scripted_client(script) as client:
        await client.chat("hi")
    messages = [r.getMessage() for r in caplog.records if r.name == "trio_llm.retry"]
    assert len(messages) == 2
    assert "POST http://127.0.0.1:9/v1/chat/completions" in messages[0]
    assert "attempt 1 of 6" in messages[0]
    assert "RateLimitError" in messages[0]
    assert "server asked for 3 s" in messages[0]
    assert "attempt 2 of 6" in messages[1]
    assert "ServerError" in messages[1]
    assert "backoff of at least 2 s" in messages[1]


def test_retryable_classification() -> None:
    """Only LLM errors of the retryable kinds are retryable; never cancellation."""
    assert is_retryable(trio_llm.APITimeoutError("t"))
    assert is_retryable(trio_llm.APIConnectionError("c"))
    assert not is_retryable(trio_llm.APIResponseError("r", status_code=200, request_id=None))
    assert not is_retryable(ValueError("v"))
    assert not is_retryable(KeyboardInterrupt())


def test_policy_validation() -> None:
    """RetryPolicy rejects impossible values."""
    with pytest.raises(ValueError, match="attempts"):
        trio_llm.RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="wait_initial"):
        trio_llm.RetryPolicy(wait_initial=-1)
    with pytest.raises(ValueError, match="deadline"):
        trio_llm.RetryPolicy(deadline=0)


async def test_flaky_server_batch_all_succeeds(autojump_clock: trio.abc.Clock) -> None:
    """500 requests against a server failing 20% and cutting 5% of responses all succeed."""
    config = FakeLLMConfig(error_rate=0.2, error_status=503, disconnect_rate=0.05, seed=3)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=32) as client,
    ):
        replies: list[trio_llm.ChatResponse] = []

        async def one(i: int) -> None:
            replies.append(await client.chat(f"item {i}"))

        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(one, i)
        stats = client.statistics()
    assert len(replies) == 500
    assert stats.succeeded == 500
    assert stats.failed == 0
    assert stats.retried > 100
    assert stats.sent == 500 + stats.retried
    assert server.stats.injected_errors > 50
    assert server.stats.injected_disconnects > 5
