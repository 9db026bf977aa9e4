"""The client core end to end against the fake server, and its request building."""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
import httpx2
import pytest
import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm


def recording_transport(
    requests: list[httpx2.Request], *, status: int = 200, body: Any = None, content: bytes = b""
) -> httpx2.MockTransport:
    """A MockTransport that records each request and answers with a fixed response."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        requests.append(request)
        if body is not None:
            return httpx2.Response(status, json=body)
        return httpx2.Response(status, content=content)

    return httpx2.MockTransport(handle)


CHAT_REPLY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    "system_fingerprint": "fp_x",
}


async def test_chat_returns_parsed_reply(fake_llm: FakeLLMServer) -> None:
    """A chat call returns the reply's text, finish reason, usage and whole payload."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        reply = await client.chat("Explain quantum computing.")
    assert isinstance(reply, trio_llm.ChatResponse)
    assert reply.text
    assert reply.text == reply.raw["choices"][0]["message"]["content"]
    assert reply.finish_reason == "stop"
    assert reply.model == "fake-gpt"
    assert reply.id.startswith("chatcmpl-")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.completion_tokens > 0
    assert reply.message["role"] == "assistant"
    assert reply.choices[0].text == reply.text
    assert reply.request_id is not None
    assert reply.request_id.startswith("req_")


async def test_string_prompt_becomes_one_user_message() -> None:
    """A plain string is sent as a single user message with the client's model."""
    sent: list[httpx2.Request] = []
    transport = recording_transport(sent, body=CHAT_REPLY)
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1", model="m", transport=transport
    ) as client:
        await client.chat("hello")
    body = json.loads(sent[0].content)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    assert sent[0].url == "http://127.0.0.1:9/v1/chat/completions"
    assert sent[0].headers["content-type"] == "application/json"


async def test_unknown_keywords_pass_through_to_the_body() -> None:
    """Keywords the call does not know are sent unchanged in the request body."""
    sent: list[httpx2.Request] = []
    transport = recording_transport(sent, body=CHAT_REPLY)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1", model="m", transport=transport
    ) as client:
        await client.chat(
            messages,
            model="other",
            temperature=0.2,
            max_tokens=5,
            seed=7,
            extra_field={"nested": [1, 2]},
        )
    body = json.loads(sent[0].content)
    assert body["model"] == "other"
    assert body["messages"] == messages
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 5
    assert body["seed"] == 7
    assert body["extra_field"] == {"nested": [1, 2]}


async def test_messages_must_have_roles() -> None:
    """A message list with an item that is not a role mapping is a TypeError."""
    async with trio_llm.open_client(base_url="http://127.0.0.1:9/v1", model="m") as client:
        with pytest.raises(TypeError, match=r"messages\[1\]"):
            await client.chat([{"role": "user", "content": "a"}, "b"])  # type: ignore[list-item]


async def test_several_choices(fake_llm: FakeLLMServer) -> None:
    """With n > 1 every choice is parsed, in order."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        reply = await client.chat("Name a colour.", n=3)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert all(choice.text for choice in reply.choices)
    assert reply.text == reply.choices[0].text


async def test_max_tokens_cuts_the_reply(fake_llm: FakeLLMServer) -> None:
    """max_tokens passes through: the fake server stops early with finish_reason 'length'."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        reply = await client.chat("Write a long essay about rivers.", max_tokens=3)
    assert reply.finish_reason == "length"
    assert reply.usage.completion_tokens == 3


async def test_tool_calls_survive_intact(fake_llm: FakeLLMServer) -> None:
    """Tool calls come back in message and tool_calls exactly as the server sent them."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city", "days"],
                },
            },
        }
    ]
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        reply = await client.chat("Weather in Paris?", tools=tools)
    assert reply.finish_reason == "tool_calls"
    assert reply.text == ""
    (call,) = reply.tool_calls
    assert call == reply.raw["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert isinstance(arguments["city"], str)
    assert isinstance(arguments["days"], int)


async def test_response_format_json_schema_survives(fake_llm: FakeLLMServer) -> None:
    """A json_schema response_format is passed through and the JSON text comes back intact."""
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["title", "year"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "book", "schema": schema}}
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        reply = await client.chat("A book, please.", response_format=response_format)
    data = json.loads(reply.text)
    assert set(data) == {"title", "year"}
    assert isinstance(data["year"], int)


async def test_embed_float_and_base64_agree(fake_llm: FakeLLMServer) -> None:
    """Embeddings come back in input order; base64 payloads decode to the same floats."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-embed") as client:
        floats = await client.embed(["alpha", "beta", "gamma"], dimensions=16)
        packed = await client.embed(
            ["alpha", "beta", "gamma"], dimensions=16, encoding_format="base64"
        )
        single = await client.embed("beta", dimensions=16)
    assert len(floats.vectors) == 3
    assert all(len(vector) == 16 for vector in floats.vectors)
    for a, b in zip(floats.vectors, packed.vectors, strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    assert single.vectors[0] == pytest.approx(floats.vectors[1], rel=1e-6)
    assert floats.vectors[0] != floats.vectors[1]
    assert math.isclose(math.fsum(x * x for x in floats.vectors[0]), 1.0, rel_tol=1e-5)
    assert floats.usage.prompt_tokens > 0
    assert floats.model == "fake-embed"
    assert floats.request_id is not None


async def test_call_without_model_is_a_configuration_error() -> None:
    """A call with no model, on a client with no default model, fails before sending."""
    sent: list[httpx2.Request] = []
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1", transport=recording_transport(sent, body=CHAT_REPLY)
    ) as client:
        with pytest.raises(trio_llm.ConfigurationError, match="no model"):
            await client.chat("hi")
    assert sent == []


