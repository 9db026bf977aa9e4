"""Extract typed facts from news articles: structured output validated into attrs classes.

``trio_llm.chat_structured`` sends a strict JSON Schema built from an attrs class, checks
the reply against it, and returns an instance. A reply that is not valid JSON or does not
match is sent back with the problem for a bounded number of repairs (``max_repairs``),
then ``StructuredOutputError`` carries the last raw text. ``Prompt.run_structured`` does
the same with a template; ``map_concurrently`` runs it over many articles at once.

Runs offline with no arguments, against trio-llm's fake server (its replies conform to
the schema, with made-up values); or against any OpenAI-compatible API::

    python examples/structured_output.py
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
import trio

import trio_llm
from trio_llm.testing import open_fake_llm

ARTICLES = Path(__file__).resolve().parent / "data" / "articles.jsonl"


@attrs.frozen
class Person:
    """Someone the article names."""

    name: str
    role: str | None


@attrs.frozen
class ArticleFacts:
    """What we want out of each article."""

    town: str
    people: list[Person]
    topic: Literal["community", "business", "environment", "transport", "culture", "other"]
    sentiment: Literal["positive", "neutral", "negative"]
    numbers: list[float]


EXTRACT = trio_llm.Prompt(
    "Extract the facts of this article.\n\nTitle: {title}\n\n{text}",
    system="You extract facts from news articles as JSON.",
    temperature=0,
)


async def main(argv: list[str] | None = None) -> None:
    """Extract facts from the first few articles concurrently and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    parser.add_argument("--count", type=int, default=5, help="how many articles")
    args = parser.parse_args(argv)
    with ARTICLES.open(encoding="utf-8") as lines:
        articles = [json.loads(line) for line in islice(lines, args.count)]

    async with AsyncExitStack() as stack:
        base_url, api_key = args.base_url, None  # None: the key comes from $OPENAI_API_KEY
        if base_url is None:
            server = await stack.enter_async_context(open_fake_llm())
            base_url, api_key = server.base_url, "sk-fake"
            print(f"(no --base-url: offline, using a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(base_url=base_url, api_key=api_key, model=args.model)
        )

        async def extract(article: dict[str, str]) -> ArticleFacts | trio_llm.LLMError:
            try:
                return await EXTRACT.run_structured(
                    client,
                    ArticleFacts,
                    max_repairs=2,
                    title=article["title"],
                    text=article["text"],
                )
            except trio_llm.StructuredOutputError as exc:  # still invalid after 2 repairs
                print(f"gave up on {article['id']}: {exc} (last reply: {exc.raw_text!r:.80})")
                return exc

        facts = await trio_llm.map_concurrently(extract, articles, limit=8)

    for article, fact in zip(articles, facts, strict=True):
        print(f"{article['id']}: {article['title']}")
        if isinstance(fact, ArticleFacts):
            people = ", ".join(f"{p.name} ({p.role or '?'})" for p in fact.people)
            print(f"  town={fact.town!r} topic={fact.topic} sentiment={fact.sentiment}")
            print(f"  people: {people}")
            print(f"  numbers: {fact.numbers}")
    # A JSON Schema dict works too; the result is then the decoded JSON value.
    print(json.dumps(trio_llm.json_schema_for(ArticleFacts))[:100] + " ...")


if __name__ == "__main__":
    trio.run(main)
