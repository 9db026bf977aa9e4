"""How fast is the fake LLM server? Requests per second on one core, JSON and streamed.

Run it with ``python benchmarks/fake_server_rps.py``. It starts the fake server in a child
process pinned to CPU 0 (``taskset -c 0`` when available) and drives it from this process,
pinned to the other CPUs, with a lean load generator: raw trio sockets, pre-built requests,
keep-alive connections and a minimal response parser, to keep its own cost low.
Each scenario runs three times; the median is printed. If ``wrk`` is installed, it also
measures the JSON scenario with ``wrk`` for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

PROMPT = "Say hello to the benchmark in a few words."


def serve() -> None:
    """Child process: run the fake server until terminated, printing its port first."""
    from trio_llm.testing import serve_fake_llm

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_fake_llm)
            print(server.port, flush=True)

    trio.run(main)


def request_bytes(stream: bool) -> bytes:
    body: dict[str, object] = {
        "model": "fake-gpt",
        "messages": [{"role": "user", "content": PROMPT}],
    }
    if stream:
        body["stream"] = True
    data = json.dumps(body).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(data)
    )
    return head + data


class Reader:
    """Read HTTP/1.1 responses from a keep-alive connection, doing as little as possible.

    Chunked bodies are not unframed: the reader counts ``data: {`` in the raw bytes and stops
    at the last-chunk marker, which is enough for this server's SSE and much cheaper.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def more(self) -> None:
        data = await self.stream.receive_some(262144)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    async def response(self) -> tuple[int, int]:
        """Read one response; return its status and how many SSE chunks its body held."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self.more()
        head = self.buffer[:end].lower()
        status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 17)
            size = int(head[at + 17 : stop if stop >= 0 else None])
            while len(self.buffer) < end + 4 + size:
                await self.more()
            self.buffer = self.buffer[end + 4 + size :]
            return status, 0
        while (last := self.buffer.find(b"\r\n0\r\n\r\n", end)) < 0:
            await self.more()
        chunks = self.buffer.count(b"data: {", end, last)
        self.buffer = self.buffer[last + 7 :]
        return status, chunks


async def drive(port: int, stream: bool, connections: int, seconds: float) -> tuple[float, float]:
    """Keep ``connections`` requests in flight for ``seconds``; return requests/s and chunks/s."""
    request = request_bytes(stream)
    counts = {"requests": 0, "chunks": 0, "errors": 0}
    start = stop = 0.0

    async def worker() -> None:
        connection = await trio.open_tcp_stream("127.0.0.1", port)
        async with connection:
            reader = Reader(connection)
            while trio.current_time() < stop:
                await connection.send_all(request)
                status, chunks = await reader.response()
                if start <= trio.current_time() < stop:
                    counts["requests"] += 1
                    counts["chunks"] += chunks
                    counts["errors"] += status != 200

    warmup = 0.5
    start = trio.current_time() + warmup
    stop = start + seconds
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    if counts["errors"]:
        raise RuntimeError(f"{counts['errors']} requests failed")
    return counts["requests"] / seconds, counts["chunks"] / seconds


def run_wrk(port: int, connections: int, seconds: float, cpus: str | None) -> float:
    body = json.dumps({"model": "fake-gpt", "messages": [{"role": "user", "content": PROMPT}]})
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", handle.name]
        if cpus and shutil.which("taskset"):
            command = ["taskset", "-c", cpus, *command]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if match is None:
        raise RuntimeError(f"could not read wrk's output:\n{output}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--no-wrk", action="store_true", help="skip the wrk comparison")
    args = parser.parse_args()
    if args.serve:
        serve()
        return

    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    command = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    if pinned:
        command = ["taskset", "-c", "0", *command]
    others: str | None = None
    if pinned and hasattr(os, "sched_setaffinity"):
        cpus = set(range(1, os.cpu_count() or 1))
        os.sched_setaffinity(0, cpus)  # the load generator keeps off the server's core
        others = ",".join(map(str, sorted(cpus)))
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        print(
            f"fake server pid {server.pid} on port {port}, "
            f"{'pinned to CPU 0' if pinned else 'not pinned (no taskset)'}; "
            f"{args.connections} connections, {args.runs} runs of {args.seconds:g} s"
        )
        json_rates, stream_rates, chunk_rates = [], [], []
        for run in range(args.runs):
            rps, _ = trio.run(drive, port, False, args.connections, args.seconds)
            json_rates.append(rps)
            srps, cps = trio.run(drive, port, True, args.connections, args.seconds)
            stream_rates.append(srps)
            chunk_rates.append(cps)
            print(
                f"  run {run + 1}: chat JSON {rps:,.0f} req/s; "
                f"chat stream {srps:,.0f} req/s = {cps:,.0f} chunks/s"
            )
        print(f"median chat JSON:   {statistics.median(json_rates):,.0f} requests/s")
        print(
            f"median chat stream: {statistics.median(stream_rates):,.0f} requests/s, "
            f"{statistics.median(chunk_rates):,.0f} chunks/s"
        )
        if shutil.which("wrk") and not args.no_wrk:
            wrk_rates = []
            for _ in range(args.runs):
                wrk_rates.append(run_wrk(port, args.connections, args.seconds, others))
                time.sleep(0.2)
            print(f"median chat JSON (wrk): {statistics.median(wrk_rates):,.0f} requests/s")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
