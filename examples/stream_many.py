"""Stream three stories at once; each line of output is prefixed by its story's number.

Run with no arguments to use trio-llm's fake server (offline, no key needed), or point it
at any OpenAI-compatible server::

    python examples/stream_many.py
    OPENAI_API_KEY=sk-... python examples/stream_many.py --base-url https://api.openai.com/v1 \\
        --model gpt-4o-mini
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm

PROMPTS = [
    "Write a short story about a dragon who collects teacups.",
    "Write a short story about a robot learning to garden.",
    "Write a short story about a lost umbrella finding its way home.",
]


async def main() -> None:
    """Parse the command line and stream the stories side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    args = parser.parse_args()

    async with AsyncExitStack() as stack:
        base_url, model = args.base_url, args.model
        if base_url is None:
            server = await stack.enter_async_context(
                open_fake_llm(FakeLLMConfig(latency=0.2, tokens_per_second=60))
            )
            base_url, model = server.base_url, "fake-gpt"
            print(f"(no --base-url: streaming from a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(base_url=base_url, model=model)  # key from $OPENAI_API_KEY
        )
        # Text is printed a line at a time, so the three stories interleave readably.
        pending = [""] * len(PROMPTS)
        async with client.stream_many(PROMPTS, max_tokens=120) as streams:
            async for index, item in streams:
                if not isinstance(item, trio_llm.ChatChunk):  # the stream's final Result
                    if pending[index]:
                        print(f"[{index}] {pending[index]}", flush=True)
                    outcome = item.value.finish_reason if item.value else f"failed: {item.error}"
                    print(f"[{index}] ({outcome})", flush=True)
                    continue
                *lines, pending[index] = (pending[index] + item.text).split("\n")
                for line in lines:
                    print(f"[{index}] {line}", flush=True)
                # No newlines from the model: break long lines at a word instead.
                while len(pending[index]) > 72:
                    cut = pending[index].rfind(" ", 0, 72) + 1 or 72
                    print(f"[{index}] {pending[index][:cut].rstrip()}", flush=True)
                    pending[index] = pending[index][cut:]


if __name__ == "__main__":
    trio.run(main)
