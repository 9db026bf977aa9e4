"""Benchmark the shared rate limit: its Redis round trip, and what it costs a process.

    python benchmarks/redis_limits.py              # ~1 minute
    python benchmarks/redis_limits.py --quick      # a smoke run

Needs ``redis-server`` on PATH (started here, on a free loopback port, in a temporary
directory) and the ``redis`` extra. Two sections, each a median of ``--trials`` paired
runs (local and shared in turns, so that drift in the machine's speed falls on both):

**round trip**: microseconds per call, one call at a time, of ``PING`` through coredis
(the floor: one round trip through the client library), of the shared limiter's
``acquire`` + ``reconcile`` (one Lua script per request; the settlement goes out batched,
in the background), and of the local limiter's (the baseline).

**throughput**: one process sending ``--requests`` chat requests (``chat_many``, 64 at
once) to the fake server in a child process (no latency; pinned to CPU 0, the client to
the others), with limits too high to bind: requests per second and client CPU
microseconds per request with the local limiter and with the shared one, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from _fake_server_process import fake_server, pin_client

import trio_llm
from trio_llm._ratelimit import RateLimiter
from trio_llm._ratelimit_redis import open_rate_limiter
from trio_llm._redis import open_redis
from trio_llm.testing._redis_server import RedisServer

HIGH = trio_llm.RateLimit(requests_per_minute=1e9, tokens_per_minute=1e12)


async def per_call(call: Callable[[], Awaitable[object]], count: int) -> float:
    """Microseconds per ``call()``, ``count`` of them one after another."""
    for _ in range(50):  # warm up: connections, script loaded
        await call()
    started = time.perf_counter()
    for _ in range(count):
        await call()
    return (time.perf_counter() - started) / count * 1e6


async def limiter_call(rate: RateLimiter) -> None:
    (await rate.acquire(100)).reconcile(80)


async def round_trips(url: str, count: int, trials: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"ping": [], "shared": [], "local": []}
    shared_limit = trio_llm.RateLimit(
        requests_per_minute=1e9, tokens_per_minute=1e12, shared=url, name="bench"
    )
    async with (
        open_redis(url) as redis,
        open_rate_limiter(shared_limit, base_url="http://b/v1", api_key=None) as shared,
    ):
        assert shared is not None
        local = RateLimiter(HIGH)
        client = redis._client
        for _ in range(trials):
            results["ping"].append(await per_call(client.ping, count))
            results["shared"].append(await per_call(lambda: limiter_call(shared), count))
            results["local"].append(await per_call(lambda: limiter_call(local), count))
    return results


async def one_run(base_url: str, limit: trio_llm.RateLimit, requests: int) -> tuple[float, float]:
    """Send ``requests`` chats; return (requests per second, client CPU us per request)."""
    async with trio_llm.open_client(
        base_url=base_url, model="fake-gpt", rate_limit=limit, max_concurrency=64
    ) as client:
        await client.chat_many(["warm up"] * 64, max_tokens=8)
        prompts = [f"question {index}" for index in range(requests)]
        cpu, wall = time.process_time(), time.perf_counter()
        results = await client.chat_many(prompts, max_tokens=8)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert all(result.ok for result in results)
    return requests / wall, cpu / requests * 1e6


async def throughput(url: str, requests: int, trials: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {"local": [], "shared": []}
    shared = trio_llm.RateLimit(
        requests_per_minute=1e9, tokens_per_minute=1e12, shared=url, name="bench-throughput"
    )
    async with fake_server() as server:
        for trial in range(trials):
            order = [("local", HIGH), ("shared", shared)]
            for name, limit in order if trial % 2 == 0 else order[::-1]:
                results[name].append(await one_run(server.base_url, limit, requests))
    return results


def spread(values: list[float], digits: int = 1) -> str:
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{median:8.{digits}f}  ({low:.{digits}f} .. {high:.{digits}f})"


async def main(args: argparse.Namespace) -> None:
    pin_client()
    with tempfile.TemporaryDirectory() as directory, RedisServer(Path(directory)) as redis:
        print(f"redis-server on {redis.url}; {args.trials} paired trials; medians (range)")
        print("the machine may be shared: compare within one run, not across runs\n")
        trips = await round_trips(redis.url, args.calls, args.trials)
        print(f"round trip, one call at a time ({args.calls} calls), us per call:")
        print(f"  PING through coredis            {spread(trips['ping'])}")
        print(f"  shared acquire + reconcile      {spread(trips['shared'])}")
        print(f"  local acquire + reconcile       {spread(trips['local'])}")
        extra = [s - loc for s, loc in zip(trips["shared"], trips["local"], strict=True)]
        print(f"  shared minus local, per request {spread(extra)}\n")
        runs = await throughput(redis.url, args.requests, args.trials)
        print(f"throughput, one process, {args.requests} requests, 64 at once:")
        for name in ("local", "shared"):
            rates = [rate for rate, _ in runs[name]]
            cpus = [cpu for _, cpu in runs[name]]
            print(f"  {name:6} limiter  requests/s {spread(rates)}   CPU us/request {spread(cpus)}")
        ratios = [s[0] / loc[0] for s, loc in zip(runs["shared"], runs["local"], strict=True)]
        print(f"  shared / local requests/s  {spread(ratios, 2)}")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round-trip trial")
    parser.add_argument("--requests", type=int, default=3000, help="requests per run")
    parser.add_argument("--quick", action="store_true", help="few trials and requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.calls, args.requests = 2, 300, 500
    return args


if __name__ == "__main__":
    trio.run(main, parse(sys.argv[1:]))
