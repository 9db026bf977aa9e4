"""How much memory does each request in flight hold? (tracemalloc, trio-llm's client.chat)

    .venv/bin/python benchmarks/memory_in_flight.py                  # 1,000 in flight
    .venv/bin/python benchmarks/memory_in_flight.py --inflight 200 --top 30

Starts the peer benchmark's server (``_peer_server.py``) with a long latency, opens the
connections with two unmeasured rounds, then starts ``--inflight`` ``client.chat`` calls
and, while every one waits for its reply, compares a tracemalloc snapshot with one taken
before they started. Prints the Python memory held per request in flight (the benchmark's
own task included) and the allocation sites that hold the most. Complements the peak RSS
of ``peers.py``'s S4, which also counts the interpreter's allocator and is noisier.
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc
from pathlib import Path

import trio
from peers import MODEL, PROMPT, start_server

import trio_llm


async def measure(url: str, inflight: int, top: int, settle: float) -> None:
    async with trio_llm.open_client(
        base_url=url, api_key="bench", model=MODEL, max_concurrency=inflight
    ) as client:

        async def round_of_calls() -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(inflight):
                    nursery.start_soon(client.chat, PROMPT)

        await round_of_calls()  # opens the connections
        await round_of_calls()
        gc.collect()
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        async with trio.open_nursery() as nursery:
            for _ in range(inflight):
                nursery.start_soon(client.chat, PROMPT)
            await trio.sleep(settle)  # every call is now waiting for its reply
            during = tracemalloc.take_snapshot()
        tracemalloc.stop()
    stats = during.compare_to(before, "lineno")
    total = sum(stat.size_diff for stat in stats)
    print(f"{inflight} requests in flight: {total / inflight:,.0f} bytes of Python memory each")
    print(f"\n{'bytes/request':>13}  {'objects':>7}  allocated at")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        print(f"{stat.size_diff / inflight:13,.0f}  {stat.count_diff:7,}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inflight", type=int, default=1000)
    parser.add_argument("--top", type=int, default=15, help="allocation sites to list")
    parser.add_argument(
        "--latency", type=float, default=5.0, help="server latency, seconds (> settle)"
    )
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds before the snapshot is taken"
    )
    args = parser.parse_args()
    server, port = start_server()
    try:
        url = f"http://127.0.0.1:{port}/b/{int(args.latency * 1000)}/0/v1"
        trio.run(measure, url, args.inflight, args.top, args.settle)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
