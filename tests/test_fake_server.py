"""The fake LLM server over real sockets: wire format, determinism, faults, limits, lifecycle."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import math
import struct
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx2
import pytest
import trio

from trio_llm.testing import (
    FakeLLMConfig,
    FakeLLMServer,
    FakeLLMStats,
    open_fake_llm,
    serve_fake_llm,
)
from trio_llm.testing._limits import go_duration
from trio_llm.testing._replies import count_tokens, json_from_schema, split_tokens

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "hourly": {"type": "boolean"},
                "note": {"type": "string"},
            },
            "required": ["city", "days", "unit", "hourly"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with open_fake_llm() as fake:
        yield fake


@pytest.fixture
async def client(server: FakeLLMServer) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=server.base_url, timeout=600) as http:
        yield http


def chat(content: Any = "Hello there, fake model!", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-gpt", "messages": [{"role": "user", "content": content}], **extra}


async def post_chat(http: httpx2.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await http.post("/chat/completions", json=chat(**body))
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def data_lines(text: str) -> list[str]:
    """Return the ``data`` of each SSE event, checking the framing on the way."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events)
    return [event[len("data: ") :] for event in events]


async def stream_chat(http: httpx2.AsyncClient, **body: Any) -> list[dict[str, Any]]:
    response = await http.post("/chat/completions", json=chat(stream=True, **body))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    lines = data_lines(response.text)
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def streamed_text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for chunk in chunks
        for choice in chunk["choices"]
        if choice["index"] == index
    )


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes on a new connection and return everything read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                received += chunk
        return received


async def wait_for(condition: Any) -> None:
    """Wait until ``condition()`` holds (server stats are plain counters: poll them)."""
    with trio.fail_after(30):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the counter
            await trio.sleep(0.01)


# --- chat completions: shape and determinism ---------------------------------------------


async def test_chat_completion_has_the_openai_shape(client: httpx2.AsyncClient) -> None:
    """A chat completion carries every field of the OpenAI object, with an assistant reply."""
    response = await client.post("/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "fake-gpt"
    assert body["system_fingerprint"].startswith("fp_")
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"
    message = choice["message"]
    assert message["role"] == "assistant"
    assert message["refusal"] is None
    assert "tool_calls" not in message
    assert isinstance(message["content"], str)
    assert message["content"].endswith(".")
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


async def test_any_model_name_is_echoed(client: httpx2.AsyncClient) -> None:
    """The server accepts any model name and answers with it."""
    response = await client.post("/chat/completions", json={**chat(), "model": "my-own-model"})
    assert response.json()["model"] == "my-own-model"


async def test_same_conversation_same_reply(client: httpx2.AsyncClient) -> None:
    """The same prompt, max_tokens and seed always give the same text; another prompt differs."""
    first = await post_chat(client, content="What is Trio?")
    second = await post_chat(client, content="What is Trio?")
    other = await post_chat(client, content="What is asyncio?")
    text = first["choices"][0]["message"]["content"]
    assert text == second["choices"][0]["message"]["content"]
    assert text != other["choices"][0]["message"]["content"]
    assert first["id"] != second["id"]


async def test_reply_length_is_between_8_and_40_tokens(client: httpx2.AsyncClient) -> None:
    """Without max_tokens, replies are 8 to 40 tokens long and vary with the prompt."""
    lengths = set()
    for i in range(20):
        body = await post_chat(client, content=f"question number {i}")
        lengths.add(body["usage"]["completion_tokens"])
    assert min(lengths) >= 8
    assert max(lengths) <= 40
    assert len(lengths) > 3


async def test_seed_changes_the_reply(server: FakeLLMServer, client: httpx2.AsyncClient) -> None:
    """A server with another seed answers the same prompt differently."""
    before = (await post_chat(client))["choices"][0]["message"]["content"]
    server.config = attrs.evolve(server.config, seed=7)
    after = (await post_chat(client))["choices"][0]["message"]["content"]
    server.config = attrs.evolve(server.config, seed=0)
    again = (await post_chat(client))["choices"][0]["message"]["content"]
    assert before != after
    assert before == again


async def test_content_parts_read_like_a_string(client: httpx2.AsyncClient) -> None:
    """Content given as text parts gets the same reply as the same text given as a string."""
    as_string = await post_chat(client, content="Tell me about nurseries.")
    parts = [
        {"type": "text", "text": "Tell me about "},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "nurseries."},
    ]
    as_parts = await post_chat(client, content=parts)
    assert as_parts["choices"][0]["message"] == as_string["choices"][0]["message"]
    assert as_parts["usage"] == as_string["usage"]


async def test_stream_and_json_give_the_same_text(client: httpx2.AsyncClient) -> None:
    """Streaming (with or without usage) never changes the reply text."""
    whole = await post_chat(client, content="Same answer both ways?")
    chunks = await stream_chat(client, content="Same answer both ways?")
    with_usage = await stream_chat(
        client, content="Same answer both ways?", stream_options={"include_usage": True}
    )
    text = whole["choices"][0]["message"]["content"]
    assert streamed_text(chunks) == text
    assert streamed_text(with_usage) == text


