"""Streamed chat replies: aggregation, errors, timeouts, early exit, back-pressure, fan-out."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import attrs
import httpx2
import openai
import pytest
import trio

import trio_llm
from trio_llm._aggregate import Aggregate as _Aggregate
from trio_llm._config import Timeouts
from trio_llm._errors import (
    APIResponseError,
    APITimeoutError,
    RateLimitError,
    ServerError,
    StreamError,
)
from trio_llm._streaming import _BUFFER
from trio_llm._types import ChatChunk, ChatResponse, Result
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def open_chat_stream(
    client: trio_llm.Client,
    prompt: Any,
    *,
    retry: trio_llm.RetryPolicy | None = None,
    **params: Any,
) -> AbstractAsyncContextManager[trio_llm.ChatStream]:
    """``client.stream`` with one attempt unless a policy is given."""
    return client.stream(prompt, retry=retry, **params)


def open_stream_many(
    client: trio_llm.Client,
    prompts: Any,
    *,
    retry: trio_llm.RetryPolicy | None = None,
    **params: Any,
) -> AbstractAsyncContextManager[trio_llm.MultiChatStream]:
    """``client.stream_many`` with one attempt per stream unless a policy is given."""
    return client.stream_many(prompts, retry=retry, **params)


def event(
    content: str | None = None,
    *,
    index: int = 0,
    finish: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    usage: dict[str, int] | None = None,
    choices: bool = True,
    **delta: Any,
) -> dict[str, Any]:
    """Build a chat.completion.chunk payload with one choice (or none)."""
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    payload: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "system_fingerprint": "fp_1",
        "choices": (
            [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if choices
            else []
        ),
    }
    if usage is not None:
        payload["usage"] = usage
    return payload


def sse(payload: dict[str, Any] | str) -> bytes:
    """Render one SSE event."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


HELLO = [
    sse(event("", role="assistant")),
    sse(event("Hel")),
    sse(event("lo")),
    sse(event(finish="stop")),
    sse(event(choices=False, usage={"prompt_tokens": 2, "completion_tokens": 2})),
    sse("[DONE]"),
]


class ScriptedBody(httpx2.AsyncByteStream):
    """A response body acted out step by step: bytes are sent, floats are pauses."""

    def __init__(self, steps: Sequence[bytes | float | Exception]) -> None:
        self.steps = steps
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for step in self.steps:
            if isinstance(step, Exception):
                raise step
            if isinstance(step, float):
                await trio.sleep(step)
            else:
                yield step

    async def aclose(self) -> None:
        self.closed = True


