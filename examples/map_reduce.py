"""Summarise 100 news articles into one digest with ``trio_llm.map_reduce``.

The classic "summarise 100 articles" job: every article (split into chunks if it is
longer than ``--chunk-tokens``) is summarised concurrently, then the summaries are
combined, in rounds while they are still too long to send in one request, into a digest.

Runs offline with no arguments, against trio-llm's fake server, on
``examples/data/articles.jsonl``; or against any OpenAI-compatible API::

    python examples/map_reduce.py
    OPENAI_API_KEY=sk-... python examples/map_reduce.py --base-url https://api.openai.com/v1
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm

ARTICLES = Path(__file__).resolve().parent / "data" / "articles.jsonl"

SUMMARISE = trio_llm.Prompt(
    "Summarise this news article in one sentence:\n\n{article}", temperature=0, max_tokens=40
)
COMBINE = trio_llm.Prompt(
    "These are summaries of local news articles. Write a short digest of them:\n\n{summaries}",
    temperature=0,
    max_tokens=150,
)


def load_articles(path: Path) -> list[str]:
    """Each article of a JSON Lines file (``title`` and ``text``) as one document."""
    with path.open(encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    return [f"{record['title']}\n\n{record['text']}" for record in records]


async def main(argv: list[str] | None = None) -> None:
    """Summarise every article, combine the summaries, print the digest and the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    parser.add_argument("--input", type=Path, default=ARTICLES, help="a JSON Lines file")
    parser.add_argument("--chunk-tokens", type=int, default=1000, help="most tokens per call")
    parser.add_argument("--concurrency", type=int, default=32, help="most calls at once")
    args = parser.parse_args(argv)
    documents = load_articles(args.input)

    async with AsyncExitStack() as stack:
        base_url, api_key = args.base_url, None  # None: the key comes from $OPENAI_API_KEY
        if base_url is None:
            server = await stack.enter_async_context(open_fake_llm(FakeLLMConfig(latency=0.5)))
            base_url, api_key = server.base_url, "sk-fake"
            print(f"(no --base-url: offline, using a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(
                base_url=base_url,
                api_key=api_key,
                model=args.model,
                max_concurrency=args.concurrency,
            )
        )

        start = trio.current_time()
        result = await trio_llm.map_reduce(
            client, documents, SUMMARISE, COMBINE, chunk_tokens=args.chunk_tokens
        )
        elapsed = trio.current_time() - start
        stats = client.statistics()

    print(result.text)
    print()
    print(
        f"{len(documents)} articles -> {result.chunks} chunks -> {result.map_calls} summaries, "
        f"combined in {result.rounds} round(s) with {result.reduce_calls} call(s)"
    )
    print(
        f"{stats.succeeded} requests, {stats.prompt_tokens + stats.completion_tokens:,} tokens "
        f"in {elapsed:.2f} s"
    )


if __name__ == "__main__":
    trio.run(main)
