"""The Anthropic Messages provider: the official SDK against the fake server, then trio-llm's
own Anthropic path end to end (translation both ways, streams, errors, retries, faults)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import attrs
import httpx2
import pytest
import trio

import trio_llm
from trio_llm.providers._anthropic import AnthropicProvider
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

MODEL = "claude-fake"
SYSTEM = "You are a fake model."
QUESTION = "Say something about Trio."
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Look up the weather.",
        "parameters": WEATHER_SCHEMA,
    },
}
MESSAGE_REPLY = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 1},
}

Handler = Callable[[httpx2.Request], httpx2.Response]


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    """Render Anthropic server-sent events."""
    return b"".join(
        f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()
        for kind, data in events
    )


def scripted(*steps: Handler, seen: list[httpx2.Request] | None = None) -> httpx2.MockTransport:
    """A MockTransport answering with each step in turn (the last one repeats)."""
    remaining = list(steps)

    def handle(request: httpx2.Request) -> httpx2.Response:
        if seen is not None:
            seen.append(request)
        step = remaining.pop(0) if len(remaining) > 1 else remaining[0]
        return step(request)

    return httpx2.MockTransport(handle)


def reply(
    status: int = 200, body: Any = MESSAGE_REPLY, headers: dict[str, str] | None = None
) -> Handler:
    """A scripted JSON response."""
    return lambda request: httpx2.Response(status, json=body, headers=headers)


def body_of(request: httpx2.Request) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(request.content)
    return data


def mock_client(transport: httpx2.MockTransport, **kwargs: Any) -> Any:
    kwargs.setdefault("api_key", "sk-ant-test")
    return trio_llm.open_client(
        provider="anthropic",
        base_url="https://api.anthropic.test",
        model=MODEL,
        transport=transport,
        **kwargs,
    )


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with open_fake_llm(FakeLLMConfig(api_key="sk-ant-test")) as fake:
        yield fake


@pytest.fixture
async def sdk(server: FakeLLMServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(
        base_url=server.root_url,
        api_key="sk-ant-test",
        max_retries=0,
        _strict_response_validation=True,
    )
    try:
        yield client
    finally:
        await client.close()


def open_anthropic(server: FakeLLMServer, **kwargs: Any) -> Any:
    kwargs.setdefault("api_key", "sk-ant-test")
    return trio_llm.open_client(
        provider="anthropic", base_url=server.root_url, model=MODEL, **kwargs
    )


# --- the official SDK against the fake server -------------------------------------------


async def test_sdk_messages_create(sdk: anthropic.AsyncAnthropic) -> None:
    """messages.create validates the fake server's reply strictly."""
    message = await sdk.messages.create(
        model=MODEL,
        max_tokens=32,
        system=SYSTEM,
        messages=[{"role": "user", "content": QUESTION}],
    )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.stop_reason in ("end_turn", "max_tokens")
    [block] = message.content
    assert block.type == "text"
    assert block.text
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0


