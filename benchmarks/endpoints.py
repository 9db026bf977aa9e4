"""Benchmark several endpoints: throughput against capacity, and what routing costs.

    python benchmarks/endpoints.py              # all three parts, 3 trials each
    python benchmarks/endpoints.py --quick      # smoke run

The fake servers (``trio_llm.testing``) run in child processes pinned to CPU 0, the
client in this process on the other CPUs. In one run:

1. **Throughput against capacity.** Three servers of different speeds (latency 100, 200
   and 400 ms), each with a capacity of its own, and one client over the three
   (``open_client(endpoints=[...])``, equal weights, C=96 in flight, ``chat_many`` over
   an endless stream of prompts, stopped after ``--seconds``):

   - *concurrency-bound*, as replicas that serve a fixed batch: each endpoint's
     ``max_concurrency`` is 16, so its capacity is 16 / latency (160, 80 and 40 req/s,
     280 in all; the client must keep every replica full, the slow one included). Also
     measured in the same run: each server alone, through a one-endpoint client with
     ``max_concurrency=16``; the sum of those rates is what this machine can do;
   - *rate-bound*, as hosted keys: each server refuses with 429 beyond its own
     requests per minute (300, 600 and 900 rpm, buckets starting full), which the
     client learns from each server's headers; the capacity of a run is each bucket
     plus its refill over the run.

   Printed: requests per second against the sum of the capacities, each endpoint's
   share, and the 429s the servers sent.
2. **CPU per request** of the client process (``time.process_time()``), no latency,
   C=64: one endpoint (``base_url=``) against three endpoints (three names for the
   same server, so that only the client differs: three pools, three limiters, the
   router), interleaved trials, medians; the difference is what routing costs per
   request (the budget is 10 us).
3. **The routing decision alone**: ``Router.choose`` for a request, timed in a loop,
   with one endpoint and with three.
4. **Failing endpoints**: a healthy server (50 ms), an always-503 one and a closed port,
   equal weights, C=32, for ``--seconds``: the attempts each took, and the calls that
   failed (none should).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
from _fake_server_process import ServerHandle, fake_server, pin_client

import trio_llm
from trio_llm import Endpoint, RetryPolicy

MODEL = "fake-gpt"
LATENCIES = (0.1, 0.2, 0.4)
SLOTS = 16
RPMS = (300, 600, 900)


@asynccontextmanager
async def servers(*configs: dict[str, Any]) -> AsyncIterator[list[ServerHandle]]:
    """Start one fake server process per config."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(fake_server(**config)) for config in configs]


def prompts(n: int) -> list[str]:
    return [f"Question {i}: say something short." for i in range(n)]


def endless() -> Iterator[str]:
    i = 0
    while True:
        yield f"Question {i}: say something short."
        i += 1


async def throughput(
    endpoints: Sequence[Endpoint], handles: Sequence[ServerHandle], seconds: float, limit: int
) -> tuple[int, float, list[int], int]:
    """Send as fast as the client allows for ``seconds``; return (done, elapsed, shares, 429s)."""
    retry = RetryPolicy(attempts=6, deadline=60)
    async with trio_llm.open_client(
        endpoints=endpoints, model=MODEL, max_concurrency=limit, retry=retry
    ) as client:
        start = trio.current_time()
        with trio.move_on_after(seconds):
            await client.chat_many(endless(), limit=limit)
        elapsed = trio.current_time() - start
        stats = client.statistics()
        done = stats.succeeded
        shares = [endpoint.succeeded for endpoint in stats.endpoints]
    refused = 0
    for handle in handles:
        refused += (await handle.stats())["requests_by_status"].get(429, 0)
    return done, elapsed, shares, refused


async def part_capacity(args: argparse.Namespace) -> None:
    print("## 1. Throughput against the sum of the capacities\n", flush=True)
    seconds = args.seconds
    rows = []
    for bound in ("concurrency", "rate"):
        configs = [
            {"latency": latency}
            if bound == "concurrency"
            else {"latency": latency, "requests_per_minute": rpm}
            for latency, rpm in zip(LATENCIES, RPMS, strict=True)
        ]
        if bound == "concurrency":
            capacity = sum(SLOTS / latency for latency in LATENCIES) * seconds
        else:  # each bucket starts full, then refills at rpm / 60
            capacity = sum(rpm + rpm / 60 * seconds for rpm in RPMS)
        ratios = []
        alone: list[float] = []
        for _ in range(args.trials):
            async with servers(*configs) as handles:
                if bound == "concurrency":
                    sum_alone = 0.0
                    for handle in handles:
                        lone = [Endpoint(handle.base_url, max_concurrency=SLOTS)]
                        done, elapsed, _, _ = await throughput(lone, [handle], seconds, SLOTS)
                        sum_alone += done / elapsed
                    alone.append(sum_alone)
                endpoints = [
                    Endpoint(
                        handle.base_url,
                        name=f"{int(latency * 1000)}ms",
                        max_concurrency=SLOTS if bound == "concurrency" else None,
                    )
                    for handle, latency in zip(handles, LATENCIES, strict=True)
                ]
                done, elapsed, shares, refused = await throughput(
                    endpoints, handles, seconds, limit=96
                )
            expected = capacity * elapsed / seconds if bound == "concurrency" else capacity
            ratios.append(done / expected)
            print(
                f"  {bound}-bound: {done} in {elapsed:.1f} s = {done / elapsed:.0f} req/s; "
                f"capacity {expected / elapsed:.0f} req/s; shares "
                f"{'/'.join(str(share) for share in shares)}; 429s {refused}",
                file=sys.stderr,
                flush=True,
            )
            last = (done / elapsed, expected / elapsed, shares, refused)
        rate, capacity_rate, shares, refused = last
        total = sum(shares) or 1
        rows.append(
            [
                bound,
                f"{capacity_rate:.0f}",
                f"{statistics.median(alone):.0f}" if alone else "-",
                f"{rate:.0f}",
                f"{statistics.median(ratios):.3f}",
                f"{rate / statistics.median(alone):.3f}" if alone else "-",
                " / ".join(f"{share / total:.0%}" for share in shares),
                str(refused),
            ]
        )
    print_table(
        [
            "capacity",
            "capacity req/s",
            "each alone, summed",
            "req/s",
            "/ capacity",
            "/ each alone",
            "shares",
            "429s",
        ],
        rows,
    )


