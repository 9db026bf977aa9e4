"""Hello concurrency: one call, then three at once in the time of one.

The first lines of the seed guide, the Trio way: ``open_client`` owns its connections for
the length of the ``async with`` block, ``client.chat`` makes one call, and
``client.chat_many`` makes several concurrently and returns their results in order.

Runs offline with no arguments, against trio-llm's fake server; or against any
OpenAI-compatible API::

    python examples/hello.py
    OPENAI_API_KEY=sk-... python examples/hello.py --base-url https://api.openai.com/v1
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm

QUESTIONS = [
    "Tell me a joke about Python.",
    "Tell me a joke about Trio.",
    "Tell me a joke about structured concurrency.",
]


async def main(argv: list[str] | None = None) -> None:
    """Ask one question, then three at once, and print how long each took."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    args = parser.parse_args(argv)

    async with AsyncExitStack() as stack:
        base_url, api_key = args.base_url, None  # None: the key comes from $OPENAI_API_KEY
        if base_url is None:
            server = await stack.enter_async_context(open_fake_llm(FakeLLMConfig(latency=0.5)))
            base_url, api_key = server.base_url, "sk-fake"
            print(f"(no --base-url: offline, using a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(base_url=base_url, api_key=api_key, model=args.model)
        )

        start = trio.current_time()
        reply = await client.chat(QUESTIONS[0], max_tokens=40)
        print(f"one call: {reply.text}")
        print(f"  ({trio.current_time() - start:.2f} s, {reply.usage.total_tokens} tokens)")

        start = trio.current_time()
        results = await client.chat_many(QUESTIONS, max_tokens=40)
        elapsed = trio.current_time() - start
        for question, result in zip(QUESTIONS, results, strict=True):
            answer = result.value.text if result.value else f"(failed: {result.error!r})"
            print(f"{question} -> {answer}")
        print(f"three calls at once: {elapsed:.2f} s")


if __name__ == "__main__":
    trio.run(main)