async def test_sdk_stream_matches_create(sdk: anthropic.AsyncAnthropic) -> None:
    """A streamed message has the same text and usage as the JSON one."""
    whole = await sdk.messages.create(
        model=MODEL, max_tokens=16, system=SYSTEM, messages=[{"role": "user", "content": QUESTION}]
    )
    async with sdk.messages.stream(
        model=MODEL, max_tokens=16, system=SYSTEM, messages=[{"role": "user", "content": QUESTION}]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert whole.content[0].type == "text"
    assert text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


async def test_sdk_tool_use(sdk: anthropic.AsyncAnthropic) -> None:
    """A forced tool call comes back as a tool_use block with a dict input."""
    message = await sdk.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[{"name": "get_weather", "input_schema": WEATHER_SCHEMA}],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    assert isinstance(block.input, dict)


# --- trio-llm's Anthropic path against the fake server -------------------------------------


async def test_chat_maps_the_reply(server: FakeLLMServer) -> None:
    """chat() returns the text, finish reason, usage, and the Messages payload in raw."""
    async with open_anthropic(server) as client:
        reply = await client.chat(CONVERSATION, max_tokens=32)
    assert reply.text
    assert reply.finish_reason in ("stop", "length")
    assert reply.message["role"] == "assistant"
    assert reply.message["content"] == reply.text
    assert reply.usage.prompt_tokens == reply.raw["usage"]["input_tokens"]
    assert reply.usage.completion_tokens == reply.raw["usage"]["output_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.raw["type"] == "message"
    assert reply.id.startswith("msg_")
    assert reply.model == MODEL
    assert reply.request_id
    assert server.stats.requests_by_endpoint["/v1/messages"] == 1


async def test_same_text_as_the_openai_path(server: FakeLLMServer) -> None:
    """The same conversation gets the same text through either provider, streamed or not."""
    async with trio_llm.open_client(
        base_url=server.base_url, api_key="sk-ant-test", model=MODEL
    ) as openai_client:
        expected = await openai_client.chat(CONVERSATION, max_tokens=24)
    async with open_anthropic(server) as client:
        whole = await client.chat(CONVERSATION, max_tokens=24)
        async with client.stream(CONVERSATION, max_tokens=24) as stream:
            chunks = [chunk async for chunk in stream]
    assert whole.text == expected.text
    assert "".join(chunk.text for chunk in chunks) == expected.text
    assert whole.finish_reason == expected.finish_reason
    assert stream.response.text == expected.text
    assert stream.response.finish_reason == expected.finish_reason
    assert chunks[-1].finish_reason == expected.finish_reason
    assert stream.response.usage == whole.usage
    assert stream.response.id.startswith("msg_")
    assert stream.response.model == MODEL


async def test_max_tokens_maps_to_length(server: FakeLLMServer) -> None:
    """A reply cut by max_tokens finishes with "length", streamed or not."""
    async with open_anthropic(server) as client:
        whole = await client.chat(QUESTION, max_tokens=2)
        async with client.stream(QUESTION, max_tokens=2) as stream:
            async for _ in stream:
                pass
    assert whole.raw["stop_reason"] == "max_tokens"
    assert whole.finish_reason == "length"
    assert whole.usage.completion_tokens == 2
    assert stream.response.finish_reason == "length"


async def test_tool_calls_both_ways(server: FakeLLMServer) -> None:
    """OpenAI-style tools give OpenAI-shaped tool_calls; sending them back is accepted."""
    async with open_anthropic(server) as client:
        first = await client.chat(
            "Weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        async with client.stream(
            "Weather in Paris?", tools=[WEATHER_TOOL], tool_choice="required"
        ) as stream:
            chunks = [chunk async for chunk in stream]
        assert first.finish_reason == "tool_calls"
        [call] = first.tool_calls
        assert call["type"] == "function"
        assert call["function"]["name"] == "get_weather"
        arguments = json.loads(call["function"]["arguments"])
        assert arguments == first.raw["content"][0]["input"]
        assert call["id"] == first.raw["content"][0]["id"]
        assert first.message["content"] is None
        assert first.text == ""
        # Streamed: the same call, assembled from input_json_delta fragments.
        assert stream.response.finish_reason == "tool_calls"
        assert stream.response.tool_calls == first.tool_calls
        assert any(chunk.tool_calls for chunk in chunks)
        # Back: the assistant's tool_calls and a tool message, as an OpenAI caller sends.
        follow_up = [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": first.tool_calls},
            {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"},
        ]
        second = await client.chat(follow_up, tools=[WEATHER_TOOL], tool_choice="none")
    assert second.finish_reason == "stop"
    assert second.text


async def test_stream_many_and_chat_many(server: FakeLLMServer) -> None:
    """Fan-out works on the Anthropic path, with one reply per prompt in order."""
    prompts = [f"Question {i}?" for i in range(5)]
    async with open_anthropic(server) as client:
        results = await client.chat_many(prompts, max_tokens=8)
        async with client.stream_many(prompts, max_tokens=8) as streams:
            async for _ in streams:
                pass
        streamed = streams.results
    assert [r.unwrap().text for r in results] == [r.unwrap().text for r in streamed]


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, trio_llm.BadRequestError),
        (403, trio_llm.PermissionDeniedError),
        (404, trio_llm.NotFoundError),
        (429, trio_llm.RateLimitError),
        (500, trio_llm.ServerError),
        (529, trio_llm.ServerError),
    ],
)
async def test_error_statuses_are_mapped(
    server: FakeLLMServer, status: int, error_type: type[trio_llm.APIStatusError]
) -> None:
    """Anthropic error bodies become the matching APIStatusError, message and request id."""
    server.config = attrs.evolve(server.config, error_rate=1.0, error_status=status)
    async with open_anthropic(server, retry=None) as client:
        with pytest.raises(error_type) as info:
            await client.chat(QUESTION)
        with pytest.raises(error_type):
            async with client.stream(QUESTION):
                pass  # pragma: no cover
    assert info.value.status_code == status
    assert "Injected error" in str(info.value)
    assert info.value.request_id


