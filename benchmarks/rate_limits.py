"""Benchmark rate limits and the sliding window: does a job run at the limit, and no faster?

    .venv/bin/python benchmarks/rate_limits.py              # full run (~20 minutes)
    .venv/bin/python benchmarks/rate_limits.py --quick      # smoke run (~1.5 minutes)
    .venv/bin/python benchmarks/rate_limits.py --section latency

Two sections, each against a fresh fake server (``trio_llm.testing``) in a child process,
in real time:

**rate**: a server limited to ``--rpm`` requests and ``--tpm`` tokens per minute (buckets
that start full and refill continuously, as OpenAI's do), 0.2 s latency, and a job sized
to last ``--duration`` seconds at the limit after the free initial bucket. For each client:

- ``throughput/limit``: answered work beyond the initial bucket over what the limit
  allows in the time taken, ``(W - capacity) / (rate * (elapsed - latency))``, for the
  binding limit (goal >= 0.95);
- ``429 share``: 429 responses over all responses the server sent (goal <= 1%);
- ``failed``: items that ended in an error; ``retries``: attempts after an item's first.

Each row is the median trial (by throughput/limit) of ``--rate-trials``, with the range.

The clients: trio-llm ``chat_many`` with the matching ``RateLimit``; trio-llm with the
default adaptive limiter (no ``RateLimit`` given, it learns the limits from the
``x-ratelimit-*`` headers); and two baselines written the way users write them by hand:
a trio nursery with a ``CapacityLimiter`` around plain ``httpx2`` calls that sleep for
``Retry-After`` and try again after a 429 (up to 20 attempts per item), and the
official ``openai.AsyncOpenAI`` client (default ``max_retries=2``, which honours
``retry-after-ms``) under the same limiter. All use the same concurrency.

**latency**: N requests, concurrency C. With a fixed server latency L the ideal wall time
is ``ceil(N / C) * L``; with per-request jitter (the fake server's ``tokens_per_second``
and varied ``max_tokens``) the ideal is ``max(sum(d_i) / C, max(d_i))`` for request
durations ``d_i`` (a lower bound for any schedule; it equals the former without jitter).
Efficiency = ideal / measured (goal >= 0.95), for ``chat_many`` (a sliding window) and
for fixed-size batches as the classic asyncio guides write them (``for batch in
chunks(items, C): await gather(*batch)``, here one nursery per batch), through the same
client. Each figure is the median of ``--trials`` runs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import attrs
import httpx2
import openai
import trio
from _fake_server_process import fake_server, pin_client

import trio_llm

MODEL = "fake-gpt"
RATE_LATENCY = 0.2


# --- rate limits -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RateSetup:
    """One rate-limit scenario's parameters."""

    rpm: int
    tpm: int
    concurrency: int
    max_tokens: int
    prompts: tuple[str, ...]


#: A client's job: takes the base URL, returns (failed items, retries made or None).
RateJob = Callable[[str], Awaitable[tuple[int, int | None]]]


@attrs.frozen(kw_only=True)
class RateRow:
    """One client's outcome in the rate-limit section."""

    client: str
    elapsed: float
    answered: int
    failed: int
    retried: int | None
    responses: int
    refused: int
    tokens: int
    requests_ratio: float
    tokens_ratio: float

    def ratio(self, binding: str) -> float:
        """Throughput over the ``binding`` limit (``"tokens"`` or ``"requests"``)."""
        return self.tokens_ratio if binding == "tokens" else self.requests_ratio

    @property
    def refused_share(self) -> float:
        """429 responses over all responses."""
        return self.refused / self.responses if self.responses else 0.0


def prompt(i: int) -> str:
    """The i-th question of a job."""
    return f"Question {i}: in one sentence, why would request number {i} wait its turn?"


async def rate_trio_llm(
    base_url: str, setup: RateSetup, rate_limit: trio_llm.RateLimit
) -> tuple[int, int]:
    """trio-llm ``chat_many``; return the failed items and the retries.

    ``RateLimit()`` is ``open_client``'s default: no limit of its own, the server's learned.
    """
    async with trio_llm.open_client(
        base_url=base_url, model=MODEL, max_concurrency=setup.concurrency, rate_limit=rate_limit
    ) as client:
        results = await client.chat_many(setup.prompts, max_tokens=setup.max_tokens)
    return sum(not r.ok for r in results), client.statistics().retried


