"""trio-llm against its peers: CPU per request, efficiency, streaming, memory.

    .venv/bin/python benchmarks/peers.py            # full run (about 30 minutes)
    .venv/bin/python benchmarks/peers.py --quick    # smaller runs, 1 trial (under 2 minutes)
    .venv/bin/python benchmarks/peers.py --json results.json   # keep the raw numbers
    .venv/bin/python benchmarks/peers.py --replot results.json # redraw docs/peers.png

Needs the ``bench`` extra (``pip install -e '.[bench]'``: aiohttp, uvloop, httptools,
matplotlib) and ``openai`` (in the ``dev`` extra).

A minimal uvloop + httptools server (``_peer_server.py``) runs in its own process on CPU 0,
so the server is never the bottleneck; each client run is a fresh process on CPU 1
(``taskset``), so its CPU time (``time.process_time()``) and peak RSS are its own. Every
client first opens its connections with one unmeasured round of requests. Trials are
interleaved (every contender once, then again, in rotated order) and the median is shown.

Scenarios (as in issue 8):

- S1: no latency, 5,000 requests, 64 in flight: CPU per request.
- S2: 200 ms latency, 2,000 requests, 200 in flight: efficiency = ideal wall time / wall
  time, where ideal = requests / in-flight x latency.
- S3: streaming, 500 requests x 200 chunks, 32 in flight: chunks per second.
- S4: 50 ms latency, 20,000 requests, 1,000 in flight: requests per second, peak RSS.
- Curve: 50 ms latency, 20 requests per slot, at 16, 64, 256 and 1,000 in flight (the
  last point is S4): CPU per request and efficiency, drawn to ``docs/peers.png``.

Contenders: trio-llm's ``client.chat`` / ``client.stream`` with its own transport and with
httpx2's, httpx2 alone on trio, openai's ``AsyncOpenAI`` (asyncio), aiohttp (asyncio).
Each parses every JSON reply and every streamed chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "Say hello to the benchmark in a few words."
MODEL = "bench-model"
STREAM_CHUNKS = 200
CURVE = (16, 64, 256, 1000)
CURVE_LATENCY_MS = 50
CURVE_PER_SLOT = 20

CONTENDERS = {
    "trio-llm": "trio-llm, own transport (TrioTransport)",
    "trio-llm/httpx2": "trio-llm, httpx2's transport",
    "httpx2": "httpx2 on trio, default transport",
    "openai": "openai AsyncOpenAI (asyncio)",
    "aiohttp": "aiohttp (asyncio)",
}


# --- the client side: one measured run in this process ----------------------------------


def _body(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _current_rss_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


class Run:
    """What one client process measures; printed as JSON."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0
        self.events = 0
        self.rss_before_kb = 0

    def baseline(self) -> None:
        """Note the memory in use before the first request (imports done)."""
        self.rss_before_kb = _current_rss_kb()

    def start(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def stop(self) -> None:
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall

    def report(self, requests: int) -> str:
        return json.dumps(
            {
                "cpu": self.cpu,
                "wall": self.wall,
                "requests": requests,
                "events": self.events,
                "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "rss_before_kb": self.rss_before_kb,
            }
        )


def _jobs(n: int) -> Iterator[int]:
    return iter(range(n))


def run_trio_llm(args: argparse.Namespace, run: Run, own_transport: bool) -> None:
    import httpx2
    import trio

    import trio_llm

    async def main() -> None:
        transport = None
        if not own_transport:
            limits = httpx2.Limits(
                max_connections=args.inflight, max_keepalive_connections=args.inflight
            )
            transport = httpx2.AsyncHTTPTransport(limits=limits)
        async with trio_llm.open_client(
            base_url=args.url,
            api_key="bench",
            model=MODEL,
            max_concurrency=args.inflight,
            transport=transport,
        ) as client:

            async def one() -> None:
                if not args.stream:
                    await client.chat(PROMPT)
                    return
                async with client.stream(PROMPT) as stream:
                    async for _ in stream:
                        run.events += 1

            async def worker(jobs: Iterator[int]) -> None:
                for _ in jobs:
                    await one()

            async def phase(n: int) -> None:
                jobs = _jobs(n)
                async with trio.open_nursery() as nursery:
                    for _ in range(min(n, args.inflight)):
                        nursery.start_soon(worker, jobs)

            run.baseline()
            await phase(args.inflight)  # warm-up: open the connections
            run.events = 0
            run.start()
            await phase(args.requests)
            run.stop()

    trio.run(main)


def run_httpx2(args: argparse.Namespace, run: Run) -> None:
    import httpx2
    import trio

    url = args.url + "/chat/completions"
    headers = {"authorization": "Bearer bench"}

    async def main() -> None:
        limits = httpx2.Limits(
            max_connections=args.inflight, max_keepalive_connections=args.inflight
        )
        async with httpx2.AsyncClient(limits=limits, timeout=120, headers=headers) as http:

            async def one() -> None:
                if not args.stream:
                    response = await http.post(url, json=_body(False))
                    response.raise_for_status()
                    response.json()
                    return
                async with http.stream("POST", url, json=_body(True)) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        data = line[6:] if line.startswith("data: ") else "[DONE]"
                        if data != "[DONE]" and json.loads(data)["choices"]:
                            run.events += 1

            async def worker(jobs: Iterator[int]) -> None:
                for _ in jobs:
                    await one()

            async def phase(n: int) -> None:
                jobs = _jobs(n)
                async with trio.open_nursery() as nursery:
                    for _ in range(min(n, args.inflight)):
                        nursery.start_soon(worker, jobs)

            run.baseline()
            await phase(args.inflight)
            run.events = 0
            run.start()
            await phase(args.requests)
            run.stop()

    trio.run(main)


def _asyncio_phases(
    args: argparse.Namespace, run: Run, one: Callable[[], Any], setup: Callable[[], Any]
) -> None:
    import asyncio

    async def main() -> None:
        async with setup() as resource_:
            del resource_

            async def worker(jobs: Iterator[int]) -> None:
                for _ in jobs:
                    await one()

            async def phase(n: int) -> None:
                jobs = _jobs(n)
                await asyncio.gather(*(worker(jobs) for _ in range(min(n, args.inflight))))

            run.baseline()
            await phase(args.inflight)
            run.events = 0
            run.start()
            await phase(args.requests)
            run.stop()

    asyncio.run(main())


def run_openai(args: argparse.Namespace, run: Run) -> None:
    import httpx2
    import openai

    limits = httpx2.Limits(max_connections=args.inflight, max_keepalive_connections=args.inflight)
    holder: dict[str, Any] = {}

    def setup() -> Any:
        client = openai.AsyncOpenAI(
            base_url=args.url,
            api_key="bench",
            http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=120),
        )
        holder["client"] = client
        return client

    async def one() -> None:
        client = holder["client"]
        messages = [{"role": "user", "content": PROMPT}]
        if not args.stream:
            await client.chat.completions.create(model=MODEL, messages=messages)
            return
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.choices:
                run.events += 1

    _asyncio_phases(args, run, one, setup)