async def test_stream_error_status_raises_from_async_with(server: FakeLLMServer) -> None:
    """A 401 before the stream starts raises AuthenticationError from async with."""
    async with open_anthropic(server, api_key="sk-ant-wrong", retry=None) as client:
        with pytest.raises(trio_llm.AuthenticationError):
            async with client.stream(QUESTION):
                pass  # pragma: no cover


async def test_faults_are_retried(autojump_clock: trio.abc.Clock) -> None:
    """Injected 529s, 500s and disconnects are retried until every item succeeds."""
    config = FakeLLMConfig(error_rate=0.3, error_status=529, disconnect_rate=0.1, seed=7)
    prompts = [f"Item {i}" for i in range(30)]
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(provider="anthropic", base_url=server.root_url, model=MODEL) as client,
    ):
        results = await client.chat_many(prompts, max_tokens=8)
        async with client.stream(QUESTION, max_tokens=8) as stream:
            async for _ in stream:
                pass
        stats = client.statistics()
    assert all(result.ok for result in results), [r.error for r in results if not r.ok]
    assert stream.response.text
    assert server.stats.injected_errors > 0
    assert server.stats.injected_disconnects > 0
    assert stats.retried >= server.stats.injected_errors
    assert server.stats.requests_by_status[529] == server.stats.injected_errors


