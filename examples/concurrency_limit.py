"""Bound the requests in flight across every task, then take results as they finish.

The asyncio guides wrap each call in ``async with semaphore:``. In trio-llm the bound is
the client's ``max_concurrency``: one ``trio.CapacityLimiter`` that every request of the
client takes a slot from, whichever task makes it. Here three jobs run side by side in a
nursery, sharing one client with ``max_concurrency=5``; a watcher samples
``client.statistics().in_flight`` and the peak never passes 5.

Then ``client.chat_as_completed`` yields ``(index, Result)`` pairs in completion order,
so short answers print first; leaving its block early would cancel the rest.

Runs offline with no arguments, against trio-llm's fake server; or against any
OpenAI-compatible API::

    python examples/concurrency_limit.py
    OPENAI_API_KEY=sk-... python examples/concurrency_limit.py \\
        --base-url https://api.openai.com/v1
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm


async def main(argv: list[str] | None = None) -> None:
    """Run three jobs on one bounded client, then print results in completion order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    parser.add_argument("--max-concurrency", type=int, default=5, help="requests in flight")
    args = parser.parse_args(argv)

    async with AsyncExitStack() as stack:
        base_url, api_key = args.base_url, None  # None: the key comes from $OPENAI_API_KEY
        server: FakeLLMServer | None = None
        if base_url is None:
            fake = FakeLLMConfig(latency=0.1, tokens_per_second=100)
            server = await stack.enter_async_context(open_fake_llm(fake))
            base_url, api_key = server.base_url, "sk-fake"
            print(f"(no --base-url: offline, using a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(
                base_url=base_url,
                api_key=api_key,
                model=args.model,
                max_concurrency=args.max_concurrency,
            )
        )

        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, client.statistics().in_flight)
                await trio.sleep(0.005)

        async def job(name: str, count: int) -> None:
            prompts = [f"{name}: question {i}" for i in range(count)]
            results = await client.chat_many(prompts, max_tokens=10)
            print(f"{name}: {sum(r.ok for r in results)} of {count} answered")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as jobs:
                for name, count in [("summaries", 8), ("titles", 6), ("tags", 6)]:
                    jobs.start_soon(job, name, count)
            nursery.cancel_scope.cancel()  # the jobs are done: stop the watcher

        stats = client.statistics()
        print(f"peak in flight: {peak} (max_concurrency={stats.max_concurrency})")
        if server is not None:
            print(f"the server saw at most {server.stats.peak_concurrency} requests at once")

        print("\nas they finish:")
        lengths = [40, 5, 20, 10, 30]  # longer answers take longer
        start = trio.current_time()
        async with client.chat_as_completed(
            {"prompt": f"Answer in about {n} words.", "max_tokens": n} for n in lengths
        ) as results:
            async for index, result in results:
                took = trio.current_time() - start
                text = result.value.text if result.value else f"(failed: {result.error!r})"
                print(f"  #{index} after {took:.2f} s: {text[:60]}")


if __name__ == "__main__":
    trio.run(main)
