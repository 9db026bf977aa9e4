"""The official ``openai`` package talks to the fake server with strict response validation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import attrs
import openai
import pydantic
import pytest

from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a fake model."},
    {"role": "user", "content": "Say something about Trio."},
]


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with open_fake_llm(FakeLLMConfig(api_key="sk-test")) as fake:
        yield fake


@pytest.fixture
async def client(server: FakeLLMServer) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(
        base_url=server.base_url,
        api_key="sk-test",
        max_retries=0,
        _strict_response_validation=True,
    )
    try:
        yield sdk
    finally:
        await sdk.close()


async def test_chat_completion(client: openai.AsyncOpenAI) -> None:
    """chat.completions.create parses the fake reply, usage and all."""
    completion = await client.chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.model == "fake-gpt"
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert completion.usage is not None
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


# After [DONE] the SDK drains the body and leaves its SSE generator (and httpx2's byte
# generator inside it) suspended instead of closing it; trio's async generator finalizer
# then warns. This is the client's doing and happens with api.openai.com too.
@pytest.mark.filterwarnings(
    r"ignore:Async generator '(httpx2|httpcore2|openai)\..* was garbage collected:ResourceWarning"
)
async def test_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    """A stream with include_usage yields the same text as the JSON reply, then the usage."""
    whole = await client.chat.completions.create(model="fake-gpt", messages=MESSAGES, max_tokens=12)
    stream = await client.chat.completions.create(
        model="fake-gpt",
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    finish = None
    usage = None
    async with stream:
        async for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
    assert text == whole.choices[0].message.content
    assert finish == "length"
    assert usage == whole.usage


async def test_embeddings_default_base64(server: FakeLLMServer, client: openai.AsyncOpenAI) -> None:
    """The client's default base64 embeddings decode to the float embeddings."""
    # Strict validation checks the raw payload before the SDK's base64 post-parser runs, so
    # it refuses every base64 embedding (from api.openai.com too): use a lenient client here.
    lenient = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    try:
        default = await lenient.embeddings.create(model="fake-embed", input=["one", "two"])
    finally:
        await lenient.close()
    floats = await client.embeddings.create(
        model="fake-embed", input=["one", "two"], encoding_format="float"
    )
    assert len(default.data) == 2
    for encoded, plain in zip(default.data, floats.data, strict=True):
        assert len(plain.embedding) == 32
        assert encoded.embedding == pytest.approx(plain.embedding, rel=1e-6)
    assert default.usage.prompt_tokens == 2


async def test_embeddings_with_dimensions(client: openai.AsyncOpenAI) -> None:
    """The dimensions parameter sets the vector length."""
    response = await client.embeddings.create(
        model="fake-embed", input="x", dimensions=64, encoding_format="float"
    )
    assert len(response.data[0].embedding) == 64


async def test_tool_call(client: openai.AsyncOpenAI) -> None:
    """A tools request comes back as a parsed tool call with JSON arguments."""
    completion = await client.chat.completions.create(
        model="fake-gpt",
        messages=MESSAGES,
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "parameters": {
                        "type": "object",
                        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                        "required": ["query", "limit"],
                    },
                },
            }
        ],
    )
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "lookup"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["query"], str)
    assert isinstance(arguments["limit"], int)


class Movie(pydantic.BaseModel):
    title: str
    year: int
    genres: list[str]
    rating: float
    watched: bool


async def test_structured_output_parses_into_a_model(client: openai.AsyncOpenAI) -> None:
    """chat.completions.parse with a pydantic model gets JSON that validates against it."""
    completion = await client.chat.completions.parse(
        model="fake-gpt", messages=MESSAGES, response_format=Movie
    )
    movie = completion.choices[0].message.parsed
    assert isinstance(movie, Movie)


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    """models.list returns the configured models."""
    page = await client.models.list()
    assert [model.id for model in page.data] == ["fake-gpt"]


async def test_wrong_key_is_an_authentication_error(server: FakeLLMServer) -> None:
    """A client with the wrong key gets AuthenticationError."""
    sdk = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES)
    finally:
        await sdk.close()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (409, openai.ConflictError),
        (422, openai.UnprocessableEntityError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
async def test_injected_status_raises_the_matching_error(
    server: FakeLLMServer,
    client: openai.AsyncOpenAI,
    status: int,
    error: type[openai.APIStatusError],
) -> None:
    """Each injected HTTP status surfaces as the openai exception class for that status."""
    server.config = attrs.evolve(server.config, error_rate=1.0, error_status=status)
    with pytest.raises(error) as caught:
        await client.chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert caught.value.status_code == status
    assert caught.value.request_id is not None
    assert caught.value.request_id.startswith("req_")
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"].startswith(f"Injected error: {status}")
