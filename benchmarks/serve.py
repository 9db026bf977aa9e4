"""What the gateway costs: trio_llm.serve versus calling the fake server directly.

One run, both targets measured the same way with one httpx2 caller: the median latency
of sequential chat requests (the difference is the gateway's added latency), then
requests per second with many requests in flight. The fake server answers instantly, so
all the time measured is HTTP, JSON and the gateway's own work::

    .venv/bin/python benchmarks/serve.py [--requests 400] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import httpx2
import trio

from trio_llm import open_client
from trio_llm.serve import create_app, serve
from trio_llm.testing import open_fake_llm

BODY = {"model": "fake-gpt", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}


async def latencies(http: httpx2.AsyncClient, url: str, count: int) -> list[float]:
    """Send ``count`` requests one after another; return each one's seconds."""
    result = []
    for _ in range(count):
        start = time.perf_counter()
        response = await http.post(url, json=BODY)
        result.append(time.perf_counter() - start)
        response.raise_for_status()
    return result


async def throughput(http: httpx2.AsyncClient, url: str, count: int, concurrency: int) -> float:
    """Send ``count`` requests, ``concurrency`` at a time; return requests per second."""
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            (await http.post(url, json=BODY)).raise_for_status()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return count / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    limits = httpx2.Limits(max_connections=args.concurrency)
    async with (
        open_fake_llm() as upstream,
        open_client(
            base_url=upstream.base_url,
            api_key="",
            model="fake-gpt",
            max_concurrency=args.concurrency,
        ) as client,
        httpx2.AsyncClient(limits=limits, timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        stop = trio.Event()
        gateway = await nursery.start(
            functools.partial(serve, create_app(client), port=0, shutdown_trigger=stop.wait)
        )
        targets = {
            "direct": upstream.base_url + "/chat/completions",
            "gateway": gateway + "/v1/chat/completions",
        }
        for url in targets.values():  # warm up connections and code paths
            await latencies(http, url, 20)
        medians = {}
        rates = {}
        for name, url in targets.items():
            medians[name] = statistics.median(await latencies(http, url, args.requests // 2))
            rates[name] = await throughput(http, url, args.requests, args.concurrency)
        stop.set()
    print(f"{args.requests} requests, concurrency {args.concurrency}, fake server (no latency)")
    print(f"{'target':<10}{'median latency':>16}{'requests/s':>12}")
    for name in targets:
        print(f"{name:<10}{medians[name] * 1000:>13.2f} ms{rates[name]:>12,.0f}")
    added = (medians["gateway"] - medians["direct"]) * 1000
    print(f"gateway adds {added:.2f} ms per request (median, sequential)")


if __name__ == "__main__":
    trio.run(main)