def run_aiohttp(args: argparse.Namespace, run: Run) -> None:
    import aiohttp

    url = args.url + "/chat/completions"
    headers = {"authorization": "Bearer bench"}
    holder: dict[str, Any] = {}

    def setup() -> Any:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.inflight),
            timeout=aiohttp.ClientTimeout(total=120),
            headers=headers,
        )
        holder["session"] = session
        return session

    async def one() -> None:
        session = holder["session"]
        if not args.stream:
            async with session.post(url, json=_body(False)) as response:
                response.raise_for_status()
                json.loads(await response.read())
            return
        async with session.post(url, json=_body(True)) as response:
            response.raise_for_status()
            async for line in response.content:
                data = line[6:] if line.startswith(b"data: ") else b"[DONE]\n"
                if data != b"[DONE]\n" and json.loads(data)["choices"]:
                    run.events += 1

    _asyncio_phases(args, run, one, setup)


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contender", choices=list(CONTENDERS), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--inflight", type=int, required=True)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args(argv)
    run = Run()
    if args.contender == "trio-llm":
        run_trio_llm(args, run, own_transport=True)
    elif args.contender == "trio-llm/httpx2":
        run_trio_llm(args, run, own_transport=False)
    elif args.contender == "httpx2":
        run_httpx2(args, run)
    elif args.contender == "openai":
        run_openai(args, run)
    else:
        run_aiohttp(args, run)
    print(run.report(args.requests), flush=True)


