"""Benchmark the fan-out window: does ``chat_many`` keep ``max_concurrency`` requests in flight?

    .venv/bin/python benchmarks/fan_out.py                        # 5,000 requests, C=200, 0.2 s
    .venv/bin/python benchmarks/fan_out.py --latency 1.0          # a latency the CPU can feed
    .venv/bin/python benchmarks/fan_out.py --quick                # smoke run

The fake server (``trio_llm.testing``) runs in a child process pinned to CPU 0, the client
in this process on the other CPUs. For each client, in the same run, median of
``--trials``:

- ``in-flight/limit``: the mean of ``in_flight`` (``client.statistics().in_flight`` for
  trio-llm, a counter around the request for raw httpx2), sampled every ``--sample-ms``
  while there are still items to start (the tail, where the window must drain, excluded),
  over the limit C;
- ``req/s`` and ``req/s / ideal`` with ideal ``C / latency``; by Little's law the latter
  is also the mean number of requests actually waiting on the server over C: what the
  window is worth once the client's own time per request (which holds a slot too) and
  the server's are taken out;
- client CPU per request (``time.process_time()`` of this process over N) and the
  server's.

Clients: trio-llm ``client.chat_many`` (its fixed set of C workers; the client's default
transport, and again with ``transport=httpx2.AsyncHTTPTransport(...)``), and raw httpx2
on trio written the best way by hand (C worker tasks pulling from one iterator,
``json.dumps`` of the body, ``json.loads`` of the reply, no retries, no rate limiter, no
parsing into types, httpx2's default connection pool with C connections). trio-llm runs with
``retry=None`` and its default (adaptive) rate limiter, which stays idle here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx2
import trio
from _fake_server_process import fake_server, pin_client

import trio_llm

MODEL = "fake-gpt"


# --- the clients ---------------------------------------------------------------------------


@attrs.define
class Probe:
    """What a client exposes to the sampler: requests in flight, and requests started."""

    in_flight: Callable[[], int]
    started: Callable[[], int]


Job = Callable[[str, int, int, Callable[[Probe], None]], Awaitable[None]]


def prompt(i: int) -> str:
    """The i-th question of the job."""
    return f"Question {i}: say something short."


async def trio_llm_job(
    base_url: str,
    n: int,
    limit: int,
    expose: Callable[[Probe], None],
    transport: httpx2.AsyncBaseTransport | None = None,
) -> None:
    """trio-llm: ``client.chat_many`` over a generator of prompts."""
    async with trio_llm.open_client(
        base_url=base_url, model=MODEL, max_concurrency=limit, retry=None, transport=transport
    ) as client:
        await client.chat_many(["warm up"] * limit, max_tokens=1)  # open the connections
        sent_before = client.statistics().sent
        expose(
            Probe(
                in_flight=lambda: client.statistics().in_flight,
                started=lambda: client.statistics().sent - sent_before,
            )
        )
        results = await client.chat_many((prompt(i) for i in range(n)), max_tokens=16)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]!r}")


async def trio_llm_httpx2_pool_job(
    base_url: str, n: int, limit: int, expose: Callable[[Probe], None]
) -> None:
    """trio-llm on httpx2's own transport and pool instead of its default transport."""
    limits = httpx2.Limits(max_connections=limit, max_keepalive_connections=limit)
    transport = httpx2.AsyncHTTPTransport(limits=limits)
    await trio_llm_job(base_url, n, limit, expose, transport)


async def httpx2_job(base_url: str, n: int, limit: int, expose: Callable[[Probe], None]) -> None:
    """Raw httpx2 on trio: ``limit`` workers pulling from one iterator."""
    limits = httpx2.Limits(max_connections=limit, max_keepalive_connections=limit)
    headers = {"content-type": "application/json"}
    in_flight = started = 0

    def body(text: str) -> bytes:
        payload = {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 16,
        }
        return json.dumps(payload).encode()

    async with httpx2.AsyncClient(base_url=base_url, limits=limits, headers=headers) as http:

        async def worker(texts: Any) -> None:
            nonlocal in_flight, started
            for text in texts:
                in_flight += 1
                started += 1
                response = await http.post("/chat/completions", content=body(text))
                response.raise_for_status()
                json.loads(response.content)
                in_flight -= 1

        async with trio.open_nursery() as nursery:
            for _ in range(limit):
                nursery.start_soon(worker, iter(["warm up"]))
        in_flight = started = 0
        expose(Probe(in_flight=lambda: in_flight, started=lambda: started))
        texts = (prompt(i) for i in range(n))
        async with trio.open_nursery() as nursery:
            for _ in range(limit):
                nursery.start_soon(worker, texts)