async def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """OPENAI_BASE_URL and OPENAI_API_KEY are the defaults; the key is sent as a bearer."""
    monkeypatch.setenv("OPENAI_BASE_URL", "https://llm.example.invalid/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    sent: list[httpx2.Request] = []
    async with trio_llm.open_client(
        model="m", transport=recording_transport(sent, body=CHAT_REPLY)
    ) as client:
        assert client.base_url == "https://llm.example.invalid/v1"
        await client.chat("hi")
    assert sent[0].headers["authorization"] == "Bearer sk-from-env"
    assert str(sent[0].url) == "https://llm.example.invalid/v1/chat/completions"


async def test_missing_key_for_a_remote_server_is_a_clear_error() -> None:
    """No API key for a non-loopback URL fails at open time, naming the variable."""
    with pytest.raises(trio_llm.ConfigurationError, match="OPENAI_API_KEY"):
        async with trio_llm.open_client(base_url="https://llm.example.invalid/v1"):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1/v1", "http://localhost:1/v1", "http://[::1]:1/v1"]
)
async def test_loopback_servers_need_no_key(url: str) -> None:
    """A loopback server may be used without a key, and no Authorization header is sent."""
    sent: list[httpx2.Request] = []
    async with trio_llm.open_client(
        base_url=url, model="m", transport=recording_transport(sent, body=CHAT_REPLY)
    ) as client:
        await client.chat("hi")
    assert "authorization" not in sent[0].headers


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "ftp://127.0.0.1/v1"}, "http"),
        ({"base_url": "127.0.0.1:8000"}, "http"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"provider": "cohere"}, "provider"),
    ],
)
async def test_bad_settings_are_rejected(kwargs: dict[str, Any], match: str) -> None:
    """Invalid settings raise ConfigurationError with a message naming the setting."""
    kwargs.setdefault("base_url", "http://127.0.0.1:9/v1")
    with pytest.raises(trio_llm.ConfigurationError, match=match):
        async with trio_llm.open_client(**kwargs):
            pass  # pragma: no cover


def test_timeouts_validate_and_convert() -> None:
    """Timeouts reject non-positive values and map onto httpx2's phases."""
    with pytest.raises(ValueError, match="read"):
        trio_llm.Timeouts(read=0)
    converted = trio_llm.Timeouts(connect=1, read=2, write=3, pool=None).to_httpx()
    assert (converted.connect, converted.read, converted.write, converted.pool) == (1, 2, 3, None)


async def test_max_concurrency_is_shared_by_all_tasks(autojump_clock: trio.abc.Clock) -> None:
    """Twenty tasks on a client with max_concurrency=4 never have more than 4 in flight."""
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="fake-gpt", max_concurrency=4
        ) as client,
    ):
        seen: list[int] = []

        async def one(i: int) -> None:
            await client.chat(f"question {i}")
            seen.append(client.statistics().in_flight)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
            await trio.sleep(0.5)
            stats = client.statistics()
            assert stats.in_flight == 4
            assert stats.waiting == 16
        elapsed = trio.current_time() - start
    assert server.stats.peak_concurrency == 4
    assert max(seen) <= 4
    assert elapsed == pytest.approx(5.0, abs=0.5)  # 20 requests / 4 at a time * 1 s
    final = client.statistics()
    assert (final.sent, final.succeeded, final.failed, final.in_flight) == (20, 20, 0, 0)


async def test_statistics_count_tokens_and_failures(fake_llm: FakeLLMServer) -> None:
    """statistics() counts attempts, successes, failures, 429s and the usage tokens."""
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="fake-gpt", retry=None
    ) as client:
        reply = await client.chat("Count me.")
        fake_llm.config = attrs.evolve(fake_llm.config, error_rate=1.0, error_status=429)
        with pytest.raises(trio_llm.RateLimitError):
            await client.chat("Count me too.")
        stats = client.statistics()
    assert stats.sent == 2
    assert stats.succeeded == 1
    assert stats.failed == 1
    assert stats.rate_limited == 1
    assert stats.prompt_tokens == reply.usage.prompt_tokens
    assert stats.completion_tokens == reply.usage.completion_tokens
    assert stats.max_concurrency == 64


async def test_client_repr_names_the_server_not_the_key() -> None:
    """repr(client) shows the base URL and model."""
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1", api_key="sk-secret-123", model="m"
    ) as client:
        text = repr(client)
    assert "http://127.0.0.1:9/v1" in text
    assert "'m'" in text
    assert "sk-secret-123" not in text


async def test_lone_surrogates_are_sent_escaped() -> None:
    """Text with a lone surrogate (no UTF-8 form) is sent as a JSON escape, not a crash."""
    sent: list[httpx2.Request] = []
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1",
        model="m",
        transport=recording_transport(sent, body=CHAT_REPLY),
    ) as client:
        await client.chat("half an emoji: \ud83d", temperature=0)
        await client.chat("caf\u00e9")
    assert b"\\ud83d" in sent[0].content
    assert json.loads(sent[0].content)["messages"][0]["content"].endswith("\ud83d")
    assert "café".encode() in sent[1].content
