"""Summarise 100 articles as a resumable batch: interrupt it (Ctrl-C), run it again.

Run with no arguments to use trio-llm's fake server (offline, no key needed), or point it
at any OpenAI-compatible server::

    python examples/batch_summaries.py
    OPENAI_API_KEY=sk-... python examples/batch_summaries.py \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini

It turns ``examples/data/articles.jsonl`` (``{"id", "title", "text"}`` per line) into
Batch API request lines, sends them with :func:`trio_llm.run_batch`, and prints a few
summaries. Each summary is written to ``--output`` as soon as it arrives, so a second run
after Ctrl-C (or a crash) sends only the articles not yet summarised.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm

ARTICLES = Path(__file__).parent / "data" / "articles.jsonl"
INSTRUCTIONS = "Summarise the article in one sentence of at most 25 words, for a news digest."


def write_requests(articles: Path, requests: Path, model: str) -> int:
    """Write one Batch API chat request per article; return how many.

    The article id is the ``custom_id``, so answers can be matched back and a rerun
    knows which articles are done. Rewriting the file each run is safe: the same
    articles give the same lines.
    """
    count = 0
    with articles.open(encoding="utf-8") as source, requests.open("w", encoding="utf-8") as out:
        for line in source:
            article = json.loads(line)
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": INSTRUCTIONS},
                    {"role": "user", "content": f"{article['title']}\n\n{article['text']}"},
                ],
                "max_tokens": 60,
                "temperature": 0.2,
            }
            request = {
                "custom_id": article["id"],
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            out.write(json.dumps(request, ensure_ascii=False) + "\n")
            count += 1
    return count


def print_some(output: Path, how_many: int = 3) -> None:
    """Print the first few summaries of the output file, in article order."""
    summaries = {}
    with output.open(encoding="utf-8") as answers:
        for line in answers:
            record = json.loads(line)
            if record["error"] is None:
                message = record["response"]["body"]["choices"][0]["message"]
                summaries[record["custom_id"]] = message["content"]
    for custom_id in sorted(summaries)[:how_many]:
        print(f"{custom_id}: {summaries[custom_id]}")


@asynccontextmanager
async def open_llm(base_url: str | None, model: str) -> AsyncIterator[trio_llm.Client]:
    """Open a client for ``base_url``, or for a fake server paced like a real model."""
    if base_url is not None:
        async with trio_llm.open_client(base_url=base_url, model=model) as client:
            yield client
        return
    async with open_fake_llm(FakeLLMConfig(latency=0.3, tokens_per_second=300)) as server:
        print(
            f"(no --base-url: summarising with a fake LLM server at {server.base_url}; "
            "offline, the summaries are generated text)",
            file=sys.stderr,
        )
        async with trio_llm.open_client(
            base_url=server.base_url, model=model, max_concurrency=16
        ) as client:
            yield client


async def main() -> int:
    """Parse the command line, run the batch, print a few summaries."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("summaries.jsonl"),
        help="where the answers go, and what a rerun resumes from (default: %(default)s)",
    )
    args = parser.parse_args()
    requests = args.output.with_name(args.output.stem + ".requests.jsonl")
    count = write_requests(ARTICLES, requests, args.model)
    print(f"{count} articles -> {requests}", file=sys.stderr)
    async with open_llm(args.base_url, args.model) as client:
        summary = await trio_llm.run_batch(
            requests, args.output, client=client, progress=True, handle_signals=True, grace=10
        )
    if summary.interrupted:
        print(f"Interrupted: {summary.unanswered} articles left; run again to resume.")
        return 130
    print_some(args.output)
    print(
        f"{summary.succeeded} summarised now, {summary.skipped} already done, "
        f"{summary.errors} with errors; {summary.tokens:,} tokens; all in {args.output}"
    )
    return 0 if summary.all_succeeded else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