# --- the driver: server, interleaved trials, tables, chart -------------------------------


class Scenario:
    """One measured configuration."""

    def __init__(
        self,
        key: str,
        title: str,
        *,
        requests: int,
        inflight: int,
        latency_ms: int = 0,
        stream: bool = False,
    ) -> None:
        self.key = key
        self.title = title
        self.requests = requests
        self.inflight = inflight
        self.latency_ms = latency_ms
        self.stream = stream

    @property
    def ideal(self) -> float:
        """The shortest possible wall time: rounds of ``inflight`` requests x latency."""
        return self.requests / self.inflight * self.latency_ms / 1000


def _scenarios(quick: bool) -> tuple[list[Scenario], list[Scenario]]:
    scale = 10 if quick else 1
    main = [
        Scenario("S1", "S1: no latency, 64 in flight", requests=5000 // scale, inflight=64),
        Scenario(
            "S2",
            "S2: 200 ms latency, 200 in flight",
            requests=2000 // (5 if quick else 1),
            inflight=200,
            latency_ms=200,
        ),
        Scenario(
            "S3",
            f"S3: streaming {STREAM_CHUNKS} chunks, 32 in flight",
            requests=500 // scale,
            inflight=32,
            stream=True,
        ),
    ]
    per_slot = 2 if quick else CURVE_PER_SLOT
    curve = [
        Scenario(
            "S4" if n == 1000 else f"C{n}",
            f"{CURVE_LATENCY_MS} ms latency, {n} in flight",
            requests=per_slot * n,
            inflight=n,
            latency_ms=CURVE_LATENCY_MS,
        )
        for n in CURVE
    ]
    return main, curve


def start_server() -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, str(HERE / "_peer_server.py"), "--port", "0"]
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    return server, port


def _busy_seconds() -> float:
    """CPU time the whole machine has spent busy, from /proc/stat (0 where there is none)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _process_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(patience: float) -> None:
    """Wait (at most ``patience`` seconds) until other work leaves the CPUs mostly idle."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        before = _busy_seconds()
        time.sleep(0.5)
        if (_busy_seconds() - before) / 0.5 < 0.15:
            return
        time.sleep(2)