def scripted(
    *steps: bytes | float | Exception,
    bodies: list[ScriptedBody] | None = None,
    requests: list[httpx2.Request] | None = None,
    content_type: str = "text/event-stream",
) -> httpx2.MockTransport:
    """A transport answering every request with the same scripted event stream."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        body = ScriptedBody(steps)
        if bodies is not None:
            bodies.append(body)
        if requests is not None:
            requests.append(request)
        return httpx2.Response(200, headers={"content-type": content_type}, stream=body)

    return httpx2.MockTransport(handle)


def mock_client(transport: httpx2.MockTransport, *, stream_idle: float | None = 60.0) -> Any:
    """Open a client on a mock transport."""
    return trio_llm.open_client(
        base_url="http://llm.test/v1",
        api_key="sk-test",
        model="m",
        transport=transport,
        timeouts=Timeouts(stream_idle=stream_idle),
    )


async def collect(client: trio_llm.Client, prompt: Any, **params: Any) -> tuple[str, ChatResponse]:
    """Stream a reply; return the concatenated chunk text and the aggregate."""
    texts = []
    async with open_chat_stream(client, prompt, **params) as stream:
        async for chunk in stream:
            if chunk.index == 0:
                texts.append(chunk.text)
    return "".join(texts), stream.response


# Aggregation of chunk payloads


def test_aggregate_text_usage_and_choices() -> None:
    """Text is concatenated per choice, finish reasons kept, usage taken from the last chunk."""
    aggregate = _Aggregate()
    payloads = [
        event("", role="assistant"),
        event("", index=1, role="assistant"),
        event("Hel"),
        event("Bon", index=1),
        event("lo", finish="stop"),
        event("jour", index=1),
        event(index=1, finish="length"),
        event(choices=False, usage={"prompt_tokens": 3, "completion_tokens": 4}),
    ]
    chunks = [chunk for payload in payloads for chunk in aggregate.add(payload)]
    assert [(c.index, c.text, c.finish_reason) for c in chunks] == [
        (0, "", None),
        (1, "", None),
        (0, "Hel", None),
        (1, "Bon", None),
        (0, "lo", "stop"),
        (1, "jour", None),
        (1, "", "length"),
    ]
    assert aggregate.finished
    reply = aggregate.to_response()
    assert (reply.text, reply.finish_reason) == ("Hello", "stop")
    assert [(c.text, c.finish_reason) for c in reply.choices] == [
        ("Hello", "stop"),
        ("Bonjour", "length"),
    ]
    assert reply.usage == trio_llm.Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    assert (reply.id, reply.model, reply.raw["object"]) == ("chatcmpl-1", "m", "chat.completion")
    assert reply.raw["system_fingerprint"] == "fp_1"
    assert reply.message == {"role": "assistant", "content": "Hello", "refusal": None}


def test_aggregate_merges_tool_call_deltas() -> None:
    """Tool-call deltas merge by index: id and name once, arguments concatenated."""
    aggregate = _Aggregate()
    call = {"type": "function", "function": {"name": "get_weather", "arguments": ""}}
    payloads = [
        event(None, role="assistant", tool_calls=[{"index": 0, "id": "call_a", **call}]),
        event(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
        event(
            tool_calls=[
                {"index": 1, "id": "call_b", "type": "function", "function": {"name": "time"}}
            ]
        ),
        event(tool_calls=[{"index": 1, "function": {"arguments": "{}"}}]),
        # A server that repeats the id and name on later deltas must not double them.
        event(tool_calls=[{"index": 0, "id": "call_a", "function": {"arguments": '"Oslo"}'}}]),
        event(finish="tool_calls"),
    ]
    chunks = [chunk for payload in payloads for chunk in aggregate.add(payload)]
    assert chunks[1].tool_calls == ({"index": 0, "function": {"arguments": '{"city": '}},)
    reply = aggregate.to_response()
    assert reply.finish_reason == "tool_calls"
    assert reply.message["content"] is None
    assert reply.tool_calls == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}},
    ]


def test_aggregate_keeps_other_delta_fields_and_logprobs() -> None:
    """Refusals and provider fields (reasoning_content) concatenate; logprobs lists extend."""
    aggregate = _Aggregate()
    first = event("", role="assistant", refusal=None, reasoning_content="Let me ")
    first["choices"][0]["logprobs"] = {"content": [{"token": "a"}], "refusal": None}
    second = event("ok", reasoning_content="think.")
    second["choices"][0]["logprobs"] = {"content": [{"token": "b"}]}
    for payload in (first, second, event(finish="stop")):
        aggregate.add(payload)
    choice = aggregate.to_response().raw["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "ok",
        "refusal": None,
        "reasoning_content": "Let me think.",
    }
    assert choice["logprobs"] == {"content": [{"token": "a"}, {"token": "b"}], "refusal": None}


def test_chat_chunk_from_json_tolerates_odd_payloads() -> None:
    """ChatChunk.from_json reads the first choice and survives missing or odd fields."""
    chunk = ChatChunk.from_json(event("hi", finish="stop"))
    assert (chunk.text, chunk.index, chunk.finish_reason, chunk.tool_calls) == ("hi", 0, "stop", ())
    empty = ChatChunk.from_json({"choices": [{"delta": None, "finish_reason": 3}]})
    assert (empty.text, empty.finish_reason, empty.delta) == ("", None, {})
    assert ChatChunk.from_json({}).text == ""


def test_chat_chunk_from_json_equals_the_constructed_chunk() -> None:
    """from_json fills every field (it bypasses __init__) exactly as __init__ would."""
    calls = [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{"}}, "junk"]
    payload = {
        "id": "x",
        "choices": [
            {"index": 2, "delta": {"content": "hey", "tool_calls": calls}, "finish_reason": "stop"}
        ],
    }
    choice = payload["choices"][0]
    chunk = ChatChunk.from_json(payload, choice)
    expected = ChatChunk(
        text="hey",
        index=2,
        finish_reason="stop",
        tool_calls=(calls[0],),
        delta=choice["delta"],
        raw=payload,
    )
    assert chunk == expected
    # Every field has a value: one added to the class but not to from_json would be unset.
    assert attrs.asdict(chunk, recurse=False) == attrs.asdict(expected, recurse=False)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        chunk.text = "no"  # type: ignore[misc]


# One stream against the fake server


async def test_stream_matches_non_streamed_reply(fake_llm: FakeLLMServer) -> None:
    """The streamed text, message and usage equal the non-streamed reply to the same request."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        text, streamed = await collect(client, "Write a story.", max_tokens=60)
        reply = await client.chat("Write a story.", max_tokens=60)
        stats = client.statistics()
    assert text == streamed.text == reply.text != ""
    assert streamed.message == reply.message
    assert streamed.finish_reason == reply.finish_reason is not None
    assert streamed.usage == reply.usage  # include_usage was asked for by default
    assert (stats.sent, stats.succeeded, stats.failed, stats.in_flight) == (2, 2, 0, 0)
    assert stats.completion_tokens == 2 * reply.usage.completion_tokens