# --- measurement ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Run:
    """One measured run."""

    elapsed: float
    window: float
    client_cpu: float
    server_cpu: float
    served: int


async def measure(job: Job, args: argparse.Namespace) -> Run:
    """Run ``job`` once against a fresh server, sampling its window."""
    n, limit = args.requests, args.concurrency
    samples: list[int] = []
    marks: dict[str, float] = {}
    exposed = trio.Event()
    probes: list[Probe] = []

    def expose(probe: Probe) -> None:
        # Called by the job once warm (connections open): the measurement starts here.
        probes.append(probe)
        marks["start"] = trio.current_time()
        marks["cpu"] = time.process_time()
        exposed.set()

    async def sample() -> None:
        await exposed.wait()
        probe = probes[0]
        # Only while items remain to be started: the tail must drain, by design.
        while probe.started() < n:
            samples.append(probe.in_flight())
            await trio.sleep(args.sample_ms / 1000)

    async with fake_server(latency=args.latency) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            await job(server.base_url, n, limit, expose)
            marks["end"] = trio.current_time()
            marks["cpu_used"] = time.process_time() - marks["cpu"]
        stats = await server.stats()
    return Run(
        elapsed=marks["end"] - marks["start"],
        window=statistics.fmean(samples) / limit if samples else 0.0,
        client_cpu=marks["cpu_used"],
        server_cpu=stats["cpu"],
        served=stats["requests_by_status"].get(200, 0),
    )


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print a Markdown table."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()


async def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run each client ``--trials`` times, print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="N")
    parser.add_argument("--concurrency", type=int, default=200, help="C")
    parser.add_argument("--latency", type=float, default=0.2, help="server latency, seconds")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--sample-ms", type=float, default=5.0, help="sampling period")
    parser.add_argument("--quick", action="store_true", help="1,000 requests, one trial")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.trials = 1000, 1
    pin_client()
    n, limit, latency = args.requests, args.concurrency, args.latency
    ideal_rate = limit / latency
    print(
        f"# trio-llm {trio_llm.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; server in a child process on CPU 0\n\n"
        f"## Fan-out window: N={n} requests, C={limit}, server latency {latency} s "
        f"(ideal {ideal_rate:.0f} req/s, {-(-n // limit) * latency:.2f} s); "
        f"median of {args.trials} trials\n",
        flush=True,
    )
    jobs: list[tuple[str, Job]] = [
        ("trio-llm chat_many", trio_llm_job),
        ("trio-llm chat_many, httpx2's transport", trio_llm_httpx2_pool_job),
        ("raw httpx2 on trio (C workers)", httpx2_job),
    ]
    rows = []
    for name, job in jobs:
        runs = []
        for _ in range(args.trials):
            runs.append(await measure(job, args))
            print(f"  done: {name} in {runs[-1].elapsed:.2f} s", file=sys.stderr, flush=True)
        elapsed = statistics.median(r.elapsed for r in runs)
        rate = n / elapsed
        rows.append(
            [
                name,
                f"{elapsed:.2f}",
                f"{statistics.median(r.window for r in runs):.3f}",
                f"{rate:.0f}",
                f"{rate / ideal_rate:.3f}",
                f"{statistics.median(r.client_cpu for r in runs) / n * 1e6:.0f}",
                f"{statistics.median(r.server_cpu for r in runs) / n * 1e6:.0f}",
            ]
        )
    print_table(
        [
            "client",
            "wall s",
            "in-flight/limit",
            "req/s",
            "req/s / ideal",
            "client CPU us/req",
            "server CPU us/req",
        ],
        rows,
    )


if __name__ == "__main__":
    trio.run(main)
