"""Workflows: Prompt templates, chaining and map-reduce (structured output: test_structured.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
import trio

import trio_llm
from trio_llm._mapreduce import estimate_tokens, split_text
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm


def chat_reply(content: str) -> dict[str, Any]:
    """An OpenAI chat completion whose message has ``content``."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def scripted(contents: list[str], seen: list[dict[str, Any]]) -> httpx2.MockTransport:
    """A MockTransport answering each chat request with the next content (the last repeats)."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        content = contents[min(len(seen), len(contents)) - 1]
        return httpx2.Response(200, json=chat_reply(content))

    return httpx2.MockTransport(handle)


def mock_client(transport: httpx2.MockTransport) -> Any:
    """A client on ``transport`` (no retries, so the script is followed exactly)."""
    return trio_llm.open_client(
        base_url="http://mock.test/v1", api_key="sk-test", model="m", transport=transport
    )


def fake_client(server: FakeLLMServer, **kwargs: Any) -> Any:
    """A client on the fake server."""
    return trio_llm.open_client(base_url=server.base_url, model="fake", **kwargs)


# --- Prompt ----------------------------------------------------------------------------


def test_prompt_fields_and_literal_braces() -> None:
    """Fields are found in order (system too); {{ and }} stay literal braces."""
    prompt = trio_llm.Prompt(
        'Reply as {{"story": ...}} about {topic} in {style}, {topic}.', system="You are {role}."
    )
    assert prompt.fields == ("topic", "style", "role")
    messages = prompt.messages(topic="cats", style="verse", role="a poet")
    assert messages == [
        {"role": "system", "content": "You are a poet."},
        {"role": "user", "content": 'Reply as {"story": ...} about cats in verse, cats.'},
    ]


def test_prompt_missing_and_unknown_fields_are_named() -> None:
    """A missing or unknown field is a ValueError naming the fields, not a KeyError."""
    prompt = trio_llm.Prompt("Write about {topic} for {audience}.")
    with pytest.raises(ValueError, match="missing field\\(s\\) audience") as info:
        prompt.format(topic="cats")
    assert not isinstance(info.value, KeyError)
    with pytest.raises(ValueError, match="unknown field\\(s\\) colour, mood"):
        prompt.format(topic="cats", audience="kids", mood="x", colour="y")


@pytest.mark.parametrize("template", ["Positional {}", "Index {0}", "Attr {a.b}", "Item {a[0]}"])
def test_prompt_rejects_non_name_fields(template: str) -> None:
    """Positional, indexed and attribute fields are refused when the prompt is made."""
    with pytest.raises(ValueError, match="plain name"):
        trio_llm.Prompt(template)


def test_prompt_rejects_unbalanced_braces() -> None:
    """A stray brace is a clear ValueError when the prompt is made."""
    with pytest.raises(ValueError, match="invalid prompt template"):
        trio_llm.Prompt("Broken {topic")


def test_prompt_with_params_merges_defaults() -> None:
    """with_params returns a copy with updated default params; the original is unchanged."""
    prompt = trio_llm.Prompt("Hi {name}", max_tokens=10, temperature=0)
    hotter = prompt.with_params(temperature=1)
    assert hotter.params == {"max_tokens": 10, "temperature": 1}
    assert prompt.params == {"max_tokens": 10, "temperature": 0}
    assert "Hi {name}" in repr(hotter)


async def test_prompt_run_sends_messages_and_params() -> None:
    """run fills the fields and sends the system message and default params."""
    seen: list[dict[str, Any]] = []
    prompt = trio_llm.Prompt("Story about {topic}.", system="Be brief.", max_tokens=7)
    async with mock_client(scripted(["Once."], seen)) as client:
        reply = await prompt.run(client, topic="owls")
    assert reply.text == "Once."
    assert seen[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Story about owls."},
    ]
    assert seen[0]["max_tokens"] == 7


async def test_prompt_run_is_deterministic_on_the_fake_server(fake_llm: FakeLLMServer) -> None:
    """run gives the same answer as client.chat with the same messages."""
    prompt = trio_llm.Prompt("Write a short story about {topic}.", max_tokens=30)
    async with fake_client(fake_llm) as client:
        reply = await prompt.run(client, topic="a lighthouse")
        direct = await client.chat("Write a short story about a lighthouse.", max_tokens=30)
    assert reply.text == direct.text
    assert reply.text


async def test_prompt_map_is_ordered_and_bounded(autojump_clock: trio.abc.Clock) -> None:
    """map returns one Result per item in order, never more than limit in flight."""
    topics = [f"topic {i}" for i in range(12)]
    prompt = trio_llm.Prompt("Write a short story about {topic}.", max_tokens=20)
    async with open_fake_llm(FakeLLMConfig(latency=1.0)) as server, fake_client(server) as client:
        results = await prompt.map(client, [{"topic": t} for t in topics], limit=3)
        singles = [await prompt.run(client, topic=t) for t in topics[:2]]
        assert server.stats.peak_concurrency == 3
    assert all(r.ok for r in results)
    assert [r.unwrap().text for r in results[:2]] == [s.text for s in singles]


async def test_prompt_map_checks_every_item_before_sending() -> None:
    """A bad item in map raises ValueError before any request is sent."""
    seen: list[dict[str, Any]] = []
    prompt = trio_llm.Prompt("About {topic}.")
    async with mock_client(scripted(["x"], seen)) as client:
        with pytest.raises(ValueError, match="missing field\\(s\\) topic"):
            await prompt.map(client, [{"topic": "a"}, {"subject": "b"}])
    assert seen == []


async def test_prompt_map_captures_per_item_failures() -> None:
    """A failed item is reported in its Result; the others still succeed."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        if "bad" in body["messages"][0]["content"]:
            return httpx2.Response(400, json={"error": {"message": "nope"}})
        return httpx2.Response(200, json=chat_reply("fine"))

    prompt = trio_llm.Prompt("About {topic}.")
    async with mock_client(httpx2.MockTransport(handle)) as client:
        results = await prompt.map(client, [{"topic": "good"}, {"topic": "bad"}])
    assert results[0].ok
    assert isinstance(results[1].error, trio_llm.BadRequestError)