async def test_stream_tool_calls_and_choices_match(fake_llm: FakeLLMServer) -> None:
    """Tool calls and n > 1 choices aggregate exactly as the non-streamed reply has them."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        _, streamed = await collect(client, "Weather in Oslo?", tools=TOOLS)
        reply = await client.chat("Weather in Oslo?", tools=TOOLS)
        assert streamed.tool_calls == reply.tool_calls != []
        assert streamed.message == reply.message
        _, streamed = await collect(client, "Three answers.", n=3, max_tokens=8)
        reply = await client.chat("Three answers.", n=3, max_tokens=8)
    assert [c.message for c in streamed.choices] == [c.message for c in reply.choices]
    assert len(streamed.choices) == 3


async def test_request_body_and_callers_stream_options() -> None:
    """The body asks for a stream with usage; the caller's own stream_options win."""
    requests: list[httpx2.Request] = []
    async with mock_client(scripted(*HELLO, requests=requests)) as client:
        await collect(client, "hi", temperature=0.5)
        await collect(client, "hi", stream_options={"include_usage": False, "x": 1})
    first, second = (json.loads(r.content) for r in requests)
    assert first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    assert first["temperature"] == 0.5
    assert second["stream_options"] == {"include_usage": False, "x": 1}
    assert requests[0].headers["accept"] == "text/event-stream"


async def test_response_before_the_end_is_an_error() -> None:
    """stream.response raises until the stream has been read to its end."""
    async with mock_client(scripted(*HELLO)) as client:
        async with open_chat_stream(client, "hi") as stream:
            with pytest.raises(RuntimeError):
                _ = stream.response
            async for _ in stream:
                pass
        assert stream.response.text == "Hello"
        assert stream.statistics() == attrs.evolve(
            stream.statistics(), chunks_received=4, chunks_delivered=4
        )


async def test_stream_ending_after_finish_without_done_is_complete() -> None:
    """A server that omits [DONE] but finished every choice gives a complete reply."""
    async with mock_client(scripted(*HELLO[:-1])) as client:
        text, reply = await collect(client, "hi")
    assert text == reply.text == "Hello"


# Errors


async def test_error_event_mid_stream_raises_stream_error() -> None:
    """An error payload inside the stream raises StreamError with the text so far."""
    error = {"message": "overloaded", "type": "server_error", "code": "busy"}
    transport = scripted(*HELLO[:3], sse({"error": error}), *HELLO[3:])
    async with mock_client(transport) as client:
        texts: list[str] = []

        async def consume() -> None:
            async with open_chat_stream(client, "hi") as stream:
                async for chunk in stream:
                    texts.append(chunk.text)

        with pytest.raises(StreamError) as caught:
            await consume()
        stats = client.statistics()
    assert "".join(texts) == caught.value.text_so_far == "Hello"
    assert caught.value.error_body == error
    assert "overloaded" in str(caught.value)
    assert "code=busy" in str(caught.value)
    assert (stats.succeeded, stats.failed) == (0, 1)


