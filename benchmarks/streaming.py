"""Benchmark streaming: trio-llm's stream API beside raw httpx2 line reading, same run.

    .venv/bin/python benchmarks/streaming.py [--trials 3] [--server process|inline]

Against the fake server at full speed (no latency, no pacing) it measures, for each client:

- time to first chunk: from opening the request to the first chunk, over many
  short requests (median);
- throughput: events per second over long replies (``n`` choices streamed side by side),
  in wall time and in the client process's CPU time.

The raw client reads ``aiter_lines()`` through the same httpx2 client and transport and
keeps the ``data:`` lines, without parsing JSON (``httpx2+json`` also decodes each one);
trio-llm decodes SSE, parses every chunk, aggregates the reply and hands each chunk through
its memory channel. The overhead ratio is trio-llm's time over raw httpx2's (goal <= 1.2).
Each figure is the median of ``--trials`` runs. By default the server runs in a separate
process, as a real one would (on two cores it may then be what bounds throughput, and a
slower client reads more events per read); ``--server inline`` runs it in the benchmark's
own trio loop, where every microsecond the client spends shows in the ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import multiprocessing.connection
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import trio

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm, serve_fake_llm

MODEL = "fake-gpt"
LONG: dict[str, Any] = {"n": 64}  # 64 choices of 8 to 40 tokens, streamed side by side
LONG_REQUESTS = 6
SHORT_REQUESTS = 60


def _serve(conn: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_fake_llm, FakeLLMConfig())
            conn.send(server.base_url)
            try:  # serve until the parent closes the pipe
                await trio.to_thread.run_sync(conn.recv_bytes, abandon_on_cancel=True)
            except EOFError:
                pass
            nursery.cancel_scope.cancel()

    trio.run(main)


@asynccontextmanager
async def fake_server(where: str) -> AsyncIterator[str]:
    """Run the fake server inline or in a child process; yield its base URL."""
    if where == "inline":
        async with open_fake_llm() as server:
            yield server.base_url
        return
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(child,))
    process.start()
    try:
        base_url: str = await trio.to_thread.run_sync(parent.recv)
        yield base_url
    finally:
        parent.close()
        await trio.to_thread.run_sync(process.join, 10)
        if process.is_alive():
            process.terminate()


async def raw_stream(
    http: httpx2.AsyncClient, url: str, prompt: str, *, parse: bool = False, **params: Any
) -> int:
    """Stream with httpx2 alone; return the number of data events, JSON-decoded if ``parse``."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **params,
    }
    events = 0
    async with http.stream("POST", url, content=json.dumps(body).encode()) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if parse:
                    json.loads(line[6:])
                events += 1
    return events


async def llm_stream(client: trio_llm.Client, prompt: str, **params: Any) -> int:
    """Stream with trio-llm; return the number of chunks."""
    chunks = 0
    async with client.stream(prompt, retry=None, **params) as stream:
        async for _ in stream:
            chunks += 1
    return chunks


async def first_chunk_seconds(make: Callable[[], Awaitable[float]]) -> float:
    """Return the median time to the first chunk over SHORT_REQUESTS requests."""
    return statistics.median([await make() for _ in range(SHORT_REQUESTS)])


async def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--server", choices=["process", "inline"], default="process")
    args = parser.parse_args()

    async with (
        fake_server(args.server) as base_url,
        trio_llm.open_client(base_url=base_url, model=MODEL) as client,
    ):
        # The raw reads go through the client's own httpx2 client: the same transport and
        # pool, so the difference is the streaming layer alone.
        http = client._http
        url = base_url + "/chat/completions"

        # Each reads its reply to the end, so the connection is reused as in real use.
        async def raw_first() -> float:
            start = time.perf_counter()
            first = math.inf
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            async with http.stream("POST", url, content=json.dumps(body).encode()) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and first == math.inf:
                        first = time.perf_counter() - start
            return first

        async def llm_first() -> float:
            start = time.perf_counter()
            first = math.inf
            async with client.stream("hi", retry=None) as stream:
                async for _ in stream:
                    if first == math.inf:
                        first = time.perf_counter() - start
            return first

        # Both make the same requests; the events each reply has are counted once.
        events = sum([await raw_stream(http, url, f"story {i}", **LONG) for i in range(2)])
        await llm_stream(client, "warm up", **LONG)

        clients: list[tuple[str, Callable[[], Awaitable[float]], Callable[[int], Awaitable[int]]]]
        clients = [
            ("httpx2", raw_first, lambda i: raw_stream(http, url, f"story {i}", **LONG)),
            (
                "httpx2+json",
                raw_first,
                lambda i: raw_stream(http, url, f"story {i}", parse=True, **LONG),
            ),
            ("trio-llm", llm_first, lambda i: llm_stream(client, f"story {i}", **LONG)),
        ]
        results: dict[str, dict[str, list[float]]] = {
            name: {"ttfc": [], "wall": [], "cpu": []} for name, _, _ in clients
        }
        for _ in range(args.trials):
            for name, first, long in clients:
                results[name]["ttfc"].append(await first_chunk_seconds(first))
                wall, cpu = time.perf_counter(), time.process_time()
                for i in range(LONG_REQUESTS):
                    await long(i % 2)
                results[name]["wall"].append(time.perf_counter() - wall)
                results[name]["cpu"].append(time.process_time() - cpu)

    total = events * LONG_REQUESTS // 2
    median = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    print(f"server: {args.server}; {total} events per trial ({LONG_REQUESTS} replies of "
          f"n={LONG['n']}); median of {args.trials} trials")  # fmt: skip
    print(f"{'client':<13}{'first chunk':>12}{'events/s':>10}{'us/event':>10}{'CPU us/event':>14}")
    for name, m in median.items():
        print(
            f"{name:<13}{m['ttfc'] * 1e3:>9.2f} ms{total / m['wall']:>10,.0f}"
            f"{m['wall'] / total * 1e6:>10.2f}{m['cpu'] / total * 1e6:>14.2f}"
        )
    ours = median["trio-llm"]
    for baseline in ("httpx2", "httpx2+json"):
        raw = median[baseline]
        print(
            f"overhead ratio (trio-llm / {baseline}): first chunk "
            f"{ours['ttfc'] / raw['ttfc']:.2f}x, throughput {ours['wall'] / raw['wall']:.2f}x "
            f"wall, {ours['cpu'] / raw['cpu']:.2f}x CPU"
        )


if __name__ == "__main__":
    trio.run(main)
