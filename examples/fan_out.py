"""Ask ten questions at once and print the answers in order: "hello concurrency", the Trio way.

``client.chat_many`` sends the questions concurrently (never more than the client's
``max_concurrency`` at a time) and returns one ``Result`` per question, in input order; a
question that fails is reported in its ``Result`` instead of cancelling the others.
``trio_llm.map_concurrently`` runs any async function of yours the same way: here a
two-step chain (answer, then shorten the answer) per question.

Runs offline with no arguments, against trio-llm's fake server; or against any
OpenAI-compatible API::

    python examples/fan_out.py
    OPENAI_API_KEY=sk-... python examples/fan_out.py --base-url https://api.openai.com/v1
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm

QUESTIONS = [
    "What is a nursery in Trio?",
    "Why is structured concurrency useful?",
    "What does a CapacityLimiter do?",
    "What is a cancel scope?",
    "How does trio.move_on_after differ from trio.fail_after?",
    "What is a memory channel?",
    "Why should a library not spawn background tasks?",
    "What is a checkpoint in Trio?",
    "What does trio.lowlevel.checkpoint do?",
    "Why is an ExceptionGroup raised from a nursery?",
]


async def main(argv: list[str] | None = None) -> None:
    """Ask the questions concurrently and print question and answer pairs in order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    args = parser.parse_args(argv)

    async with AsyncExitStack() as stack:
        base_url, api_key = args.base_url, None  # None: the key comes from $OPENAI_API_KEY
        if base_url is None:
            fake = FakeLLMConfig(latency=0.3)
            server = await stack.enter_async_context(open_fake_llm(fake))
            base_url, api_key = server.base_url, "sk-fake"
            print(f"(no --base-url: offline, using a fake server at {base_url})", file=sys.stderr)
        client = await stack.enter_async_context(
            trio_llm.open_client(base_url=base_url, api_key=api_key, model=args.model)
        )

        start = trio.current_time()
        results = await client.chat_many(QUESTIONS, max_tokens=60)
        elapsed = trio.current_time() - start
        for question, result in zip(QUESTIONS, results, strict=True):
            answer = result.value.text if result.value else f"(failed: {result.error!r})"
            print(f"Q: {question}\nA: {answer}\n")
        print(f"{len(QUESTIONS)} answers in {elapsed:.2f} s, all requests in flight at once")

        # Any coroutine function fans out the same way; results come back in input order.
        async def short_answer(question: str) -> str:
            answer = await client.chat(question, max_tokens=60)
            shorter = await client.chat(
                [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer.text},
                    {"role": "user", "content": "Now say it in five words."},
                ],
                max_tokens=10,
            )
            return shorter.text

        # Fail-fast: an error cancels the rest and propagates as an ExceptionGroup. Wrap the
        # function in trio_llm.capture_errors() to get one Result per item instead.
        short = await trio_llm.map_concurrently(short_answer, QUESTIONS[:3], limit=3)
        print()
        for question, answer in zip(QUESTIONS, short, strict=False):
            print(f"{question} -> {answer}")


if __name__ == "__main__":
    trio.run(main)