async def test_error_typed_event_and_malformed_event() -> None:
    """An `event: error` and a data line that is not JSON both raise StreamError."""
    for bad in (b'event: error\ndata: {"message": "boom"}\n\n', b"data: {not json\n\n"):
        async with mock_client(scripted(*HELLO[:2], bad)) as client:
            with pytest.raises(StreamError) as caught:
                await collect(client, "hi")
        assert caught.value.text_so_far == "Hel"


async def test_error_as_first_event_raises_its_status_from_async_with() -> None:
    """An error event before any content raises as its status from ``async with``."""
    async with mock_client(scripted(sse({"error": "model overloaded"}))) as client:
        with pytest.raises(ServerError, match="model overloaded") as caught:
            async with open_chat_stream(client, "hi"):
                pass
    assert caught.value.status_code == 500
    assert client.statistics().failed == 1


async def test_error_after_content_raises_from_the_loop() -> None:
    """An error event after content has been delivered raises StreamError from the loop."""
    async with (
        mock_client(scripted(*HELLO[:3], sse({"error": "model overloaded"}))) as client,
        open_chat_stream(client, "hi") as stream,
    ):
        with pytest.raises(StreamError, match="model overloaded") as caught:
            async for _ in stream:
                pass
    assert caught.value.text_so_far == "Hello"
    assert caught.value.error_body == "model overloaded"


async def test_other_event_types_are_ignored() -> None:
    """Events of types the API does not define, and empty data, are skipped."""
    extra = b'event: ping\ndata: {"x": 1}\n\n: comment\n\ndata:\n\n'
    async with mock_client(scripted(extra, *HELLO[:2], extra, *HELLO[2:])) as client:
        text, reply = await collect(client, "hi")
    assert text == reply.text == "Hello"


async def test_cut_stream_raises_stream_error() -> None:
    """A connection cut mid-stream, or a clean end before [DONE], raises StreamError."""
    for ending in (httpx2.RemoteProtocolError("peer closed connection"), b""):
        async with mock_client(scripted(*HELLO[:3], ending)) as client:
            with pytest.raises(StreamError) as caught:
                await collect(client, "hi")
        assert caught.value.text_so_far == "Hello"


async def test_disconnect_mid_stream_raises_stream_error() -> None:
    """The fake server cutting the stream halfway gives StreamError with a prefix of the reply."""
    async with (
        open_fake_llm(FakeLLMConfig(disconnect_rate=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="fake-gpt") as client,
    ):
        with pytest.raises(StreamError) as caught:
            await collect(client, "Write a story.", max_tokens=40)
        server.config = attrs.evolve(server.config, disconnect_rate=0.0)
        full = await client.chat("Write a story.", max_tokens=40)
        assert client.statistics().failed == 1
    partial = caught.value.text_so_far
    assert partial
    assert full.text.startswith(partial)
    assert len(partial) < len(full.text)


async def test_error_status_before_the_stream() -> None:
    """An error status raises the ordinary APIStatusError from `async with`, counted."""
    config = FakeLLMConfig(error_rate=1.0, error_status=503)
    async with (
        open_fake_llm(config) as server,
        # No client-side rate limit: it would learn the server's and never get a 429.
        trio_llm.open_client(base_url=server.base_url, model="fake-gpt", rate_limit=None) as client,
    ):
        with pytest.raises(ServerError) as caught:
            async with open_chat_stream(client, "hi"):
                raise AssertionError("not reached")
        assert caught.value.status_code == 503
        server.config = FakeLLMConfig(requests_per_minute=1)
        await collect(client, "hi")
        with pytest.raises(RateLimitError):
            await collect(client, "hi")
        stats = client.statistics()
    assert (stats.sent, stats.succeeded, stats.failed, stats.rate_limited) == (3, 1, 2, 1)
    assert stats.in_flight == 0


async def test_json_body_instead_of_a_stream() -> None:
    """A success status with a JSON body raises APIResponseError."""
    transport = scripted(b'{"id": "x"}', content_type="application/json")
    async with mock_client(transport) as client:
        with pytest.raises(APIResponseError, match="not an event stream"):
            await collect(client, "hi")


async def test_empty_stream_raises_api_response_error() -> None:
    """A stream that ends before any event raises APIResponseError."""
    async with mock_client(scripted(b": only a comment\n\n")) as client:
        with pytest.raises(APIResponseError, match="before its first event"):
            await collect(client, "hi")


# Retries: before the first event only


async def test_failure_before_first_event_is_retried(autojump_clock: trio.abc.Clock) -> None:
    """A 503 or a cut before the first event is retried under the policy, then streams."""
    answers: list[httpx2.Response] = [
        httpx2.Response(503, json={"error": {"message": "busy"}}),
        httpx2.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=ScriptedBody([httpx2.ReadError("reset")]),
        ),
        httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, stream=ScriptedBody(HELLO)
        ),
    ]
    transport = httpx2.MockTransport(lambda request: answers.pop(0))
    policy = trio_llm.RetryPolicy(attempts=3, wait_initial=0.5)
    async with mock_client(transport) as client:
        async with open_chat_stream(client, "hi", retry=policy) as stream:
            assert client.statistics().in_flight == 1  # the slot is held for the stream
            text = "".join([chunk.text async for chunk in stream])
        stats = client.statistics()
    assert text == "Hello"
    assert (stats.sent, stats.retried, stats.succeeded, stats.failed) == (3, 2, 1, 0)
    assert stats.in_flight == 0


