"""Survive a flaky server with a ``RetryPolicy``; report the item that fails for good.

The asyncio guides decorate each call with tenacity's ``@retry(stop=..., wait=...)``. In
trio-llm the policy is a setting of the client (or of one call): ``RetryPolicy(attempts,
wait_initial, wait_max, wait_jitter, deadline)``. Connection errors, timeouts, 408, 409,
429 and 5xx are retried with exponential backoff and jitter (or after the server's
``Retry-After``); other 4xx never are; the whole call, waits included, must end within
``deadline`` seconds (a trio cancel scope). Each retry is logged by ``trio_llm.retry``
and counted in ``client.statistics().retried``.

``chat_many`` captures each item's outcome, so the one malformed request (its message
content is a number: a 400) is reported from its ``Result`` instead of raised.

Runs offline with no arguments, against trio-llm's fake server answering 20% of requests
with a 500 and cutting 5% of replies off midway; or against any OpenAI-compatible API::

    python examples/retries.py
    OPENAI_API_KEY=sk-... python examples/retries.py --base-url https://api.openai.com/v1
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import AsyncExitStack

import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

POLICY = trio_llm.RetryPolicy(
    attempts=6,  # the first attempt and up to five retries
    wait_initial=0.05,  # then 0.1, 0.2, 0.4 ... seconds
    wait_max=1.0,
    wait_jitter=0.05,
    deadline=10.0,  # for the whole call, every attempt and wait included
)


async def main(argv: list[str] | None = None) -> None:
    """Send 30 requests and a malformed one through a flaky server; print the outcome."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible API (default: a fake server)")
    parser.add_argument("--model", default="gpt-4o-mini", help="the model to ask")
    args = parser.parse_args(argv)

    # trio_llm.retry logs each retry at INFO: which request, which attempt, why, how long
    # it waits. stamina also logs a bare "stamina.retry_scheduled" warning for each one
    # (details in the record's extra fields): keep just ours.
    logging.basicConfig(format="  %(name)s: %(message)s")
    logging.getLogger("trio_llm.retry").setLevel(logging.INFO)
    logging.getLogger("stamina").setLevel(logging.ERROR)

    async with AsyncExitStack() as stack:
        base_url, api_key = args.base_url, None  # None: the key comes from $OPENAI_API_KEY
        server: FakeLLMServer | None = None
        if base_url is None:
            fake = FakeLLMConfig(latency=0.05, error_rate=0.2, disconnect_rate=0.05, seed=3)
            server = await stack.enter_async_context(open_fake_llm(fake))
            base_url, api_key = server.base_url, "sk-fake"
            print(
                f"(no --base-url: offline, using a flaky fake server at {base_url})",
                file=sys.stderr,
            )
        client = await stack.enter_async_context(
            trio_llm.open_client(base_url=base_url, api_key=api_key, model=args.model, retry=POLICY)
        )

        items: list[trio_llm.ChatItem] = [f"Give me fact number {i}." for i in range(30)]
        items.append([{"role": "user", "content": 42}])  # malformed: content must be text
        results = await client.chat_many(items, max_tokens=20)

        answered = sum(r.ok for r in results)
        print(f"{answered} of {len(items)} answered")
        for index, result in enumerate(results):
            if not result.ok:
                # Not retried: a 400 means the request itself is wrong.
                print(
                    f"item {index} failed for good: {type(result.error).__name__}: {result.error}"
                )
        stats = client.statistics()
        print(
            f"HTTP attempts: {stats.sent}, retries: {stats.retried}, "
            f"succeeded: {stats.succeeded}, failed: {stats.failed}"
        )
        if server is not None:
            print(
                f"the server injected {server.stats.injected_errors} errors and cut off "
                f"{server.stats.injected_disconnects} replies midway"
            )


if __name__ == "__main__":
    trio.run(main)