async def test_usage_counts_the_fake_tokens(client: httpx2.AsyncClient) -> None:
    """Usage follows the documented tokenizer: 3 tokens per message plus 3, and the reply's."""
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello, world! How are you?"},
    ]
    response = await client.post("/chat/completions", json={"model": "m", "messages": messages})
    body = response.json()
    usage = body["usage"]
    assert usage["prompt_tokens"] == (4 + 3) + (8 + 3) + 3
    assert usage["completion_tokens"] == count_tokens(body["choices"][0]["message"]["content"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_n_gives_several_deterministic_choices(client: httpx2.AsyncClient) -> None:
    """n=3 gives three indexed choices; choice 0 is the single-choice reply; usage sums them."""
    single = await post_chat(client)
    several = await post_chat(client, n=3)
    again = await post_chat(client, n=3)
    choices = several["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert choices[0]["message"] == single["choices"][0]["message"]
    assert len({c["message"]["content"] for c in choices}) == 3
    assert choices == again["choices"]
    total = sum(count_tokens(c["message"]["content"]) for c in choices)
    assert several["usage"]["completion_tokens"] == total


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_the_reply(client: httpx2.AsyncClient, field: str) -> None:
    """A small token limit cuts the reply to a prefix, with finish_reason "length"."""
    full = (await post_chat(client))["choices"][0]["message"]["content"]
    cut = await post_chat(client, **{field: 5})
    text = cut["choices"][0]["message"]["content"]
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 5 == count_tokens(text)
    assert full.startswith(text)
    roomy = await post_chat(client, **{field: 1000})
    assert roomy["choices"][0]["message"]["content"] == full
    assert roomy["choices"][0]["finish_reason"] == "stop"


# --- streaming -----------------------------------------------------------------------------


async def test_stream_chunks_follow_the_openai_format(client: httpx2.AsyncClient) -> None:
    """Chunks: a role delta, token deltas, a finish chunk, then [DONE]; no usage unless asked."""
    chunks = await stream_chat(client)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    first, *middle, last = [chunk["choices"][0] for chunk in chunks]
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert first["finish_reason"] is None
    assert middle
    assert all(set(c["delta"]) == {"content"} and c["finish_reason"] is None for c in middle)
    assert all(count_tokens(c["delta"]["content"]) == 1 for c in middle)
    assert last["delta"] == {}
    assert last["finish_reason"] == "stop"


async def test_stream_include_usage_adds_a_usage_chunk(client: httpx2.AsyncClient) -> None:
    """With include_usage every chunk has usage null, and a last chunk has no choices and usage."""
    chunks = await stream_chat(client, stream_options={"include_usage": True})
    whole = await post_chat(client)
    *content, usage_chunk = chunks
    assert all(chunk["usage"] is None for chunk in content)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == whole["usage"]


async def test_stream_with_n_interleaves_choices(client: httpx2.AsyncClient) -> None:
    """A streamed n=2 request sends both choices, each with the text of the JSON reply."""
    whole = await post_chat(client, n=2, max_tokens=6)
    chunks = await stream_chat(client, n=2, max_tokens=6)
    for index in (0, 1):
        assert streamed_text(chunks, index) == whole["choices"][index]["message"]["content"]
    finishes = [c for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in finishes) == [0, 1]
    assert all(c["finish_reason"] == "length" for c in finishes)


async def test_each_event_is_its_own_chunk_on_the_wire(server: FakeLLMServer) -> None:
    """The SSE body uses chunked transfer encoding with one HTTP chunk per event."""
    body = json.dumps(chat(stream=True)).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    raw = await raw_exchange(server.port, request)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    events = 0
    while True:
        size_line, _, payload = payload.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunk, payload = payload[:size], payload[size + 2 :]
        assert chunk.startswith(b"data: ")
        assert chunk.endswith(b"\n\n")
        assert chunk.count(b"\n\n") == 1
        events += 1
    assert events > 3


# --- tools and structured output -----------------------------------------------------------


async def test_tools_get_a_tool_call(client: httpx2.AsyncClient) -> None:
    """With tools, the reply calls the first tool with arguments that fit its schema."""
    body = await post_chat(client, tools=[WEATHER_TOOL, TIME_TOOL])
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_")
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert isinstance(arguments["city"], str)
    assert isinstance(arguments["days"], int)
    assert 1 <= arguments["days"] <= 7
    assert arguments["unit"] in ("celsius", "fahrenheit")
    assert isinstance(arguments["hourly"], bool)
    assert body["usage"]["completion_tokens"] == count_tokens(call["function"]["arguments"])
    again = await post_chat(client, tools=[WEATHER_TOOL, TIME_TOOL])
    assert again["choices"][0]["message"]["tool_calls"] == message["tool_calls"]


async def test_tool_choice_names_the_tool(client: httpx2.AsyncClient) -> None:
    """A named tool_choice picks that tool; tool_choice "none" answers with text."""
    choice = {"type": "function", "function": {"name": "get_time"}}
    named = await post_chat(client, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice)
    call = named["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_time"
    assert isinstance(json.loads(call["function"]["arguments"])["zone"], str)
    plain = await post_chat(client, tools=[WEATHER_TOOL], tool_choice="none")
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert plain["choices"][0]["message"] == (await post_chat(client))["choices"][0]["message"]


async def test_streamed_tool_call_splits_the_arguments(client: httpx2.AsyncClient) -> None:
    """A streamed tool call sends id and name first, then argument fragments that add up."""
    whole = await post_chat(client, tools=[WEATHER_TOOL])
    expected = whole["choices"][0]["message"]["tool_calls"][0]
    chunks = await stream_chat(client, tools=[WEATHER_TOOL])
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    first = deltas[0]
    assert first["role"] == "assistant"
    assert first["content"] is None
    [head] = first["tool_calls"]
    assert head == {
        "index": 0,
        "id": expected["id"],
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    fragments = [d["tool_calls"][0] for d in deltas[1:] if "tool_calls" in d]
    assert len(fragments) > 1
    assert all(set(f) == {"index", "function"} for f in fragments)
    arguments = "".join(f["function"]["arguments"] for f in fragments)
    assert arguments == expected["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_json_object_mode_answers_json(client: httpx2.AsyncClient) -> None:
    """response_format json_object makes the content a JSON object, the same when streamed."""
    body = await post_chat(client, response_format={"type": "json_object"})
    content = body["choices"][0]["message"]["content"]
    assert isinstance(json.loads(content), dict)
    assert body["usage"]["completion_tokens"] == count_tokens(content)
    chunks = await stream_chat(client, response_format={"type": "json_object"})
    assert streamed_text(chunks) == content


async def test_json_schema_mode_conforms_to_the_schema(client: httpx2.AsyncClient) -> None:
    """response_format json_schema gives JSON that follows the schema, nested parts included."""
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 3, "maxLength": 40},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
            "rating": {"type": "number", "minimum": 0, "maximum": 5},
            "genre": {"enum": ["drama", "comedy"]},
            "seen": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
            "director": {"$ref": "#/$defs/person"},
            "sequel": {"anyOf": [{"type": "null"}, {"type": "string"}]},
        },
        "required": ["title", "year", "rating", "genre", "seen", "tags", "director", "sequel"],
        "additionalProperties": False,
        "$defs": {
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
                "required": ["name", "born"],
            }
        },
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "movie", "schema": schema}}
    body = await post_chat(client, response_format=response_format)
    value = json.loads(body["choices"][0]["message"]["content"])
    assert set(value) == set(schema["required"])  # type: ignore[call-overload]
    assert 3 <= len(value["title"]) <= 40
    assert isinstance(value["year"], int)
    assert 1900 <= value["year"] <= 2030
    assert 0 <= value["rating"] <= 5
    assert value["genre"] in ("drama", "comedy")
    assert isinstance(value["seen"], bool)
    assert 2 <= len(value["tags"]) <= 4
    assert all(isinstance(tag, str) for tag in value["tags"])
    assert isinstance(value["director"]["name"], str)
    assert isinstance(value["director"]["born"], int)
    assert isinstance(value["sequel"], str)


def test_json_from_schema_survives_nonsense() -> None:
    """Schemas that make no sense (recursive, contradictory, wrong types) still give JSON."""
    schemas = [
        {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
        {"type": "integer", "minimum": 10, "maximum": 5},
        {"type": "number", "minimum": -1e308, "maximum": 1e308, "multipleOf": 1e-300},
        {"type": ["null", "string"], "minLength": "three"},
        {"type": "array", "items": {"type": "array", "items": {"$ref": "#"}}},
        {"properties": {"x": True, "y": {"allOf": [{"type": "string"}, {"minLength": 4}]}}},
    ]
    for schema in schemas:
        json.loads(json_from_schema(json.dumps(schema), "q", 0, "s"))
    assert json.loads(json_from_schema(json.dumps(schemas[-1]), "q", 0, "s"))["y"].__len__() >= 4


def test_split_tokens_keeps_the_text() -> None:
    """split_tokens gives one piece per token, and the pieces join back to the text."""
    text = '  {"city": "Paris",\n "days": 3}  '
    pieces = split_tokens(text)
    assert "".join(pieces) == text
    assert len(pieces) == count_tokens(text) == 15


# --- embeddings and models -----------------------------------------------------------------


async def test_embeddings_are_deterministic_unit_vectors(client: httpx2.AsyncClient) -> None:
    """Float embeddings: one unit vector per input, 32 dimensions, same input same vector."""
    body = {"model": "fake-embed", "input": ["alpha", "beta", "alpha"]}
    response = await client.post("/embeddings", json=body)
    assert response.status_code == 200
    payload = response.json()
    assert payload["object"] == "list"
    assert payload["model"] == "fake-embed"
    vectors = [item["embedding"] for item in payload["data"]]
    assert [item["index"] for item in payload["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in payload["data"])
    assert all(len(vector) == 32 for vector in vectors)
    assert all(math.isclose(math.fsum(v * v for v in vector), 1.0) for vector in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert payload["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    single = (await client.post("/embeddings", json={"model": "e", "input": "alpha"})).json()
    assert single["data"][0]["embedding"] == vectors[0]


async def test_embeddings_base64_and_dimensions(client: httpx2.AsyncClient) -> None:
    """base64 is the float vector as little-endian float32; dimensions sets the length."""
    floats = await client.post("/embeddings", json={"model": "e", "input": "x", "dimensions": 8})
    encoded = await client.post(
        "/embeddings",
        json={"model": "e", "input": "x", "dimensions": 8, "encoding_format": "base64"},
    )
    vector = floats.json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded.json()["data"][0]["embedding"])
    decoded = struct.unpack("<8f", raw)
    assert len(vector) == 8
    assert decoded == pytest.approx(vector, rel=1e-6)


async def test_embeddings_accept_token_arrays(client: httpx2.AsyncClient) -> None:
    """Token arrays (one, or a list of them) are embedded and counted as their length."""
    one = await client.post("/embeddings", json={"model": "e", "input": [1, 2, 3]})
    many = await client.post("/embeddings", json={"model": "e", "input": [[1, 2, 3], [4, 5]]})
    assert one.json()["usage"]["prompt_tokens"] == 3
    assert many.json()["usage"]["prompt_tokens"] == 5
    assert many.json()["data"][0]["embedding"] == one.json()["data"][0]["embedding"]


async def test_seed_changes_embeddings(server: FakeLLMServer, client: httpx2.AsyncClient) -> None:
    """Embeddings depend on the server's seed."""
    body = {"model": "e", "input": "x"}
    before = (await client.post("/embeddings", json=body)).json()["data"][0]["embedding"]
    server.config = attrs.evolve(server.config, seed=3)
    after = (await client.post("/embeddings", json=body)).json()["data"][0]["embedding"]
    assert before != after


async def test_models_are_listed(server: FakeLLMServer, client: httpx2.AsyncClient) -> None:
    """/v1/models lists the configured models; /v1/models/{id} describes any model."""
    server.config = attrs.evolve(server.config, models=("a-model", "b-model"))
    listing = (await client.get("/models")).json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["a-model", "b-model"]
    assert all(m["object"] == "model" and m["owned_by"] and m["created"] for m in listing["data"])
    one = (await client.get("/models/whatever")).json()
    assert one["id"] == "whatever"


# --- errors --------------------------------------------------------------------------------


def assert_openai_error(response: httpx2.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind
    assert error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({**chat(), "n": 0}, "n"),
        ({**chat(), "max_tokens": "ten"}, "max_tokens"),
        ({**chat(), "stream": "yes"}, "stream"),
    ],
)
async def test_invalid_chat_requests_get_400(
    client: httpx2.AsyncClient, body: dict[str, Any], param: str
) -> None:
    """Missing or malformed required fields get a 400 naming the parameter."""
    response = await client.post("/chat/completions", json=body)
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"model": "e"},
        {"model": "e", "input": []},
        {"model": "e", "input": [None]},
        {"model": "e", "input": "x", "encoding_format": "hex"},
        {"model": "e", "input": "x", "dimensions": 0},
    ],
)
async def test_invalid_embedding_requests_get_400(
    client: httpx2.AsyncClient, body: dict[str, Any]
) -> None:
    """Embedding requests without a usable input, format or size get a 400."""
    response = await client.post("/embeddings", json=body)
    assert_openai_error(response, 400, "invalid_request_error")


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"x": NaN}', b"\xff\xfe"])
async def test_malformed_json_gets_400(client: httpx2.AsyncClient, content: bytes) -> None:
    """A body that is not a JSON object gets a 400."""
    response = await client.post(
        "/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400, "invalid_request_error")


async def test_unknown_path_gets_404_and_wrong_method_405(client: httpx2.AsyncClient) -> None:
    """Unknown paths get 404; a known path with the wrong method gets 405 with Allow."""
    assert_openai_error(await client.get("/nothing/here"), 404, "not_found_error")
    response = await client.get("/chat/completions")
    assert_openai_error(response, 405, "invalid_request_error")
    assert response.headers["allow"] == "POST"
    assert (await client.post("/models")).status_code == 405


async def test_api_key_is_required_when_set(server: FakeLLMServer) -> None:
    """With api_key set, a missing or wrong key gets 401 (never echoed); the right key passes."""
    server.config = attrs.evolve(server.config, api_key="sk-secret-key")
    async with httpx2.AsyncClient(base_url=server.base_url) as http:
        missing = await http.post("/chat/completions", json=chat())
        wrong = await http.post(
            "/chat/completions", json=chat(), headers={"authorization": "Bearer sk-wrong"}
        )
        right = await http.post(
            "/chat/completions", json=chat(), headers={"authorization": "Bearer sk-secret-key"}
        )
        models = await http.get("/models", headers={"authorization": "Bearer sk-wrong"})
    for response in (missing, wrong, models):
        error = assert_openai_error(response, 401, "authentication_error")
        assert error["code"] == "invalid_api_key"
        assert "sk-" not in response.text
    assert right.status_code == 200
    assert "sk-secret-key" not in repr(server.config)


async def test_authentication_comes_before_validation(server: FakeLLMServer) -> None:
    """A request with both a bad key and a bad body gets 401, not 400."""
    server.config = attrs.evolve(server.config, api_key="sk-k")
    async with httpx2.AsyncClient(base_url=server.base_url) as http:
        response = await http.post("/chat/completions", content=b"{")
    assert response.status_code == 401


async def test_oversized_body_gets_413(server: FakeLLMServer) -> None:
    """A declared body over 32 MiB gets 413 and the connection is closed, unread."""
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n{" % (33 * 1024 * 1024)
    )
    raw = await raw_exchange(server.port, request)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert server.stats.requests_by_status == {413: 1}


async def test_oversized_chunked_body_gets_413(server: FakeLLMServer) -> None:
    """A chunked body that grows past 32 MiB gets 413."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * (1024 * 1024)
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        received = b""
        with trio.fail_after(30):
            try:
                for _ in range(40):
                    await stream.send_all(chunk)
            except trio.BrokenResourceError:
                pass  # the server answered and closed while we were still sending
            while data := await stream.receive_some():
                received += data
    assert received.startswith(b"HTTP/1.1 413 ")


async def test_malformed_http_gets_400(server: FakeLLMServer) -> None:
    """A request that is not HTTP gets a 400 and the connection is closed."""
    raw = await raw_exchange(server.port, b"HELLO THERE\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert b"Malformed HTTP request" in raw


# --- connection handling -------------------------------------------------------------------


async def test_keep_alive_and_connection_close(server: FakeLLMServer) -> None:
    """Several requests share one connection; Connection: close ends it after the response."""
    body = json.dumps(chat()).encode()
    one = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    last = one.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    raw = await raw_exchange(server.port, one + one + last)  # pipelined, on one connection
    assert raw.count(b"HTTP/1.1 200 ") == 3
    assert server.stats.total_requests == 3


async def test_chunked_request_body_is_accepted(client: httpx2.AsyncClient) -> None:
    """A request body sent with chunked transfer encoding is read whole."""

    async def body() -> AsyncIterator[bytes]:
        data = json.dumps(chat()).encode()
        yield data[:10]
        yield data[10:]

    response = await client.post(
        "/chat/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200
    assert response.json() == response.json() | {"object": "chat.completion"}


async def test_expect_100_continue_is_answered(server: FakeLLMServer) -> None:
    """A client that waits for 100 Continue gets it, then its answer."""
    body = json.dumps(chat()).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = await stream.receive_some()
        assert interim.startswith(b"HTTP/1.1 100 ")
        await stream.send_all(body)
        received = b""
        while data := await stream.receive_some():
            received += data
    assert received.startswith(b"HTTP/1.1 200 ")


# --- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [(500, "server_error"), (503, "server_error"), (400, "invalid_request_error")],
)
async def test_injected_errors_use_error_status(
    server: FakeLLMServer, client: httpx2.AsyncClient, status: int, kind: str
) -> None:
    """error_rate=1 answers every generation request with error_status and an OpenAI body."""
    server.config = attrs.evolve(server.config, error_rate=1.0, error_status=status)
    assert_openai_error(await client.post("/chat/completions", json=chat()), status, kind)
    embedding = await client.post("/embeddings", json={"model": "e", "input": "x"})
    assert_openai_error(embedding, status, kind)
    assert (await client.get("/models")).status_code == 200  # listing models is never faulted
    assert server.stats.injected_errors == 2


async def test_injected_429_says_when_to_retry(
    server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """An injected 429 carries retry-after headers and a rate-limit error body."""
    server.config = attrs.evolve(server.config, error_rate=1.0, error_status=429)
    response = await client.post("/chat/completions", json=chat())
    error = assert_openai_error(response, 429, "requests")
    assert error["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"] == "1"
    assert response.headers["retry-after-ms"] == "1000"


async def test_fault_draws_are_reproducible(server: FakeLLMServer) -> None:
    """The same seed and error_rate fault the same requests, run after run."""

    async def statuses() -> list[int]:
        async with (
            open_fake_llm(FakeLLMConfig(error_rate=0.5, seed=11)) as fake,
            httpx2.AsyncClient(base_url=fake.base_url) as http,
        ):
            return [
                (await http.post("/chat/completions", json=chat())).status_code for _ in "x" * 20
            ]

    first, second = await statuses(), await statuses()
    assert first == second
    assert set(first) == {200, 500}


async def test_validation_comes_before_faults(
    server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """An invalid request gets 400 even when every request would be faulted."""
    server.config = attrs.evolve(server.config, error_rate=1.0, stall_rate=1.0)
    response = await client.post("/chat/completions", json={"model": "m"})
    assert response.status_code == 400
    assert server.stats.injected_errors == 0


async def test_stall_counts_a_disconnect_when_the_client_leaves(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """A stalled request is never answered; the client giving up is counted as a disconnect."""
    server.config = attrs.evolve(server.config, stall_rate=1.0)
    with trio.move_on_after(100) as scope:
        await client.post("/chat/completions", json=chat())
    assert scope.cancelled_caught
    await wait_for(lambda: server.stats.disconnects == 1)
    assert server.stats.stalls == 1
    assert server.stats.in_flight == 0
    assert server.stats.requests_by_status == {}


async def test_disconnect_during_latency_is_counted(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """A client that leaves while the server waits out the latency is counted at once."""
    server.config = attrs.evolve(server.config, latency=60.0)
    start = trio.current_time()
    with trio.move_on_after(1):
        await client.post("/chat/completions", json=chat())
    await wait_for(lambda: server.stats.disconnects == 1)
    assert trio.current_time() - start < 2  # noticed long before the latency was over
    assert server.stats.completion_tokens == 0


async def test_disconnect_mid_stream_is_counted(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """A client that stops reading a paced stream halfway is counted as a disconnect."""
    server.config = attrs.evolve(server.config, tokens_per_second=10)
    # Cancelling (rather than breaking out of the loop) unwinds httpx2's nested generators.
    with trio.CancelScope() as scope:
        async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as response:
            async for line in response.aiter_lines():
                if '"content":"' in line and '"role"' not in line:
                    scope.cancel()  # leave after the first token
    await wait_for(lambda: server.stats.disconnects == 1)
    assert server.stats.requests_by_status == {200: 1}


async def test_injected_disconnect_breaks_a_json_response(
    server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """disconnect_rate=1 cuts a JSON body halfway: the client sees a protocol error."""
    server.config = attrs.evolve(server.config, disconnect_rate=1.0)
    with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
        await client.post("/chat/completions", json=chat())
    assert server.stats.injected_disconnects == 1
    assert server.stats.disconnects == 0


async def test_injected_disconnect_breaks_a_stream(
    server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """disconnect_rate=1 cuts a stream after a few events, before [DONE]."""
    server.config = attrs.evolve(server.config, disconnect_rate=1.0)
    lines: list[str] = []

    async def read_all() -> None:
        async with client.stream("POST", "/chat/completions", json=chat(stream=True)) as response:
            async for line in response.aiter_lines():
                lines.append(line)

    with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
        await read_all()
    assert any(line.startswith("data: {") for line in lines)
    assert "data: [DONE]" not in lines
    assert server.stats.injected_disconnects == 1


async def test_broken_connection_does_not_disturb_others(
    server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """Garbage and resets on one connection leave the server answering on others."""
    for junk in (
        b"\x00\x01\x02\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: z\r\n\r\n",
    ):
        await raw_exchange(server.port, junk)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"
    )
    await stream.aclose()  # gone mid-body
    response = await client.post("/chat/completions", json=chat())
    assert response.status_code == 200


# --- rate limits ---------------------------------------------------------------------------


async def test_rate_limit_headers_and_429(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """RPM: each response reports the bucket; past the limit a 429 says when to retry."""
    server.config = attrs.evolve(server.config, requests_per_minute=2)
    first = await client.post("/chat/completions", json=chat())
    second = await client.post("/chat/completions", json=chat())
    refused = await client.post("/chat/completions", json=chat())
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "30s"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.headers["x-ratelimit-reset-requests"] == "1m0s"
    error = assert_openai_error(refused, 429, "requests")
    assert error["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["retry-after-ms"] == "30000"
    assert "x-ratelimit-limit-tokens" not in refused.headers
    assert server.stats.rate_limited == 1
    await trio.sleep(30)  # the bucket refills 2/60 per second: one request after 30 s
    assert (await client.post("/chat/completions", json=chat())).status_code == 200
    assert (await client.post("/chat/completions", json=chat())).status_code == 429


async def test_token_limit_charges_prompt_and_completion(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """TPM: a request costs its total tokens; too many tokens get a 429 of type "tokens"."""
    server.config = attrs.evolve(server.config, tokens_per_minute=100)
    ok = await client.post("/chat/completions", json=chat(max_tokens=20))
    total = ok.json()["usage"]["total_tokens"]
    assert ok.headers["x-ratelimit-limit-tokens"] == "100"
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(100 - total)
    assert "x-ratelimit-limit-requests" not in ok.headers
    statuses = [
        (await client.post("/chat/completions", json=chat(max_tokens=20))).status_code
        for _ in range(5)
    ]
    assert statuses.count(429) >= 1
    refused = await client.post("/chat/completions", json=chat(max_tokens=20))
    assert assert_openai_error(refused, 429, "tokens")["code"] == "rate_limit_exceeded"
    too_big = await client.post("/chat/completions", json=chat(content="word " * 200))
    error = assert_openai_error(too_big, 429, "tokens")
    assert "too large" in error["message"]
    await trio.sleep(60)
    assert (await client.post("/chat/completions", json=chat(max_tokens=20))).status_code == 200


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.0121, "13ms"), (1, "1s"), (20.5, "20.5s"), (90.5, "1m30.5s"), (360, "6m0s"),
     (3725, "1h2m5s")],
)  # fmt: skip
def test_go_duration(seconds: float, text: str) -> None:
    """Reset times print like Go durations, rounded up to the millisecond."""
    assert go_duration(seconds) == text


# --- timing --------------------------------------------------------------------------------


async def test_latency_delays_the_response(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """latency holds every response back that long (virtual time)."""
    server.config = attrs.evolve(server.config, latency=2.5)
    start = trio.current_time()
    await post_chat(client)
    assert trio.current_time() - start == pytest.approx(2.5, abs=0.01)


async def test_tokens_per_second_paces_generation(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """tokens_per_second makes a JSON reply take tokens/tps, and spaces streamed tokens evenly."""
    server.config = attrs.evolve(server.config, tokens_per_second=20.0, latency=1.0)
    start = trio.current_time()
    body = await post_chat(client, max_tokens=10)
    assert trio.current_time() - start == pytest.approx(1.0 + 10 / 20, abs=0.01)
    assert body["usage"]["completion_tokens"] == 10
    arrivals = []
    start = trio.current_time()
    body = chat(stream=True, max_tokens=10)
    async with client.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"role"' not in line:
                arrivals.append(trio.current_time() - start)
    assert len(arrivals) == 10
    assert arrivals[0] == pytest.approx(1.0 + 0.05, abs=0.01)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap == pytest.approx(0.05, abs=0.01) for gap in gaps)


async def test_config_swap_applies_to_the_next_request(
    server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """Replacing server.config mid-run changes how the next requests are answered."""
    server.config = attrs.evolve(server.config, error_rate=1.0)
    assert (await client.post("/chat/completions", json=chat())).status_code == 500
    server.config = attrs.evolve(server.config, error_rate=0.0)
    assert (await client.post("/chat/completions", json=chat())).status_code == 200


# --- statistics, logging, lifecycle --------------------------------------------------------


async def test_stats_count_what_happened(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """Stats count requests by status and endpoint, tokens served and peak concurrency."""
    server.config = attrs.evolve(server.config, latency=1.0)
    replies: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        replies.append(await post_chat(client, content=f"q{i}"))

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(one, i)
    await client.post("/embeddings", json={"model": "e", "input": "one two"})
    await client.get("/models")
    await client.get("/missing")
    stats = server.stats
    assert isinstance(stats, FakeLLMStats)
    assert stats.total_requests == 8
    assert stats.requests_by_status == {200: 7, 404: 1}
    assert stats.requests_by_endpoint == {
        "/v1/chat/completions": 5,
        "/v1/embeddings": 1,
        "/v1/models": 1,
        "other": 1,
    }
    assert stats.peak_concurrency == 5
    assert stats.in_flight == 0
    assert stats.prompt_tokens == sum(r["usage"]["prompt_tokens"] for r in replies) + 2
    assert stats.completion_tokens == sum(r["usage"]["completion_tokens"] for r in replies)


async def test_one_log_line_per_request(
    server: FakeLLMServer, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request logs method, path, status, duration and fault, and never the API key."""
    server.config = attrs.evolve(server.config, api_key="sk-do-not-log", error_rate=1.0)
    caplog.set_level(logging.INFO, logger="trio_llm.testing")
    await client.post(
        "/chat/completions", json=chat(), headers={"authorization": "Bearer sk-do-not-log"}
    )
    await client.get("/models", headers={"authorization": "Bearer sk-do-not-log"})
    records = [r for r in caplog.records if r.name == "trio_llm.testing"]
    assert len(records) == 2
    first = records[0].getMessage()
    assert first.startswith("POST /v1/chat/completions 500 ")
    assert "ms" in first
    assert "fault=error" in first
    assert records[1].getMessage().startswith("GET /v1/models 200 ")
    assert "sk-do-not-log" not in caplog.text


async def test_serve_fake_llm_with_nursery_start() -> None:
    """serve_fake_llm reports the server once listening and stops when cancelled."""
    async with trio.open_nursery() as nursery:
        server: FakeLLMServer = await nursery.start(serve_fake_llm, FakeLLMConfig(seed=3))
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert server.root_url == f"http://127.0.0.1:{server.port}"
        assert server.config.seed == 3
        async with httpx2.AsyncClient() as http:
            assert (await http.get(server.base_url + "/models")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_leaving_the_block_stops_everything(autojump_clock: trio.abc.Clock) -> None:
    """Leaving open_fake_llm ends stalled and idle connections and closes the port."""
    failures: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        async with open_fake_llm(FakeLLMConfig(stall_rate=1.0)) as server:
            port = server.port
            idle = await trio.open_tcp_stream("127.0.0.1", port)  # connected, never sends

            async def stalled() -> None:
                async with httpx2.AsyncClient(base_url=server.base_url, timeout=600) as http:
                    try:
                        await http.post("/chat/completions", json=chat())
                    except httpx2.HTTPError as exc:
                        failures.append(exc)

            nursery.start_soon(stalled)
            await wait_for(lambda: server.stats.stalls == 1)
        # The block is left, so no server task is running any more: the stalled client saw
        # its connection close, the idle one reads EOF, and the port refuses connections.
        with trio.fail_after(5):
            assert await idle.receive_some() == b""
        await idle.aclose()
    assert len(failures) == 1
    assert isinstance(failures[0], httpx2.RemoteProtocolError)
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream("127.0.0.1", port)


def test_config_validates_its_fields() -> None:
    """Out-of-range settings are refused; every field documents itself for the CLI."""
    for bad in (
        {"latency": -1.0},
        {"tokens_per_second": 0.0},
        {"error_rate": 1.5},
        {"stall_rate": -0.1},
        {"disconnect_rate": 2.0},
        {"error_status": 200},
        {"requests_per_minute": 0},
        {"tokens_per_minute": 0},
        {"api_key": ""},
        {"models": ()},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FakeLLMConfig(**bad)
    for field in attrs.fields(FakeLLMConfig):
        assert field.metadata["help"]
    flags = {f.name: f.metadata.get("flag") for f in attrs.fields(FakeLLMConfig)}
    assert flags["requests_per_minute"] == "--rpm"
    assert flags["tokens_per_minute"] == "--tpm"
    assert FakeLLMConfig(models=["a", "b"]).models == ("a", "b")
    assert FakeLLMConfig(models="solo").models == ("solo",)


# --- Anthropic Messages --------------------------------------------------------------------


async def test_messages_api_answers_like_chat(client: httpx2.AsyncClient) -> None:
    """/v1/messages answers in Anthropic's format, with the chat endpoint's text."""
    openai_reply = await client.post(
        "/chat/completions",
        json={
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
            ],
        },
    )
    response = await client.post(
        "/messages",
        json={
            "model": "claude-fake",
            "max_tokens": 1024,
            "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
        },
    )
    assert response.status_code == 200
    assert response.headers["request-id"].startswith("req_")
    body = response.json()
    assert body["id"].startswith("msg_")
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["model"] == "claude-fake"
    assert body["stop_reason"] == "end_turn"
    assert body["stop_sequence"] is None
    [block] = body["content"]
    expected = openai_reply.json()
    assert block == {"type": "text", "text": expected["choices"][0]["message"]["content"]}
    assert body["usage"] == {
        "input_tokens": expected["usage"]["prompt_tokens"],
        "output_tokens": expected["usage"]["completion_tokens"],
    }


async def test_messages_stream_follows_anthropic_events(client: httpx2.AsyncClient) -> None:
    """A streamed message sends message_start, block events, message_delta, message_stop."""
    body = {"model": "c", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    whole = (await client.post("/messages", json=body)).json()
    response = await client.post("/messages", json={**body, "stream": True})
    events = [block.split("\n") for block in response.text.strip().split("\n\n")]
    kinds = [lines[0].removeprefix("event: ") for lines in events]
    payloads = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(p["type"] == kind for p, kind in zip(payloads, kinds, strict=True))
    text = "".join(p["delta"]["text"] for p in payloads if p["type"] == "content_block_delta")
    assert text == whole["content"][0]["text"]
    assert payloads[-2]["delta"]["stop_reason"] == "max_tokens"
    assert payloads[-2]["usage"]["output_tokens"] == 4


async def test_messages_tool_use(client: httpx2.AsyncClient) -> None:
    """Anthropic tools get a tool_use block whose input fits the input_schema."""
    tool = {"name": "get_time", "input_schema": TIME_TOOL["function"]["parameters"]}  # type: ignore[index]
    body = {
        "model": "c",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Time?"}],
        "tools": [tool],
    }
    reply = (await client.post("/messages", json=body)).json()
    assert reply["stop_reason"] == "tool_use"
    [block] = reply["content"]
    assert block["type"] == "tool_use"
    assert block["name"] == "get_time"
    assert isinstance(block["input"]["zone"], str)
    streamed = await client.post("/messages", json={**body, "stream": True})
    partial = "".join(
        json.loads(line.removeprefix("data: "))["delta"]["partial_json"]
        for line in streamed.text.split("\n")
        if "input_json_delta" in line
    )
    assert json.loads(partial) == block["input"]


async def test_messages_errors_use_anthropic_shape(
    server: FakeLLMServer, client: httpx2.AsyncClient
) -> None:
    """Errors on /v1/messages have Anthropic's shape; x-api-key authenticates there."""
    response = await client.post("/messages", json={"model": "c", "messages": []})
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"
    server.config = attrs.evolve(server.config, api_key="sk-ant")
    body = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}
    refused = await client.post("/messages", json=body)
    assert refused.json()["error"]["type"] == "authentication_error"
    accepted = await client.post("/messages", json=body, headers={"x-api-key": "sk-ant"})
    assert accepted.status_code == 200
    server.config = attrs.evolve(server.config, api_key=None, error_rate=1.0, error_status=529)
    overloaded = await client.post("/messages", json=body)
    assert overloaded.status_code == 529
    assert overloaded.json()["error"]["type"] == "overloaded_error"


async def test_http10_request_is_answered_then_closed(server: FakeLLMServer) -> None:
    """An HTTP/1.0 client (no keep-alive) gets its answer and the connection closes."""
    raw = await raw_exchange(server.port, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["object"] == "list"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "c", "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens"),
        ({"model": "c", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
         "messages.0.role"),
        ({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
         "messages.0.content"),
        ({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": [3]}]},
         "messages.0.content"),
        ({"model": "c", "max_tokens": 5, "system": 1,
          "messages": [{"role": "user", "content": ""}]},
         "system"),
    ],
)  # fmt: skip
async def test_invalid_messages_requests_get_400(
    client: httpx2.AsyncClient, body: dict[str, Any], param: str
) -> None:
    """Messages requests without max_tokens or with malformed messages get a 400."""
    response = await client.post("/messages", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert param in response.json()["error"]["message"]


async def test_messages_tool_results_and_choices(client: httpx2.AsyncClient) -> None:
    """Tool results count as conversation text; tool_choice picks a tool or none."""
    tools = [
        {"name": "first", "input_schema": {"type": "object", "properties": {}}},
        {"name": "second", "input_schema": {"type": "object", "properties": {}}},
    ]
    base = {"model": "c", "max_tokens": 50, "tools": tools}
    messages = [
        {"role": "user", "content": "Go."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "42"}]},
    ]
    named = await client.post(
        "/messages",
        json={**base, "messages": messages, "tool_choice": {"type": "tool", "name": "second"}},
    )
    assert named.json()["content"][0]["name"] == "second"
    assert named.json()["content"][0]["input"] == {}
    plain = await client.post(
        "/messages", json={**base, "messages": messages, "tool_choice": {"type": "none"}}
    )
    assert plain.json()["content"][0]["type"] == "text"
    as_openai = await post_chat(client, content="Go.\n\n42")
    assert plain.json()["usage"]["input_tokens"] == as_openai["usage"]["prompt_tokens"] + 6


async def test_openai_tool_choice_variants(client: httpx2.AsyncClient) -> None:
    """allowed_tools picks its first function; a custom tool choice or no functions gives text."""
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "get_time"}}],
        },
    }
    picked = await post_chat(client, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=allowed)
    assert picked["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    custom = {"type": "custom", "custom": {"name": "free"}}
    custom_tool = {"type": "custom", "custom": {"name": "free"}}
    text = await post_chat(client, tools=[custom_tool, WEATHER_TOOL], tool_choice=custom)
    assert text["choices"][0]["finish_reason"] == "stop"
    only_custom = await post_chat(client, tools=[custom_tool, "junk"])
    assert only_custom["choices"][0]["finish_reason"] == "stop"
    unknown = {"type": "function", "function": {"name": "not_listed"}}
    forced = await post_chat(client, tools=[WEATHER_TOOL], tool_choice=unknown)
    call = forced["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call == {"name": "not_listed", "arguments": "{}"}


def test_json_from_schema_keywords() -> None:
    """Formats, exclusive bounds, multipleOf, const, prefixItems and allOf are honoured."""
    schema = {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date-time"},
            "mail": {"type": "string", "format": "email"},
            "code": {"type": "string", "maxLength": 2},
            "even": {"type": "integer", "multipleOf": 2, "minimum": 3, "maximum": 9},
            "open": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
            "low": {"type": "integer", "maximum": -50},
            "high": {"type": "number", "minimum": 1000},
            "step": {"type": "number", "minimum": 0.1, "maximum": 0.9, "multipleOf": 0.25},
            "fixed": {"const": "same"},
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]},
            "both": {"allOf": [{"$ref": "#/definitions/named"}, {"required": ["extra"],
                     "properties": {"extra": {"type": "null"}}}]},
            "maybe": {"type": ["null", "integer"]},
        },
        "definitions": {"named": {"type": "object", "properties": {"name": {"type": "string"}},
                                  "required": ["name"]}},
    }  # fmt: skip
    value = json.loads(json_from_schema(json.dumps(schema), "conv", 1, "salt"))
    assert value["when"] == "2024-05-17T12:00:00Z"
    assert "@" in value["mail"]
    assert len(value["code"]) <= 2
    assert value["even"] in (4, 6, 8)
    assert value["open"] == 1
    assert value["low"] <= -50
    assert value["high"] >= 1000
    assert value["step"] in (0.25, 0.5, 0.75)
    assert value["fixed"] == "same"
    assert isinstance(value["pair"][0], int)
    assert isinstance(value["pair"][1], bool)
    assert isinstance(value["both"]["name"], str)
    assert value["both"]["extra"] is None
    assert isinstance(value["maybe"], int)
    assert json_from_schema("not json", "c", 0, "s") == "{}"