async def test_rate_limited_before_the_stream_waits_and_retries(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A 429 before the first event is counted, honours Retry-After and is retried."""
    answers: list[httpx2.Response] = [
        httpx2.Response(429, headers={"retry-after": "7"}, json={"error": {"message": "slow"}}),
        httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, stream=ScriptedBody(HELLO)
        ),
    ]
    transport = httpx2.MockTransport(lambda request: answers.pop(0))
    async with mock_client(transport) as client:
        start = trio.current_time()
        text, _ = await collect(client, "hi", retry=trio_llm.RetryPolicy(attempts=2))
        assert trio.current_time() - start >= 7.0
        stats = client.statistics()
    assert text == "Hello"
    assert (stats.sent, stats.rate_limited, stats.retried) == (2, 1, 1)


async def test_failure_after_first_event_is_not_retried() -> None:
    """A stream cut after its first event raises StreamError without another attempt."""
    async with (
        open_fake_llm(FakeLLMConfig(disconnect_rate=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="fake-gpt") as client,
    ):
        with pytest.raises(StreamError):
            await collect(client, "hi", retry=trio_llm.RetryPolicy(attempts=5))
        stats = client.statistics()
    assert (stats.sent, stats.retried, stats.failed) == (1, 0, 1)


async def test_idle_before_first_event_is_retried(autojump_clock: trio.abc.Clock) -> None:
    """A stall before the first event is an APITimeoutError, retried until attempts run out."""
    async with (
        open_fake_llm(FakeLLMConfig(stall_rate=1.0)) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="fake-gpt", timeouts=Timeouts(stream_idle=2.0)
        ) as client,
    ):
        with pytest.raises(APITimeoutError):
            await collect(client, "hi", retry=trio_llm.RetryPolicy(attempts=3))
        stats = client.statistics()
    assert (stats.sent, stats.retried, stats.failed, stats.in_flight) == (3, 2, 1, 0)


async def test_streams_share_the_clients_rate_limit(autojump_clock: trio.abc.Clock) -> None:
    """Streams wait for the client's rate limiter like any call."""
    limit = trio_llm.RateLimit(requests_per_minute=2)
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model="m", rate_limit=limit) as client,
    ):
        start = trio.current_time()
        for _ in range(3):
            await collect(client, "hi")
        await client.chat("hi")
    assert trio.current_time() - start == pytest.approx(60.0)  # 2 at once, then 1 per 30 s


# The idle timeout