async def rate_httpx2(base_url: str, setup: RateSetup) -> tuple[int, int]:
    """Hand-written: nursery + CapacityLimiter + httpx2, sleeping Retry-After on a 429."""
    failed = retried = 0
    limiter = trio.CapacityLimiter(setup.concurrency)
    limits = httpx2.Limits(max_connections=setup.concurrency)
    async with httpx2.AsyncClient(base_url=base_url, limits=limits, timeout=60) as http:

        async def one(text: str) -> None:
            nonlocal failed, retried
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": setup.max_tokens,
            }
            async with limiter:
                for _attempt in range(20):
                    response = await http.post("/chat/completions", json=body)
                    if response.status_code != 429:
                        break
                    retried += 1
                    await trio.sleep(float(response.headers.get("retry-after", "1")))
                if response.status_code != 200:
                    failed += 1
                else:
                    response.json()

        async with trio.open_nursery() as nursery:
            for text in setup.prompts:
                nursery.start_soon(one, text)
    return failed, retried


async def rate_openai(base_url: str, setup: RateSetup) -> tuple[int, int | None]:
    """The official AsyncOpenAI client, default retries, under a CapacityLimiter."""
    failed = 0
    limiter = trio.CapacityLimiter(setup.concurrency)
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="sk-fake")
    try:

        async def one(text: str) -> None:
            nonlocal failed
            async with limiter:
                try:
                    await sdk.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": text}],
                        max_tokens=setup.max_tokens,
                    )
                except openai.APIError:
                    failed += 1

        async with trio.open_nursery() as nursery:
            for text in setup.prompts:
                nursery.start_soon(one, text)
    finally:
        with trio.CancelScope(shield=True):
            await sdk.close()
    return failed, None  # its retries are internal


async def calibrate(max_tokens: int, count: int = 256) -> float:
    """Return the mean tokens (prompt + completion) of a job's requests on the fake server."""
    async with (
        fake_server() as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL) as client,
    ):
        results = await client.chat_many([prompt(i) for i in range(count)], max_tokens=max_tokens)
    return statistics.fmean(r.unwrap().usage.total_tokens for r in results)


async def run_rate_client(name: str, job: RateJob, setup: RateSetup) -> RateRow:
    """Run one client's job against a fresh rate-limited server."""
    async with fake_server(
        latency=RATE_LATENCY, requests_per_minute=setup.rpm, tokens_per_minute=setup.tpm
    ) as server:
        start = trio.current_time()
        failed, retried = await job(server.base_url)
        elapsed = trio.current_time() - start
        stats = await server.stats()
    by_status: dict[int, int] = stats["requests_by_status"]
    answered = by_status.get(200, 0)
    tokens = stats["prompt_tokens"] + stats["completion_tokens"]
    # The last admitted request still took ``latency`` to answer: not the limit's time.
    busy = max(elapsed - RATE_LATENCY, 1e-9)
    return RateRow(
        client=name,
        elapsed=elapsed,
        answered=answered,
        failed=failed,
        retried=retried,
        responses=sum(by_status.values()),
        refused=by_status.get(429, 0),
        tokens=tokens,
        requests_ratio=(answered - setup.rpm) / (setup.rpm / 60 * busy),
        tokens_ratio=(tokens - setup.tpm) / (setup.tpm / 60 * busy),
    )


