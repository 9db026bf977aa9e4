"""Extract typed facts from news articles: structured output into pydantic and attrs classes.

``trio_llm.chat_structured`` (and ``Prompt.run_structured``) sends a strict JSON Schema
built from the class you give it, checks the reply, and returns an instance: a pydantic
model is validated by pydantic itself (``pip install trio-llm[pydantic]``); an attrs
class by ``jsonschema``, then built by ``cattrs`` (its own validators run too). A reply
that is not valid JSON or does not match goes back with the validator's messages for a
bounded number of repairs (``max_repairs``), then ``StructuredOutputError`` carries the
last raw text. ``map_concurrently`` runs it over many articles at once.

Runs offline with no arguments, against trio-llm's fake server, told to break the first
reply of each conversation so that you see the repairs; through the Anthropic Messages
API too (a forced tool call carries the schema there); or against a real API::

    python examples/structured_output.py
    python examples/structured_output.py --provider anthropic
    OPENAI_API_KEY=sk-... python examples/structured_output.py --base-url https://api.openai.com/v1
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AsyncExitStack
from itertools import islice
from pathlib import Path
from typing import Literal

import attrs
import pydantic
import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm

ARTICLES = Path(__file__).resolve().parent / "data" / "articles.jsonl"


class Person(pydantic.BaseModel):
    """Someone the article names."""

    name: str
    role: str | None = None


class ArticleFacts(pydantic.BaseModel):
    """What we want out of each article (a pydantic model: nested models become $defs)."""

    town: str
    people: list[Person]
    topic: Literal["community", "business", "environment", "transport", "culture", "other"]
    sentiment: Literal["positive", "neutral", "negative"]
    numbers: list[float] = pydantic.Field(description="every number the article gives")


@attrs.frozen
class Headline:
    """A shorter headline (an attrs class: its validator is part of the check)."""

    text: str = attrs.field(validator=attrs.validators.max_len(80))
    urgent: bool


EXTRACT = trio_llm.Prompt(
    "Extract the facts of this article.\n\nTitle: {title}\n\n{text}",
    system="You extract facts from news articles as JSON.",
    temperature=0,
)


async def main(argv: list[str] | None = None) -> None:
    """Extract facts and a headline from the first few articles concurrently; print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an API to call (default: a fake server)")
    parser.add_argument("--provider", choices=["openai", "anthropic"], default="openai")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    parser.add_argument("--count", type=int, default=5, help="how many articles")
    args = parser.parse_args(argv)
    with ARTICLES.open(encoding="utf-8") as lines:
        articles = [json.loads(line) for line in islice(lines, args.count)]

    async with AsyncExitStack() as stack:
        base_url, api_key, server = args.base_url, None, None  # None: the key from the env
        if base_url is None:
            # Every first structured reply is broken on purpose: each call needs one repair.
            config = FakeLLMConfig(invalid_structured_replies=1)
            server = await stack.enter_async_context(open_fake_llm(config))
            anthropic = args.provider == "anthropic"
            base_url, api_key = server.root_url if anthropic else server.base_url, "sk-fake"
            print(f"(no --base-url: offline, using a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(
                base_url=base_url, api_key=api_key, model=args.model, provider=args.provider
            )
        )

        async def extract(article: dict[str, str]) -> tuple[ArticleFacts, Headline] | None:
            try:
                facts = await EXTRACT.run_structured(
                    client,
                    ArticleFacts,
                    max_repairs=2,
                    title=article["title"],
                    text=article["text"],
                )
                headline = await trio_llm.chat_structured(
                    client, f"Write a shorter headline for: {article['title']}", Headline
                )
            except trio_llm.StructuredOutputError as exc:  # still invalid after the repairs
                print(f"gave up on {article['id']}: {exc} (last reply: {exc.raw_text!r:.80})")
                return None
            return facts, headline

        results = await trio_llm.map_concurrently(extract, articles, limit=8)

    for article, result in zip(articles, results, strict=True):
        print(f"{article['id']}: {article['title']}")
        if result is not None:
            facts, headline = result
            people = ", ".join(f"{p.name} ({p.role or '?'})" for p in facts.people)
            print(f"  town={facts.town!r} topic={facts.topic} sentiment={facts.sentiment}")
            print(f"  people: {people}")
            print(f"  numbers: {facts.numbers}")
            print(f"  headline: {headline.text!r}{' (urgent)' if headline.urgent else ''}")
    if server is not None:
        sent = sum(server.stats.requests_by_status.values())
        print(f"{sent} requests for {2 * len(articles)} answers: every first reply was repaired")


if __name__ == "__main__":
    trio.run(main)