async def test_idle_timeout_before_first_event(autojump_clock: trio.abc.Clock) -> None:
    """A server that never answers raises APITimeoutError after stream_idle."""
    async with (
        open_fake_llm(FakeLLMConfig(stall_rate=1.0)) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="fake-gpt", timeouts=Timeouts(stream_idle=7.0)
        ) as client,
    ):
        start = trio.current_time()
        with pytest.raises(APITimeoutError, match=r"stream_idle=7\.0"):
            await collect(client, "hi")
        assert trio.current_time() - start == pytest.approx(7.0)
        assert client.statistics().failed == 1


async def test_idle_timeout_between_events(autojump_clock: trio.abc.Clock) -> None:
    """A server that goes quiet mid-stream raises StreamError after stream_idle."""
    async with mock_client(scripted(*HELLO[:3], 100.0, *HELLO[3:]), stream_idle=5.0) as client:
        start = trio.current_time()
        with pytest.raises(StreamError, match=r"stream_idle=5\.0") as caught:
            await collect(client, "hi")
        assert trio.current_time() - start == pytest.approx(5.0)
    assert caught.value.text_so_far == "Hello"


async def test_silence_after_the_role_is_a_timeout_before_the_reply(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A stream quiet after its role-only first event times out before the reply: retried."""
    config = FakeLLMConfig(tokens_per_second=0.01)  # 100 s per token
    policy = trio_llm.RetryPolicy(attempts=2, wait_initial=0.0, wait_jitter=0.0)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="fake-gpt", timeouts=Timeouts(stream_idle=5.0)
        ) as client,
    ):
        start = trio.current_time()
        with pytest.raises(APITimeoutError, match=r"stream_idle=5\.0"):
            async with client.stream("hi", retry=policy):
                pass
        assert trio.current_time() - start == pytest.approx(10.0)
        assert client.statistics().sent == 2


async def test_keep_alive_comments_do_not_reset_idle(autojump_clock: trio.abc.Clock) -> None:
    """Keep-alive comments arrive every second, yet the idle timeout still expires."""
    pings: list[bytes | float | Exception] = [1.0, b": keep-alive\n\n"] * 60
    async with mock_client(scripted(*HELLO[:3], *pings, *HELLO[3:]), stream_idle=10.0) as client:
        start = trio.current_time()
        with pytest.raises(StreamError) as caught:
            await collect(client, "hi")
        assert trio.current_time() - start == pytest.approx(10.0)
    assert caught.value.text_so_far == "Hello"


async def test_slow_consumer_is_not_idleness(autojump_clock: trio.abc.Clock) -> None:
    """Time spent waiting for a slow consumer does not count toward stream_idle."""
    async with mock_client(scripted(*HELLO), stream_idle=1.0) as client:
        async with open_chat_stream(client, "hi") as stream:
            async for _ in stream:
                await trio.sleep(30)
        assert stream.response.text == "Hello"


# Leaving early


async def test_break_closes_the_response(autojump_clock: trio.abc.Clock) -> None:
    """Breaking out closes the connection (the server sees it go) and the pool stays usable."""
    async with (
        open_fake_llm(FakeLLMConfig(tokens_per_second=50)) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="fake-gpt", max_concurrency=1
        ) as client,
    ):
        async with open_chat_stream(client, "Write a story.", max_tokens=500) as stream:
            async for chunk in stream:
                if chunk.text:
                    break
        await trio.sleep(0.1)  # let the server notice
        assert server.stats.disconnects == 1
        stats = client.statistics()
        assert (stats.in_flight, stats.succeeded, stats.failed) == (0, 0, 0)
        _, reply = await collect(client, "Again.", max_tokens=5)
    assert reply.text


async def test_streams_without_usage_settle_their_rate_reservations(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A stream left early, or ended without usage, stops counting as in flight.

    Otherwise the adaptive limiter would count it against the first limit it learns.
    """
    async with (
        open_fake_llm(FakeLLMConfig(tokens_per_second=50)) as server,
        trio_llm.open_client(base_url=server.base_url, model="fake-gpt") as client,
    ):
        rate = client._rate
        assert rate is not None
        async with open_chat_stream(client, "Write a story.", max_tokens=500) as stream:
            async for _ in stream:
                break
        no_usage = {"stream_options": {"include_usage": False}}
        async with open_chat_stream(client, "Short.", max_tokens=3, **no_usage) as stream:
            async for _ in stream:
                pass
        assert (rate._in_flight_requests, rate._in_flight_tokens) == (0, 0)


async def test_break_at_finish_reason_keeps_the_connection(fake_llm: FakeLLMServer) -> None:
    """Leaving right after the finish reason still reads the body's end: no disconnect."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        for i in range(10):
            async with open_chat_stream(client, f"Question {i}?") as stream:
                async for chunk in stream:
                    if chunk.finish_reason is not None:
                        break
            assert stream.response.usage.total_tokens > 0
        assert client.statistics().succeeded == 10
    assert fake_llm.stats.disconnects == 0


async def test_cancel_scope_closes_the_response(autojump_clock: trio.abc.Clock) -> None:
    """A cancelled scope around the stream closes it; the next request works."""
    async with (
        open_fake_llm(FakeLLMConfig(tokens_per_second=2)) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="fake-gpt", max_concurrency=1
        ) as client,
    ):
        with trio.move_on_after(1.0) as scope:
            await collect(client, "Write a story.")  # at least 8 tokens: 4 s
        assert scope.cancelled_caught
        await trio.sleep(0.1)
        assert server.stats.disconnects == 1
        assert client.statistics().in_flight == 0
        _, reply = await collect(client, "Again.", max_tokens=5)
    assert reply.text


async def test_break_while_the_reader_waits(autojump_clock: trio.abc.Clock) -> None:
    """Leaving while the reader is blocked on a full channel closes everything cleanly."""
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model="fake-gpt") as client,
    ):
        async with open_chat_stream(client, "A long story.", n=20) as stream:
            async for _ in stream:
                await trio.sleep(1.0)  # the reader fills the channel and waits
                if stream.statistics().chunks_delivered == 30:
                    break
        assert client.statistics().in_flight == 0
        _, reply = await collect(client, "Again.")
    assert reply.text


async def test_exception_in_block_propagates_unwrapped() -> None:
    """An exception raised in the block comes out as itself, not in an ExceptionGroup."""
    bodies: list[ScriptedBody] = []
    async with mock_client(scripted(*HELLO, bodies=bodies)) as client:

        async def fail_in_block() -> None:
            async with open_chat_stream(client, "hi") as stream:
                async for _ in stream:
                    raise KeyError("mine")

        with pytest.raises(KeyError):
            await fail_in_block()
        assert client.statistics().in_flight == 0
    assert bodies[0].closed


# Back-pressure


async def test_slow_consumer_bounds_the_reader(autojump_clock: trio.abc.Clock) -> None:
    """A consumer that sleeps keeps the reader at most a few chunks ahead of it."""
    ahead = []
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model="fake-gpt") as client,
        # Twenty choices of 8 to 40 tokens each: hundreds of chunks.
        open_chat_stream(client, "A long story.", n=20) as stream,
    ):
        async for _ in stream:
            await trio.sleep(1.0)
            stats = stream.statistics()
            ahead.append(stats.chunks_received - stats.chunks_delivered)
    assert len(ahead) > 200
    assert max(ahead) <= _BUFFER + 1


# Several streams at once


async def test_stream_many_multiplexes_in_order(autojump_clock: trio.abc.Clock) -> None:
    """Chunks interleave across prompts, each prompt's in order, then one result per prompt."""
    prompts = [f"Story number {i}." for i in range(6)]
    async with (
        open_fake_llm(FakeLLMConfig(tokens_per_second=20)) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="fake-gpt", max_concurrency=2
        ) as client,
    ):
        texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
        finished: list[int] = []
        order: list[int] = []
        async with open_stream_many(client, prompts, max_tokens=10) as streams:
            async for index, item in streams:
                assert index not in finished  # nothing after a prompt's result
                order.append(index)
                if isinstance(item, Result):
                    finished.append(index)
                    assert item.ok
                    assert item.value is not None
                    assert item.value.text == "".join(texts[index])
                else:
                    texts[index].append(item.text)
        results = streams.results
        expected = [await client.chat(p, max_tokens=10) for p in prompts]
    assert sorted(finished) == list(range(len(prompts)))
    assert [r.unwrap().text for r in results] == [e.text for e in expected]
    assert server.stats.peak_concurrency == 2
    first_two = [index for index in order if index < 2]
    assert first_two != sorted(first_two)  # the first two streams interleave