async def rate_section(args: argparse.Namespace) -> None:
    """Run every client against the same rate-limited job; print the table."""
    mean_tokens = await calibrate(args.max_tokens)
    # Sized so that at the binding limit the job lasts ``duration`` after the first bucket.
    by_tokens = args.tpm * (1 + args.duration / 60) / mean_tokens
    by_requests = args.rpm * (1 + args.duration / 60)
    count = math.ceil(min(by_tokens, by_requests))
    binding = "tokens" if by_tokens < by_requests else "requests"
    setup = RateSetup(
        rpm=args.rpm,
        tpm=args.tpm,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        prompts=tuple(prompt(i) for i in range(count)),
    )
    print(
        f"\n## Rate limits: {count} requests (~{mean_tokens:.1f} tokens each), server limits "
        f"{args.rpm} requests/min and {args.tpm} tokens/min ({binding} bind), "
        f"latency {RATE_LATENCY} s, concurrency {args.concurrency}; "
        f"~{args.duration:g} s at the limit after the initial bucket\n",
        flush=True,
    )
    matching = trio_llm.RateLimit(requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
    clients: list[tuple[str, RateJob]] = [
        ("trio-llm chat_many, matching RateLimit", lambda u: rate_trio_llm(u, setup, matching)),
        (
            "trio-llm chat_many, adaptive default",
            lambda u: rate_trio_llm(u, setup, trio_llm.RateLimit()),
        ),
        ("httpx2 + CapacityLimiter, sleep Retry-After", lambda u: rate_httpx2(u, setup)),
        ("openai AsyncOpenAI (max_retries=2) + limiter", lambda u: rate_openai(u, setup)),
    ]
    chosen = [(name, job) for name, job in clients if not args.only or args.only in name]
    runs: dict[str, list[RateRow]] = {name: [] for name, _ in chosen}
    # Trials interleaved (every client once, then again), so a change in the machine's
    # load hits all clients alike.
    for trial in range(args.rate_trials):
        for name, job in chosen:
            row = await run_rate_client(name, job, setup)
            runs[name].append(row)
            print(
                f"  trial {trial + 1}: {name}: {row.elapsed:.1f} s, {row.ratio(binding):.3f}",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for name, _ in chosen:
        # The median trial by throughput, so that each row's figures belong together.
        trials = sorted(runs[name], key=lambda row: row.ratio(binding))
        row = trials[(len(trials) - 1) // 2]
        spread = f" ({trials[0].ratio(binding):.3f}-{trials[-1].ratio(binding):.3f})"
        rows.append(
            [
                row.client,
                f"{row.elapsed:.1f}",
                f"{row.answered}/{count}",
                str(row.failed),
                "n/a" if row.retried is None else str(row.retried),
                f"{row.ratio(binding):.3f}" + (spread if len(trials) > 1 else ""),
                str(row.refused),
                f"{row.refused_share:.1%}",
            ]
        )
    print(f"median of {args.rate_trials} trial(s); range in brackets\n")
    print_table(
        [
            "client",
            "wall s",
            "answered",
            "failed",
            "retries",
            f"throughput/limit ({binding})",
            "429s",
            "429 share",
        ],
        rows,
    )


# --- latency-bound efficiency ------------------------------------------------------------


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Split ``items`` into consecutive slices of ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def sliding_window(client: trio_llm.Client, items: Sequence[dict[str, Any]]) -> list[int]:
    """``chat_many``: a fixed set of workers, each taking the next item when free."""
    results = await client.chat_many(items)
    return [r.unwrap().usage.completion_tokens for r in results]


async def fixed_batches(client: trio_llm.Client, items: Sequence[dict[str, Any]]) -> list[int]:
    """The classic guide's batches: start C requests, wait for all of them, repeat."""
    completion: list[int] = [0] * len(items)

    async def one(index: int, item: dict[str, Any]) -> None:
        reply = await client.chat(item["prompt"], max_tokens=item["max_tokens"])
        completion[index] = reply.usage.completion_tokens

    offset = 0
    for batch in chunks(items, client.max_concurrency):
        async with trio.open_nursery() as nursery:
            for index, item in enumerate(batch, offset):
                nursery.start_soon(one, index, item)
        offset += len(batch)
    return completion


@attrs.frozen(kw_only=True)
class LatencyCase:
    """One latency scenario: the server's timing and the job."""

    name: str
    latency: float
    tokens_per_second: float | None
    items: tuple[dict[str, Any], ...]
    concurrency: int

    def duration(self, completion_tokens: int) -> float:
        """How long the server takes to answer a request with this many completion tokens."""
        pace = completion_tokens / self.tokens_per_second if self.tokens_per_second else 0.0
        return self.latency + pace

    def ideal(self, completion: Sequence[int]) -> float:
        """The shortest possible wall time at this concurrency."""
        durations = [self.duration(tokens) for tokens in completion]
        return max(sum(durations) / self.concurrency, max(durations))


async def run_latency_case(
    case: LatencyCase,
    strategy: Callable[[trio_llm.Client, Sequence[dict[str, Any]]], Awaitable[list[int]]],
) -> tuple[float, float, float]:
    """Run ``case`` with ``strategy``; return (measured, ideal, client CPU s)."""
    async with (
        fake_server(latency=case.latency, tokens_per_second=case.tokens_per_second) as server,
        trio_llm.open_client(
            base_url=server.base_url, model=MODEL, max_concurrency=case.concurrency
        ) as client,
    ):
        await client.chat_many(["warm up"] * case.concurrency, max_tokens=1)  # open the pool
        cpu = time.process_time()
        start = trio.current_time()
        completion = await strategy(client, case.items)
        elapsed = trio.current_time() - start
        cpu = time.process_time() - cpu
    return elapsed, case.ideal(completion), cpu


async def latency_section(args: argparse.Namespace) -> None:
    """Compare the sliding window with fixed batches, without and with jitter."""
    n, c, latency = args.requests, args.latency_concurrency, args.latency
    rng = random.Random(0)
    jittered = tuple(
        {"prompt": f"Item {i}: summarise it.", "max_tokens": rng.randint(8, 40)} for i in range(n)
    )
    fixed = tuple({"prompt": f"Item {i}: summarise it.", "max_tokens": 16} for i in range(n))
    pace = 40 / latency  # the longest reply (40 tokens) takes one more ``latency``
    cases = [
        LatencyCase(
            name=f"fixed: {latency:g} s",
            latency=latency,
            tokens_per_second=None,
            items=fixed,
            concurrency=c,
        ),
        LatencyCase(
            name=f"jitter: {latency / 2:g} s + 8..40 tokens at {pace:g} tok/s",
            latency=latency / 2,
            tokens_per_second=pace,
            items=jittered,
            concurrency=c,
        ),
    ]
    strategies = [("chat_many (sliding window)", sliding_window), ("fixed batches", fixed_batches)]
    print(
        f"\n## Latency-bound efficiency: N={n} requests, concurrency C={c}; "
        f"median of {args.trials} trials\n",
        flush=True,
    )
    rows = []
    for case in cases:
        for label, strategy in strategies:
            runs = [await run_latency_case(case, strategy) for _ in range(args.trials)]
            rows.append(
                [
                    case.name,
                    label,
                    f"{statistics.median(run[1] for run in runs):.2f}",
                    f"{statistics.median(run[0] for run in runs):.2f}",
                    f"{statistics.median(run[1] / run[0] for run in runs):.3f}",
                    f"{statistics.median(run[2] for run in runs) / n * 1e6:.0f}",
                ]
            )
            print(f"  done: {case.name} / {label}", file=sys.stderr, flush=True)
    print_table(
        ["server timing", "strategy", "ideal s", "measured s", "efficiency", "client CPU us/req"],
        rows,
    )


# --- output and entry point -------------------------------------------------------------


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print a Markdown table."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()


async def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen sections."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=["all", "rate", "latency"], default="all")
    parser.add_argument(
        "--quick", action="store_true", help="a ~10 s rate job and smaller latency jobs"
    )
    parser.add_argument(
        "--duration", type=float, default=65.0, help="seconds the rate job lasts at the limit"
    )
    parser.add_argument("--rpm", type=int, default=1500, help="server requests per minute")
    parser.add_argument("--tpm", type=int, default=60_000, help="server tokens per minute")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens of rate requests")
    parser.add_argument("--concurrency", type=int, default=64, help="rate section concurrency")
    parser.add_argument("--only", help="run only the rate clients whose name contains this")
    parser.add_argument("--rate-trials", type=int, default=3, help="rate section trials")
    parser.add_argument("--requests", type=int, default=1000, help="latency section N")
    parser.add_argument("--latency-concurrency", type=int, default=50, help="latency section C")
    parser.add_argument("--latency", type=float, default=0.5, help="latency section L, seconds")
    parser.add_argument("--trials", type=int, default=3, help="latency section trials")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 10.0
        args.requests = 500
        args.trials = args.rate_trials = 1
    pin_client()
    # stamina logs a bare "stamina.retry_scheduled" warning per retry; Python's last-resort
    # handler would print each one. The 429 counts in the table say the same.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    print(
        f"# trio-llm {trio_llm.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, {sys.platform}; server in a child process on CPU 0"
    )
    if args.section in ("all", "rate"):
        await rate_section(args)
    if args.section in ("all", "latency"):
        await latency_section(args)


if __name__ == "__main__":
    trio.run(main)
