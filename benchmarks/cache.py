"""Benchmark the response cache: what a hit costs, and what a miss adds to a request.

    python benchmarks/cache.py                  # 2,000 calls a run, 5 paired trials
    python benchmarks/cache.py --quick          # smoke run

The fake server (``trio_llm.testing``, no latency) runs in a child process pinned to CPU
0, the client in this process on the other CPUs. Each trial runs, in turns (the order
alternates between trials so that drift falls on all alike), against the same server:

- ``no cache``: a client without a cache, N chat calls: the baseline, a whole request;
- ``miss``: a client with ``cache=`` a fresh SQLite file, N calls that are all misses
  (looked up, sent, stored): its excess over the baseline is what a miss adds;
- ``hit``: the same client, the same N calls again: all answered from the file.

Each one-at-a-time (sequential: the latency of one call) and with 64 in flight
(``chat_many``: the cost per call under load). Printed: microseconds per call of wall
time and of this process's CPU, medians of the trials, and the ratios to the baseline.

A design check follows: a lookup through the cache's one worker thread (a queue, one
wake-up each way) against one ``trio.to_thread.run_sync`` per lookup (trio's thread
cache), sequential and 64 at once, on the same file.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from _fake_server_process import fake_server, pin_client

import trio_llm

MODEL = "fake-gpt"
INFLIGHT = 64


async def _timed(run: Callable[[], Awaitable[Any]], calls: int) -> tuple[float, float]:
    """Run ``run``; return (wall, CPU) microseconds per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    await run()
    return (
        (time.perf_counter() - wall) / calls * 1e6,
        (time.process_time() - cpu) / calls * 1e6,
    )


async def _calls(client: trio_llm.Client, prompts: list[str], inflight: int) -> None:
    if inflight == 1:
        for prompt in prompts:
            await client.chat(prompt, max_tokens=16, retry=None)
        return
    results = await client.chat_many(prompts, limit=inflight, max_tokens=16, retry=None)
    assert all(result.ok for result in results)


async def trial(
    base_url: str, directory: Path, trial: int, calls: int, inflight: int
) -> dict[str, tuple[float, float]]:
    """One paired trial: baseline, misses and hits; (wall, CPU) us per call of each."""
    prompts = [f"trial {trial} in-flight {inflight} question {n}" for n in range(calls)]
    path = directory / f"cache-{trial}-{inflight}.sqlite"
    results: dict[str, tuple[float, float]] = {}

    async def baseline() -> None:
        async with trio_llm.open_client(base_url=base_url, model=MODEL) as client:
            await _calls(client, prompts[:16], inflight)  # warm the connections
            results["no cache"] = await _timed(lambda: _calls(client, prompts, inflight), calls)

    async def cached() -> None:
        async with trio_llm.open_client(base_url=base_url, model=MODEL, cache=str(path)) as client:
            await _calls(client, [f"warm {n}" for n in range(16)], inflight)
            results["miss"] = await _timed(lambda: _calls(client, prompts, inflight), calls)
            results["hit"] = await _timed(lambda: _calls(client, prompts, inflight), calls)
            assert client.statistics().cache_hits == calls

    for run in (baseline, cached) if trial % 2 == 0 else (cached, baseline):
        await run()
    return results


async def design_check(directory: Path, lookups: int) -> dict[str, float]:
    """Lookup latency: the cache's worker thread against one to_thread call per lookup."""
    path = directory / "design.sqlite"
    key = "0" * 64
    results: dict[str, float] = {}
    async with trio_llm.open_sqlite_cache(path) as cache:
        await cache.set(key, b"x" * 1000)
        await cache.get(key)

        async def worker(n: int) -> None:
            for _ in range(n):
                await cache.get(key)

        connection = sqlite3.connect(path, check_same_thread=False)
        lock = trio.CapacityLimiter(1)  # one connection: one thread at a time

        def select() -> object:
            return connection.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()

        async def per_call(n: int) -> None:
            for _ in range(n):
                await trio.to_thread.run_sync(select, limiter=lock)

        for name, one in (("worker thread", worker), ("to_thread per lookup", per_call)):
            wall = time.perf_counter()
            await one(lookups)
            results[f"{name}, sequential"] = (time.perf_counter() - wall) / lookups * 1e6
            wall = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(INFLIGHT):
                    nursery.start_soon(one, lookups // INFLIGHT)
            results[f"{name}, {INFLIGHT} at once"] = (time.perf_counter() - wall) / lookups * 1e6
        connection.close()
    return results


def _row(name: str, values: list[tuple[float, float]], base: tuple[float, float]) -> str:
    wall = statistics.median(v[0] for v in values)
    cpu = statistics.median(v[1] for v in values)
    return (
        f"  {name:<10} {wall:9.1f} us {cpu:9.1f} us   "
        f"x{wall / base[0]:5.2f} wall  x{cpu / base[1]:5.2f} CPU"
    )


async def main(args: argparse.Namespace) -> None:
    pin_client()
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        async with fake_server() as server:
            for inflight in (1, INFLIGHT):
                runs = [
                    await trial(server.base_url, directory, t, args.calls, inflight)
                    for t in range(args.trials)
                ]
                base = (
                    statistics.median(r["no cache"][0] for r in runs),
                    statistics.median(r["no cache"][1] for r in runs),
                )
                shown = "one at a time" if inflight == 1 else f"{inflight} in flight"
                print(f"{args.calls:,} chat calls, {shown}, median of {args.trials} trials:")
                print(f"  {'':<10} {'wall/call':>12} {'CPU/call':>12}   ratio to no cache")
                for name in ("no cache", "miss", "hit"):
                    print(_row(name, [r[name] for r in runs], base))
                miss_wall = statistics.median(r["miss"][0] - r["no cache"][0] for r in runs)
                miss_cpu = statistics.median(r["miss"][1] - r["no cache"][1] for r in runs)
                print(f"  a miss adds {miss_wall:.1f} us of wall time, {miss_cpu:.1f} us of CPU\n")
        checks = [await design_check(directory, args.calls) for _ in range(args.trials)]
        print("design check, us per lookup (median):")
        for name in checks[0]:
            print(f"  {name:<36} {statistics.median(c[name] for c in checks):7.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per run")
    parser.add_argument("--trials", type=int, default=5, help="paired trials")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 calls, 1 trial")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.calls, arguments.trials = 200, 1
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(trio.run(main, arguments))