async def test_stream_many_reports_failures_as_results() -> None:
    """A failed stream is delivered as its result; the others complete."""
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=0.5, seed=3)) as server,
        trio_llm.open_client(base_url=server.base_url, model="fake-gpt") as client,
        open_stream_many(client, ["a", "b", "c", "d", "e", "f"]) as streams,
    ):
        async for _ in streams:
            pass
    results = streams.results
    assert len(results) == 6
    failed = [r for r in results if not r.ok]
    assert failed
    assert len(failed) < 6
    assert all(isinstance(r.error, ServerError) for r in failed)
    assert all(r.unwrap().text for r in results if r.ok)


async def test_stream_many_early_exit_cancels_all(autojump_clock: trio.abc.Clock) -> None:
    """Leaving the block early closes every open stream and starts no more."""
    async with (
        open_fake_llm(FakeLLMConfig(tokens_per_second=10)) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="fake-gpt", max_concurrency=3
        ) as client,
    ):
        async with open_stream_many(client, ["a"] * 10, max_tokens=100) as streams:
            async for _, item in streams:
                if isinstance(item, ChatChunk) and item.text:
                    break
        with pytest.raises(RuntimeError):
            _ = streams.results
        await trio.sleep(0.1)
        assert server.stats.total_requests == 3
        assert server.stats.disconnects == 3
        assert client.statistics().in_flight == 0


