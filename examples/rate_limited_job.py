"""Run a job at a provider's rate limit, and no faster: ``RateLimit(rpm, tpm)``.

Providers limit requests and tokens per minute, as buckets that start full and refill
continuously. ``RateLimit(requests_per_minute=..., tokens_per_minute=...)`` gives the
client the same buckets, shared by all its tasks: each request waits (in arrival order)
until one request and its estimated tokens (prompt characters / 4 + ``max_tokens``) are
available, and the estimate is corrected with the reply's real ``usage``. So the job runs
at the limit without being refused. Without a ``RateLimit`` the client still learns the
limits from the server's ``x-ratelimit-*`` headers; ``--no-limit`` turns limiting off
entirely to show the 429s (which are retried, after a client-wide pause).

Runs offline with no arguments (~5 s), against trio-llm's fake server enforcing the same
limits; or against any OpenAI-compatible API (set ``--rpm``/``--tpm`` to your tier's)::

    python examples/rate_limited_job.py
    python examples/rate_limited_job.py --no-limit
    OPENAI_API_KEY=sk-... python examples/rate_limited_job.py \\
        --base-url https://api.openai.com/v1 --rpm 500 --tpm 200000
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import AsyncExitStack

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm


async def main(argv: list[str] | None = None) -> None:
    """Run the job under the rate limit; print the achieved rate and the 429s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    parser.add_argument("--rpm", type=int, default=600, help="requests per minute")
    parser.add_argument("--tpm", type=int, default=6000, help="tokens per minute")
    parser.add_argument("--requests", type=int, default=175, help="size of the job")
    parser.add_argument("--no-limit", action="store_true", help="no client-side limiter")
    args = parser.parse_args(argv)
    logging.getLogger("stamina").setLevel(logging.ERROR)  # 429s are counted below

    async with AsyncExitStack() as stack:
        base_url, api_key = args.base_url, None  # None: the key comes from $OPENAI_API_KEY
        server: FakeLLMServer | None = None
        if base_url is None:
            fake = FakeLLMConfig(
                latency=0.05, requests_per_minute=args.rpm, tokens_per_minute=args.tpm
            )
            server = await stack.enter_async_context(open_fake_llm(fake))
            base_url, api_key = server.base_url, "sk-fake"
            print(
                f"(no --base-url: offline, using a fake server limited to {args.rpm} "
                f"requests and {args.tpm} tokens per minute at {base_url})",
                file=sys.stderr,
            )
        limit = trio_llm.RateLimit(requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
        client = await stack.enter_async_context(
            trio_llm.open_client(
                base_url=base_url,
                api_key=api_key,
                model=args.model,
                rate_limit=None if args.no_limit else limit,
            )
        )

        prompts = (
            f"Write a one-line tip about rate limits, number {i}." for i in range(args.requests)
        )
        start = trio.current_time()
        results = await client.chat_many(prompts, max_tokens=20)
        elapsed = trio.current_time() - start

    stats = client.statistics()
    tokens = stats.prompt_tokens + stats.completion_tokens
    print(f"{sum(r.ok for r in results)} of {len(results)} answered in {elapsed:.1f} s")
    for error in {type(r.error).__name__ for r in results if r.error}:
        print(f"  failed with {error}")
    # The buckets start full: the first minute's worth goes at once, the rest at the limit.
    print(
        f"{tokens:,} tokens used: the first {args.tpm:,} at once, then "
        f"{max(0, tokens - args.tpm) / elapsed * 60:,.0f} tokens/min (limit {args.tpm:,})"
    )
    print(f"429 responses: {stats.rate_limited}, retries: {stats.retried}")
    if server is not None:
        print(f"the server refused {server.stats.rate_limited} requests")


if __name__ == "__main__":
    trio.run(main)