async def cpu_run(url: str, count: int, n: int, limit: int) -> float:
    """Client CPU seconds per request for ``n`` requests to ``count`` endpoints at ``url``."""
    options: dict[str, Any] = (
        {"base_url": url}
        if count == 1
        else {"endpoints": [Endpoint(url, name=str(i)) for i in range(count)]}
    )
    async with trio_llm.open_client(
        **options, model=MODEL, max_concurrency=limit, retry=None
    ) as client:
        await client.chat_many(prompts(limit), limit=limit)  # connections open
        cpu = time.process_time()
        results = await client.chat_many(prompts(n), limit=limit)
        used = time.process_time() - cpu
    assert all(result.ok for result in results)
    return used / n


async def part_cpu(args: argparse.Namespace) -> None:
    print("\n## 2. Client CPU per request: one endpoint against three\n", flush=True)
    n, limit = args.requests, 64
    one: list[float] = []
    three: list[float] = []
    async with servers({}) as (handle,):
        for trial in range(args.trials):
            order = [(one, 1), (three, 3)]
            for bucket, count in order if trial % 2 == 0 else order[::-1]:
                bucket.append(await cpu_run(handle.base_url, count, n, limit))
                print(
                    f"  {count} endpoint(s): {bucket[-1] * 1e6:.1f} us/request",
                    file=sys.stderr,
                    flush=True,
                )
    a, b = statistics.median(one) * 1e6, statistics.median(three) * 1e6
    print_table(
        ["client", "CPU us/request (median)", "ratio"],
        [
            ["1 endpoint (base_url=)", f"{a:.1f}", "1.00"],
            ["3 endpoints", f"{b:.1f}", f"{b / a:.3f}"],
        ],
    )
    print(f"\nrouting over three endpoints: {b - a:+.1f} us per request\n", flush=True)


def part_choice(args: argparse.Namespace) -> None:
    print(
        "## 3. The routing decision alone (Router.choose, retarget included; CPU time)\n",
        flush=True,
    )
    from trio_llm._routing import CHAT

    async def measure(count: int) -> float:
        endpoints = [Endpoint(f"http://127.0.0.1:{9 + i}/v1") for i in range(count)]
        async with trio_llm.open_client(endpoints=endpoints, model=MODEL) as client:
            requester = client._requester
            router = requester.router
            request = requester.request(CHAT, "hi", MODEL, {})
            loops = args.loops
            start = time.process_time()
            for _ in range(loops):
                route = router.choose(request)
                route.load -= 1  # (as the attempt's end would)
            return (time.process_time() - start) / loops

    rows = []
    for count in (1, 3, 8):
        seconds = statistics.median(trio.run(measure, count) for _ in range(args.trials))
        rows.append([str(count), f"{seconds * 1e6:.2f}"])
    print_table(["endpoints", "us per choice (median)"], rows)


async def part_failing(args: argparse.Namespace) -> None:
    print("\n## 4. A dead endpoint and an always-503 one beside a healthy one\n", flush=True)
    configs = ({"latency": 0.05}, {"error_rate": 1.0, "error_status": 503})
    async with servers(*configs) as (good, broken):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        endpoints = [
            Endpoint(good.base_url, name="healthy"),
            Endpoint(broken.base_url, name="503"),
            Endpoint(dead, name="closed port"),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model=MODEL) as client:
            with trio.move_on_after(args.seconds):
                await client.chat_many(endless(), limit=32)
            stats = client.statistics()
    sent = sum(endpoint.sent for endpoint in stats.endpoints)
    rows = [
        [e.name, str(e.sent), f"{e.sent / sent:.1%}", str(e.succeeded), e.state]
        for e in stats.endpoints
    ]
    print_table(["endpoint", "attempts", "share", "answered", "state"], rows)
    print(f"\n{stats.succeeded} calls answered, {stats.failed} failed", flush=True)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print a Markdown table."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="part 1: seconds per run")
    parser.add_argument("--requests", type=int, default=5000, help="part 2: requests per run")
    parser.add_argument("--loops", type=int, default=200_000, help="part 3: choices timed")
    parser.add_argument("--quick", action="store_true", help="a smoke run (1 trial, short)")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.seconds, args.requests, args.loops = 1, 2.0, 500, 10_000
    pin_client()
    print(
        f"# trio-llm {trio_llm.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; servers in child "
        f"processes on CPU 0\n",
        flush=True,
    )
    parts = args.parts.split(",")
    if "1" in parts:
        trio.run(part_capacity, args)
    if "2" in parts:
        trio.run(part_cpu, args)
    if "3" in parts:
        part_choice(args)
    if "4" in parts:
        trio.run(part_failing, args)


if __name__ == "__main__":
    main()