async def test_stream_many_edge_cases(fake_llm: FakeLLMServer) -> None:
    """No prompts end at once; a single string is refused; errors in the block stay bare."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        async with open_stream_many(client, []) as streams:
            assert [item async for item in streams] == []
        assert streams.results == []
        with pytest.raises(TypeError):
            async with open_stream_many(client, "one string"):
                pass

        async def fail_in_block() -> None:
            async with open_stream_many(client, ["a", "b"]) as streams:
                async for _ in streams:
                    raise KeyError("mine")

        with pytest.raises(KeyError):
            await fail_in_block()
        assert client.statistics().in_flight == 0


# Interoperability and examples


# openai's AsyncStream leaves its own and httpx2's body generators for the GC to close
# (checked: trio-llm's streams alone raise no such warning).
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_openai_client_agrees(fake_llm: FakeLLMServer) -> None:
    """The official openai client and trio-llm read the same text from the same stream."""
    oa = openai.AsyncOpenAI(base_url=fake_llm.base_url, api_key="sk-test", max_retries=0)
    try:
        async with await oa.chat.completions.create(
            model="fake-gpt",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=50,
            stream=True,
        ) as stream:
            theirs = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await oa.close()
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        ours, _ = await collect(client, "Tell me a story.", max_tokens=50)
    assert ours == theirs != ""


def load_example(name: str) -> Any:
    """Import an example script as a module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def public_stream_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Provide Client.stream/stream_many and trio_llm.ChatChunk if not yet wired in."""
    if not hasattr(trio_llm.Client, "stream"):
        monkeypatch.setattr(trio_llm.Client, "stream", open_chat_stream, raising=False)
        monkeypatch.setattr(trio_llm.Client, "stream_many", open_stream_many, raising=False)
    monkeypatch.setattr(trio_llm, "ChatChunk", ChatChunk, raising=False)


@pytest.mark.usefixtures("public_stream_api")
@pytest.mark.parametrize("name", ["streaming", "stream_many"])
@pytest.mark.parametrize("remote", [False, True], ids=["offline", "base-url"])
async def test_examples_run(
    name: str, remote: bool, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """Each example runs with no arguments on its own fake server, or against --base-url."""
    out, err = io.StringIO(), io.StringIO()
    async with open_fake_llm() as server:
        argv = ["--base-url", server.base_url, "--model", "m"] if remote else []
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
        with redirect_stdout(out), redirect_stderr(err), trio.fail_after(10):
            await load_example(name).main()
    assert ("fake server" in err.getvalue()) is not remote
    assert len(out.getvalue()) > 40
    if name == "stream_many":
        assert {line[:3] for line in out.getvalue().splitlines()} == {"[0]", "[1]", "[2]"}