async def test_chaining_feeds_one_output_into_the_next(fake_llm: FakeLLMServer) -> None:
    """Chaining is plain code: the first call's text is the second prompt's field."""
    outline = trio_llm.Prompt("Outline a story about {topic}.", max_tokens=20)
    story = trio_llm.Prompt("Write the story for this outline: {outline}", max_tokens=40)
    async with fake_client(fake_llm) as client:

        async def chain(topic: str) -> str:
            first = await outline.run(client, topic=topic)
            return (await story.run(client, outline=first.text)).text

        stories = await trio_llm.map_concurrently(chain, ["owls", "tides"], limit=2)
        first = await outline.run(client, topic="owls")
        expected = await client.chat(
            f"Write the story for this outline: {first.text}", max_tokens=40
        )
    assert stories[0] == expected.text
    assert stories[0] != stories[1]


# --- map_reduce ----------------------------------------------------------------------


def test_split_text_respects_the_limit_and_boundaries() -> None:
    """Chunks fit the estimate; paragraphs stay whole when they fit; long ones split."""
    paragraphs = [f"Paragraph {i}. " + "Some words here. " * 5 for i in range(6)]
    text = "\n\n".join(paragraphs)
    chunks = split_text(text, chunk_tokens=60)
    assert all(len(c) <= 240 for c in chunks)
    assert len(chunks) > 1
    assert chunks[0].startswith("Paragraph 0.")
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())
    long_sentence = "word " * 100 + "x" * 50
    pieces = split_text(long_sentence, chunk_tokens=5)
    assert all(len(p) <= 20 for p in pieces)
    assert "".join(pieces).replace("word", "").replace(" ", "") == "x" * 50
    assert split_text("", chunk_tokens=5) == []
    assert estimate_tokens("abcdefgh") == 2
    with pytest.raises(ValueError, match="chunk_tokens"):
        split_text("x", chunk_tokens=0)