async def test_the_api_key_never_leaks(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A rejected key appears in no error message, repr or log record."""
    secret = "sk-ant-secret-42"
    caplog.set_level(logging.DEBUG, logger="trio_llm")
    async with open_anthropic(server, api_key=secret, retry=None) as client:
        with pytest.raises(trio_llm.AuthenticationError) as info:
            await client.chat(QUESTION)
        text = repr(client)
    assert info.value.status_code == 401
    for shown in (str(info.value), repr(info.value), repr(info.value.body), text, caplog.text):
        assert secret not in shown


# --- request building and wire details, against scripted responses ----------------------


async def test_request_headers_and_body() -> None:
    """x-api-key and anthropic-version are sent; system lifted; max_tokens defaulted."""
    seen: list[httpx2.Request] = []
    async with mock_client(scripted(reply(), seen=seen), api_key="sk-ant-k") as client:
        reply_ = await client.chat(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
                {"role": "user", "content": "Hi"},
            ],
            top_k=5,
        )
    [request] = seen
    assert str(request.url) == "https://api.anthropic.test/v1/messages"
    assert request.headers["x-api-key"] == "sk-ant-k"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert body_of(request) == {
        "model": MODEL,
        "max_tokens": 1024,
        "system": "Be brief.\nBe kind.",
        "messages": [{"role": "user", "content": "Hi"}],
        "top_k": 5,
    }
    assert reply_.text == "hi"
    assert reply_.finish_reason == "stop"


def test_openai_params_are_translated() -> None:
    """tools, tool_choice, stop, max_completion_tokens and images take Anthropic's names."""
    provider = AnthropicProvider()
    body = provider.chat_body(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "a", "arguments": '{"x": 1}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "b", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "one"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "2"}]},
            {"role": "user", "content": "And?"},
        ],
        "m",
        {
            "tools": [WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "stop": "END",
            "max_completion_tokens": 50,
            "system": "Extra.",
            "stream_options": {"include_usage": True},
        },
    )
    assert body["max_tokens"] == 50
    assert body["stop_sequences"] == ["END"]
    assert body["system"] == "Extra."
    assert "stream_options" not in body
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["tools"] == [
        {
            "name": "get_weather",
            "input_schema": WEATHER_SCHEMA,
            "description": "Look up the weather.",
        },
        {"type": "web_search_20250305", "name": "web_search"},
    ]
    user, assistant, results = body["messages"]
    assert user["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
    }
    assert user["content"][2]["source"] == {"type": "url", "url": "https://x.test/cat.png"}
    assert assistant["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "a", "input": {"x": 1}},
        {"type": "tool_use", "id": "toolu_2", "name": "b", "input": {}},
    ]
    # Both results and the next question share one user turn, results first.
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "one"},
            {
                "type": "tool_result",
                "tool_use_id": "toolu_2",
                "content": [{"type": "text", "text": "2"}],
            },
            {"type": "text", "text": "And?"},
        ],
    }
    choices = {
        "auto": {"type": "auto"},
        "none": {"type": "none"},
        "required": {"type": "any"},
    }
    for given, expected in choices.items():
        assert provider.chat_body("q", "m", {"tool_choice": given})["tool_choice"] == expected
    with pytest.raises(TypeError):
        provider.chat_body("q", "m", {"tool_choice": "sometimes"})
    with pytest.raises(TypeError):
        provider.chat_body(
            [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "t", "function": {"name": "a", "arguments": "{"}}],
                }
            ],
            "m",
            {},
        )


def test_stop_reasons_and_usage_are_mapped() -> None:
    """Every stop reason maps to its OpenAI finish reason; cached input counts as prompt."""
    provider = AnthropicProvider()
    cases = {
        "end_turn": "stop",
        "stop_sequence": "stop",
        "max_tokens": "length",
        "tool_use": "tool_calls",
        "refusal": "content_filter",
        "pause_turn": "pause_turn",
    }
    for stop_reason, expected in cases.items():
        payload = {**MESSAGE_REPLY, "stop_reason": stop_reason}
        assert provider.parse_chat(payload, None).finish_reason == expected
    payload = {
        **MESSAGE_REPLY,
        "usage": {"input_tokens": 3, "cache_read_input_tokens": 10, "output_tokens": 2},
        "content": [
            {"type": "thinking", "thinking": "Hmm.", "signature": "s"},
            {"type": "text", "text": "a"},
            {"type": "text", "text": "b"},
        ],
    }
    parsed = provider.parse_chat(payload, "req_1")
    assert parsed.usage == trio_llm.Usage(
        prompt_tokens=13, completion_tokens=2, total_tokens=15, cache_read_tokens=10
    )
    assert parsed.text == "ab"
    assert parsed.message["reasoning_content"] == "Hmm."
    assert parsed.request_id == "req_1"


STREAM_START: tuple[str, dict[str, Any]] = (
    "message_start",
    {
        "message": {
            "id": "msg_s",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 1},
        }
    },
)


def text_delta(text: str) -> tuple[str, dict[str, Any]]:
    return ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})


async def read_stream(client: trio_llm.Client, prompt: str) -> trio_llm.ChatResponse:
    """Read a whole stream; return its aggregated reply."""
    async with client.stream(prompt) as stream:
        async for _ in stream:
            pass
    return stream.response