def run_client(contender: str, scenario: Scenario, port: int) -> dict[str, Any]:
    chunks = STREAM_CHUNKS if scenario.stream else 0
    url = f"http://127.0.0.1:{port}/b/{scenario.latency_ms}/{chunks}/v1"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_client",
        "--contender",
        contender,
        "--url",
        url,
        "--requests",
        str(scenario.requests),
        "--inflight",
        str(scenario.inflight),
    ]
    if scenario.stream:
        command.append("--stream")
    if shutil.which("taskset"):
        command = ["taskset", "-c", "1", *command]
    busy = _busy_seconds()
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    busy = _busy_seconds() - busy
    if done.returncode != 0:
        raise RuntimeError(f"{contender} failed on {scenario.key}:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["busy"] = busy  # the whole machine's busy CPU seconds during the run
    if scenario.stream:
        expected = scenario.requests * (STREAM_CHUNKS + 2)
        if result["events"] != expected:
            raise RuntimeError(f"{contender} saw {result['events']} chunks, not {expected}")
    return result


def measure(
    scenarios: list[Scenario],
    contenders: list[str],
    trials: int,
    server: subprocess.Popen[str],
    port: int,
    patience: float,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        s.key: {c: [] for c in contenders} for s in scenarios
    }
    for scenario in scenarios:
        for trial in range(trials):
            order = contenders[trial % len(contenders) :] + contenders[: trial % len(contenders)]
            for contender in order:
                wait_for_quiet(patience)
                served = _process_seconds(server.pid)
                result = run_client(contender, scenario, port)
                served = _process_seconds(server.pid) - served
                # Busy time that was neither the client's nor the server's: other work
                # competing for the CPUs (it stretches wall times, hardly CPU times).
                result["others"] = max(0.0, result["busy"] - result["cpu"] - served)
                results[scenario.key][contender].append(result)
                print(
                    f"  {scenario.key} trial {trial + 1}/{trials} {contender:16} "
                    f"cpu {result['cpu']:.2f}s wall {result['wall']:.2f}s "
                    f"(other work: {result['others']:.2f} CPU s)",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def _median(runs: list[dict[str, Any]], metric: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(metric(run) for run in runs)


def metrics(scenario: Scenario, runs: list[dict[str, Any]]) -> dict[str, float]:
    """The medians that matter for a scenario."""
    out = {
        "cpu_us_per_request": _median(runs, lambda r: r["cpu"] / r["requests"] * 1e6),
        "requests_per_s": _median(runs, lambda r: r["requests"] / r["wall"]),
        "wall_s": _median(runs, lambda r: r["wall"]),
        "rss_peak_mb": _median(runs, lambda r: r["rss_peak_kb"] / 1024),
        "rss_growth_mb": _median(runs, lambda r: (r["rss_peak_kb"] - r["rss_before_kb"]) / 1024),
    }
    if scenario.latency_ms:
        out["efficiency"] = _median(runs, lambda r: scenario.ideal / r["wall"])
    if scenario.stream:
        out["chunks_per_s"] = _median(runs, lambda r: r["events"] / r["wall"])
        out["cpu_us_per_chunk"] = _median(runs, lambda r: r["cpu"] / r["events"] * 1e6)
    return out


def _table(
    title: str,
    contenders: list[str],
    values: dict[str, dict[str, float]],
    columns: list[tuple[str, str, str, bool]],
) -> str:
    """A markdown table; each column also shows the ratio to trio-llm's value."""
    head = ["client"] + [name for name, _, _, _ in columns]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = values.get("trio-llm", {})
    for contender in contenders:
        cells = [CONTENDERS[contender]]
        for _, key, fmt, higher_better in columns:
            value = values[contender][key]
            cell = format(value, fmt)
            if contender != "trio-llm" and base.get(key, 0) > 0 and value > 0:
                ratio = value / base[key] if not higher_better else base[key] / value
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(
    main: list[Scenario],
    curve: list[Scenario],
    contenders: list[str],
    results: dict[str, dict[str, list[dict[str, Any]]]],
) -> tuple[str, dict[str, dict[str, dict[str, float]]]]:
    by_key = {s.key: s for s in [*main, *curve]}
    values = {
        key: {c: metrics(by_key[key], runs) for c, runs in per.items()}
        for key, per in results.items()
    }
    cpu = ("CPU us/request", "cpu_us_per_request", ",.0f", False)
    sections = []
    if "S1" in values:
        sections.append(
            _table(
                by_key["S1"].title,
                contenders,
                values["S1"],
                [
                    cpu,
                    ("requests/s", "requests_per_s", ",.0f", True),
                ],
            )
        )
    if "S2" in values:
        sections.append(
            _table(
                by_key["S2"].title,
                contenders,
                values["S2"],
                [
                    ("efficiency", "efficiency", ".2f", True),
                    cpu,
                ],
            )
        )
    if "S3" in values:
        sections.append(
            _table(
                by_key["S3"].title,
                contenders,
                values["S3"],
                [
                    ("chunks/s", "chunks_per_s", ",.0f", True),
                    ("CPU us/chunk", "cpu_us_per_chunk", ",.1f", False),
                ],
            )
        )
    if "S4" in values:
        sections.append(
            _table(
                "S4: " + by_key["S4"].title,
                contenders,
                values["S4"],
                [
                    ("requests/s", "requests_per_s", ",.0f", True),
                    ("peak RSS MB", "rss_peak_mb", ",.1f", False),
                    ("RSS growth MB", "rss_growth_mb", ",.1f", False),
                    ("efficiency", "efficiency", ".2f", True),
                    cpu,
                ],
            )
        )
    curve_keys = [s.key for s in curve if s.key in values]
    if curve_keys:
        head = ["client"] + [f"{by_key[k].inflight} in flight" for k in curve_keys]
        rows = [
            "**Curve: CPU us/request (efficiency) at 50 ms latency**",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for contender in contenders:
            cells = [CONTENDERS[contender]] + [
                f"{values[k][contender]['cpu_us_per_request']:,.0f} "
                f"({values[k][contender]['efficiency']:.2f})"
                for k in curve_keys
            ]
            rows.append("| " + " | ".join(cells) + " |")
        sections.append("\n".join(rows))
    disturbed = {
        key: max(run.get("others", 0.0) for runs in per.values() for run in runs)
        for key, per in results.items()
    }
    sections.append(
        "Other work on the machine during the runs, at most (CPU seconds): "
        + ", ".join(f"{key} {seconds:.1f}" for key, seconds in disturbed.items())
    )
    return "\n\n".join(sections), values


def chart(
    curve: list[Scenario],
    contenders: list[str],
    values: dict[str, dict[str, dict[str, float]]],
    path: Path,
) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [s for s in curve if s.key in values]
    x = [s.inflight for s in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for contender in contenders:
        left.plot(
            x,
            [values[s.key][contender]["cpu_us_per_request"] for s in points],
            marker="o",
            label=CONTENDERS[contender],
        )
        right.plot(
            x,
            [values[s.key][contender]["efficiency"] for s in points],
            marker="o",
            label=CONTENDERS[contender],
        )
    for axis in (left, right):
        axis.set_xscale("log")
        axis.set_xticks(x, [str(n) for n in x])
        axis.set_xlabel("requests in flight")
        axis.grid(True, which="both", alpha=0.3)
    left.set_yscale("log")
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_yticks([100, 200, 500, 1000, 2000, 5000])
    left.set_ylabel("client CPU per request (us, log scale)")
    left.set_title("CPU per request (lower is better)")
    right.set_ylabel("ideal wall time / wall time")
    right.set_ylim(0, 1.05)
    right.set_title(f"Efficiency at {CURVE_LATENCY_MS} ms latency (higher is better)")
    right.legend(loc="lower left", fontsize=8)
    figure.suptitle("trio-llm and its peers: client pinned to one core, loopback server")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def driver(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, one trial")
    parser.add_argument("--trials", type=int, help="runs per contender (default 3, quick 1)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--scenarios", default="S1,S2,S3,curve", help="any of S1,S2,S3,curve")
    parser.add_argument("--chart", type=Path, default=ROOT / "docs" / "peers.png")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--patience",
        type=float,
        help="seconds to wait before each run for other work to leave the CPUs idle "
        "(default 60, quick 3)",
    )
    parser.add_argument(
        "--replot", type=Path, help="redraw the chart from a --json file; measure nothing"
    )
    args = parser.parse_args(argv)
    if args.replot:
        _, curve = _scenarios(quick=False)
        saved = json.loads(args.replot.read_text())
        chart(curve, list(CONTENDERS), saved["values"], args.chart)
        return
    trials = args.trials or (1 if args.quick else 3)
    patience = args.patience if args.patience is not None else (3.0 if args.quick else 60.0)
    contenders = [c for c in args.contenders.split(",") if c]
    wanted = set(args.scenarios.split(","))
    main, curve = _scenarios(args.quick)
    main = [s for s in main if s.key in wanted]
    curve = curve if "curve" in wanted else []
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start "
        "(other work on the machine disturbs wall times, not CPU times)",
        flush=True,
    )
    # A terminated run must still stop its server (finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    server, port = start_server()
    started = time.perf_counter()
    try:
        results = measure([*main, *curve], contenders, trials, server, port, patience)
    finally:
        server.terminate()
        server.wait()
    text, values = report(main, curve, contenders, results)
    elapsed = time.perf_counter() - started
    print(
        f"\n{trials} trial(s) each, median; ratios are relative to trio-llm "
        f"(>1x: trio-llm is better); {elapsed:.0f} s in all, load average "
        f"{os.getloadavg()[0]:.2f} at the end.\n"
    )
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"values": values, "runs": results}, indent=1))
    if curve and args.chart:
        chart(curve, contenders, values, args.chart)
        print(f"\nchart: {args.chart}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_client"]:
        client_main(sys.argv[2:])
    else:
        driver(sys.argv[1:])