async def test_map_reduce_recurses_until_it_fits() -> None:
    """Chunks are summarised concurrently, then combined in rounds until the text fits."""
    seen: list[dict[str, Any]] = []
    # Every reply is 80 chars (20 tokens): five summaries fit in 100 tokens, not 30.
    async with mock_client(scripted(["s" * 80], seen)) as client:
        result = await trio_llm.map_reduce(
            client,
            ["A sentence here. " * 40, "Another one. " * 40],
            trio_llm.Prompt("Summarise: {text}"),
            trio_llm.Prompt("Combine: {summaries}"),
            chunk_tokens=50,
        )
    assert result.chunks == result.map_calls
    assert result.chunks >= 6
    assert result.rounds > 1
    assert result.text == "s" * 80
    assert len(seen) == result.map_calls + result.reduce_calls
    assert all(
        estimate_tokens(body["messages"][0]["content"].split(": ", 1)[1]) <= 50 for body in seen
    )


async def test_map_reduce_on_the_fake_server(fake_llm: FakeLLMServer) -> None:
    """Many documents are summarised into one text; counts add up."""
    documents = [f"Article {i}. " + "The town council met on Tuesday. " * 30 for i in range(8)]
    async with fake_client(fake_llm) as client:
        result = await trio_llm.map_reduce(
            client,
            documents,
            trio_llm.Prompt("Summarise in one sentence: {text}", max_tokens=30),
            trio_llm.Prompt("Combine these summaries: {summaries}", max_tokens=60),
            chunk_tokens=200,
            limit=4,
        )
        assert fake_llm.stats.peak_concurrency <= 4
    assert result.text
    assert result.chunks == 16
    assert fake_llm.stats.requests_by_status[200] == result.map_calls + result.reduce_calls


async def test_map_reduce_stops_after_max_rounds() -> None:
    """Summaries that never shrink end in one last combine after max_rounds."""
    seen: list[dict[str, Any]] = []
    async with mock_client(scripted(["w " * 200], seen)) as client:
        result = await trio_llm.map_reduce(
            client,
            ["Short one.", "Short two.", "Short three."],
            trio_llm.Prompt("S: {text}"),
            trio_llm.Prompt("C: {text}"),
            chunk_tokens=50,
            max_rounds=2,
        )
    assert result.rounds == 2
    assert len(seen) == result.map_calls + result.reduce_calls


async def test_map_reduce_of_nothing_makes_no_calls() -> None:
    """No text means no calls and an empty result."""
    seen: list[dict[str, Any]] = []
    async with mock_client(scripted(["x"], seen)) as client:
        result = await trio_llm.map_reduce(
            client, ["", "  \n\n "], trio_llm.Prompt("{a}"), trio_llm.Prompt("{b}")
        )
    assert result == trio_llm.MapReduceResult(
        text="", chunks=0, map_calls=0, reduce_calls=0, rounds=0
    )
    assert seen == []


async def test_map_reduce_checks_its_prompts_and_options() -> None:
    """Prompts need exactly one field; max_rounds at least 1."""
    async with mock_client(scripted(["x"], [])) as client:
        with pytest.raises(ValueError, match=r"exactly one field.*it has 2: a, b"):
            await trio_llm.map_reduce(
                client, ["t"], trio_llm.Prompt("{a} {b}"), trio_llm.Prompt("{c}")
            )
        with pytest.raises(ValueError, match="max_rounds"):
            await trio_llm.map_reduce(
                client, ["t"], trio_llm.Prompt("{a}"), trio_llm.Prompt("{c}"), max_rounds=0
            )


async def test_map_reduce_fails_fast() -> None:
    """A failed call cancels the rest and propagates in an ExceptionGroup."""

    def handle(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(400, json={"error": {"message": "bad"}})

    async with mock_client(httpx2.MockTransport(handle)) as client:
        with pytest.RaisesGroup(trio_llm.BadRequestError, allow_unwrapped=False):
            await trio_llm.map_reduce(client, ["a"], trio_llm.Prompt("{t}"), trio_llm.Prompt("{t}"))