def event_stream(body: bytes) -> Handler:
    return lambda request: httpx2.Response(
        200, content=body, headers={"content-type": "text/event-stream"}
    )


async def test_stream_events_are_translated() -> None:
    """Text, thinking and several tool blocks aggregate; ping is skipped; usage summed."""
    body = sse(
        STREAM_START,
        (
            "content_block_start",
            {"index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        ),
        (
            "content_block_delta",
            {"index": 0, "delta": {"type": "thinking_delta", "thinking": "Hm"}},
        ),
        (
            "content_block_delta",
            {"index": 0, "delta": {"type": "signature_delta", "signature": "s"}},
        ),
        ("content_block_stop", {"index": 0}),
        ("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
        ("content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": "Hel"}}),
        ("content_block_delta", {"index": 1, "delta": {"type": "text_delta", "text": "lo"}}),
        ("content_block_stop", {"index": 1}),
        (
            "content_block_start",
            {
                "index": 2,
                "content_block": {"type": "tool_use", "id": "tu_a", "name": "a", "input": {}},
            },
        ),
        (
            "content_block_delta",
            {"index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"x"'}},
        ),
        (
            "content_block_delta",
            {"index": 2, "delta": {"type": "input_json_delta", "partial_json": ": 1}"}},
        ),
        ("content_block_stop", {"index": 2}),
        (
            "content_block_start",
            {
                "index": 3,
                "content_block": {"type": "tool_use", "id": "tu_b", "name": "b", "input": {}},
            },
        ),
        ("content_block_stop", {"index": 3}),
        (
            "message_delta",
            {
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 9},
            },
        ),
        ("message_stop", {}),
    )
    async with mock_client(scripted(event_stream(body))) as client:
        async with client.stream("q") as stream:
            chunks = [chunk async for chunk in stream]
        stats = client.statistics()
    response = stream.response
    assert "".join(chunk.text for chunk in chunks) == "Hello"
    assert chunks[-1].finish_reason == "tool_calls"
    assert response.text == "Hello"
    assert response.message["reasoning_content"] == "Hm"
    assert response.tool_calls == [
        {"id": "tu_a", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
        {"id": "tu_b", "type": "function", "function": {"name": "b", "arguments": ""}},
    ]
    assert response.usage == trio_llm.Usage(prompt_tokens=5, completion_tokens=9, total_tokens=14)
    assert response.id == "msg_s"
    assert stats.succeeded == 1
    assert stats.completion_tokens == 9


async def test_stream_error_event_raises_stream_error() -> None:
    """An error event mid-stream raises StreamError with the text so far; not retried."""
    body = sse(
        STREAM_START,
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        text_delta("Par"),
        ("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
    seen: list[httpx2.Request] = []
    async with mock_client(scripted(event_stream(body), seen=seen)) as client:
        with pytest.raises(trio_llm.StreamError) as info:
            await read_stream(client, "q")
    assert "Overloaded" in str(info.value)
    assert "overloaded_error" in str(info.value)
    assert info.value.text_so_far == "Par"
    assert len(seen) == 1


async def test_stream_cut_before_message_stop_is_an_error() -> None:
    """A stream that ends without a stop reason raises StreamError."""
    body = sse(STREAM_START, text_delta("Par"))
    async with mock_client(scripted(event_stream(body))) as client:
        with pytest.raises(trio_llm.StreamError):
            await read_stream(client, "q")


async def test_529_then_success_is_retried(autojump_clock: trio.abc.Clock) -> None:
    """529 overloaded is retried, for chat and before a stream's first event."""
    overloaded = reply(
        529, {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}
    )
    stream_body = sse(
        STREAM_START,
        text_delta("ok"),
        ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}}),
        ("message_stop", {}),
    )
    async with mock_client(scripted(overloaded, reply())) as client:
        assert (await client.chat("q")).text == "hi"
        assert client.statistics().retried == 1
    async with mock_client(scripted(overloaded, event_stream(stream_body))) as client:
        async with client.stream("q") as stream:
            assert [chunk.text async for chunk in stream] == ["", "ok", ""]
        assert client.statistics().retried == 1


async def test_retry_after_is_honoured(autojump_clock: trio.abc.Clock) -> None:
    """A 429's retry-after sets the wait before the next attempt."""
    limited = reply(
        429,
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
        {"retry-after": "7"},
    )
    async with mock_client(scripted(limited, reply())) as client:
        start = trio.current_time()
        await client.chat("q")
        waited = trio.current_time() - start
        stats = client.statistics()
    assert 7 <= waited < 8
    assert stats.rate_limited == 1


async def test_anthropic_ratelimit_headers_feed_the_limiter() -> None:
    """anthropic-ratelimit-* headers on a reply teach the client's rate limiter."""
    limited = reply(
        headers={
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2099-01-01T00:00:00Z",
            "anthropic-ratelimit-tokens-limit": "40000",
            "anthropic-ratelimit-tokens-remaining": "39000",
            "anthropic-ratelimit-tokens-reset": "2099-01-01T00:00:00Z",
        }
    )
    async with mock_client(scripted(limited)) as client:
        await client.chat("q")
        assert client._rate is not None
        limits = client._rate.statistics()
    assert limits.requests_per_minute == 50
    assert limits.tokens_per_minute == 40000


async def test_embed_is_refused() -> None:
    """embed() on the anthropic provider is a ConfigurationError, sent nowhere."""
    seen: list[httpx2.Request] = []
    async with mock_client(scripted(reply(), seen=seen)) as client:
        with pytest.raises(trio_llm.ConfigurationError, match="embeddings"):
            await client.embed("text")
    assert seen == []


async def test_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key and base URL come from ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL."""
    with pytest.raises(trio_llm.ConfigurationError, match="ANTHROPIC_API_KEY"):
        async with trio_llm.open_client(provider="anthropic"):
            pass  # pragma: no cover
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-env")
    async with trio_llm.open_client(provider="anthropic") as client:
        assert client.base_url == "https://api.anthropic.com"  # the default; nothing is sent
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "https://proxy.test/")
    seen: list[httpx2.Request] = []
    async with trio_llm.open_client(
        provider="anthropic", model=MODEL, transport=scripted(reply(), seen=seen)
    ) as client:
        await client.chat("q")
    assert str(seen[0].url) == "https://proxy.test/v1/messages"
    assert seen[0].headers["x-api-key"] == "sk-ant-env"
    with pytest.raises(trio_llm.ConfigurationError, match="unknown provider"):
        async with trio_llm.open_client(provider="cohere"):
            pass  # pragma: no cover


# --- batch files ------------------------------------------------------------------------


async def test_batch_messages_lines(tmp_path: Path, server: FakeLLMServer) -> None:
    """/v1/messages lines are sent as Anthropic bodies; an OpenAI client refuses them."""
    messages_line = {
        "custom_id": "m",
        "method": "POST",
        "url": "/v1/messages",
        "body": {
            "model": MODEL,
            "max_tokens": 8,
            "system": SYSTEM,
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        },
    }
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(messages_line) + "\n")
    async with open_anthropic(server) as client:
        summary = await trio_llm.run_batch(source, tmp_path / "out.jsonl", client=client)
        direct = await client.chat(CONVERSATION, max_tokens=8)
    [record] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary.succeeded == 1
    assert record["custom_id"] == "m"
    assert record["response"]["body"]["type"] == "message"
    assert record["response"]["body"]["content"][0]["text"] == direct.text
    async with trio_llm.open_client(
        base_url=server.base_url, api_key="sk-ant-test", model=MODEL
    ) as openai_client:
        with pytest.raises(trio_llm.BatchInputError, match="provider='anthropic'"):
            await trio_llm.run_batch(source, tmp_path / "other.jsonl", client=openai_client)
    assert not (tmp_path / "other.jsonl").exists()  # refused up front: nothing sent
