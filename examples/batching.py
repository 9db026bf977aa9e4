"""Fixed-size batches next to a sliding window: the same requests, two wall times.

The classic asyncio guides batch like this: start ``size`` requests, wait for all of them,
start the next ``size``. Each batch lasts as long as its slowest request, while the slots
of the fast ones sit idle. ``client.chat_many`` keeps a sliding window instead: a fixed
set of workers, each taking the next request the moment its own finishes, so ``size``
requests are in flight all the time.

Runs offline with no arguments, against trio-llm's fake server with replies of varied
length (so requests differ in duration, as real ones do); or against any
OpenAI-compatible API (this sends ``2 * --count`` requests)::

    python examples/batching.py
    OPENAI_API_KEY=sk-... python examples/batching.py --base-url https://api.openai.com/v1
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Yield consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def in_fixed_batches(client: trio_llm.Client, requests: Sequence[dict[str, Any]]) -> None:
    """The guide's way: one nursery per batch (its ``gather``), each waiting for its slowest."""
    for batch in chunks(requests, client.max_concurrency):
        async with trio.open_nursery() as nursery:
            for request in batch:
                nursery.start_soon(
                    partial(client.chat, request["prompt"], max_tokens=request["max_tokens"])
                )


async def main(argv: list[str] | None = None) -> None:
    """Run the same requests both ways and print the two wall times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    parser.add_argument("--count", type=int, default=40, help="requests per run")
    parser.add_argument("--size", type=int, default=8, help="batch size = concurrency")
    args = parser.parse_args(argv)

    async with AsyncExitStack() as stack:
        base_url, api_key = args.base_url, None  # None: the key comes from $OPENAI_API_KEY
        if base_url is None:
            # 0.02 s to the first token, then 100 tokens/s: replies take 0.1 to 0.42 s.
            fake = FakeLLMConfig(latency=0.02, tokens_per_second=100)
            server = await stack.enter_async_context(open_fake_llm(fake))
            base_url, api_key = server.base_url, "sk-fake"
            print(f"(no --base-url: offline, using a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(
                base_url=base_url, api_key=api_key, model=args.model, max_concurrency=args.size
            )
        )
        # Most answers short, one in four long: requests take different times, as in real
        # traffic.
        rng = random.Random(1)
        requests = [
            {"prompt": f"Describe item {i}.", "max_tokens": 40 if rng.random() < 0.25 else 8}
            for i in range(args.count)
        ]

        start = trio.current_time()
        await in_fixed_batches(client, requests)
        batched = trio.current_time() - start

        start = trio.current_time()
        results = await client.chat_many(requests)
        sliding = trio.current_time() - start
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]

    print(f"fixed batches of {args.size}:          {batched:5.2f} s")
    print(f"sliding window (chat_many): {sliding:5.2f} s  ({batched / sliding:.1f}x faster)")
    print(
        "A batch waits for its slowest request before the next one starts, leaving slots "
        "idle; chat_many starts a request as soon as any slot frees up."
    )


if __name__ == "__main__":
    trio.run(main)
