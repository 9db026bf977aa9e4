"""Stream a story to stdout as it is generated.

Run with no arguments to use trio-llm's fake server (offline, no key needed), or point it
at any OpenAI-compatible server::

    python examples/streaming.py
    OPENAI_API_KEY=sk-... python examples/streaming.py --base-url https://api.openai.com/v1 \\
        --model gpt-4o-mini
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm


async def main() -> None:
    """Parse the command line and stream one story."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    args = parser.parse_args()

    async with AsyncExitStack() as stack:
        base_url, model = args.base_url, args.model
        if base_url is None:
            # Paced like a real model, so the story visibly arrives token by token.
            server = await stack.enter_async_context(
                open_fake_llm(FakeLLMConfig(latency=0.3, tokens_per_second=80))
            )
            base_url, model = server.base_url, "fake-gpt"
            print(f"(no --base-url: streaming from a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(base_url=base_url, model=model)  # key from $OPENAI_API_KEY
        )
        async with client.stream(args.prompt, max_tokens=200) as stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
        print()
        usage = stream.response.usage
        print(
            f"({stream.response.finish_reason}; {usage.prompt_tokens} prompt + "
            f"{usage.completion_tokens} completion tokens)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    trio.run(main)
