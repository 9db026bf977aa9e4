"""Paired runs of ``peers.py``'s client: contenders interleaved on one server, medians.

Where ``peers.py`` measures every contender one after the other (and takes ~30 minutes),
this runs a few scenarios for a few contenders in turns (A B, B A, A B, ...), so that
drift in the machine's speed falls on all of them alike; good for checking one change::

    python benchmarks/paired.py --scenarios S1,S3,S4 --trials 5 \\
        --contenders trio-llm,aiohttp,trio-llm+h11,trio-llm@/path/to/an/older/checkout

A contender is one of ``peers.py _client --contender``'s names, optionally with
``+h11`` / ``+httptools`` (trio-llm's response parser, through ``TRIO_LLM_HTTP_PARSER``)
and ``@TREE`` (a checkout whose ``src`` and ``benchmarks/peers.py`` are used; this one
by default). Scenarios, as in ``peers.py`` and measured the same way: S1 (no latency, 64
in flight) and S4 (50 ms, 1,000 in flight): CPU microseconds per request of the client
process; S3 (streaming 200 chunks, 32 in flight): chunks per second; S2 (200 ms, 200 in
flight): efficiency, the ideal wall time over the real one. The client runs on CPU 1 and
the server on CPU 0 where ``taskset`` exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import start_server  # noqa: E402

SCENARIOS = {
    "S1": {"latency": 0, "chunks": 0, "requests": 5000, "inflight": 64},
    "S2": {"latency": 200, "chunks": 0, "requests": 2000, "inflight": 200},
    "S3": {"latency": 0, "chunks": 200, "requests": 500, "inflight": 32},
    "S4": {"latency": 50, "chunks": 0, "requests": 20000, "inflight": 1000},
}


def _split(spec: str) -> tuple[str, Path, str | None]:
    """``name[+parser][@tree]`` -> (name, tree, parser)."""
    spec, _, tree = spec.partition("@")
    name, _, parser = spec.partition("+")
    return name, Path(tree) if tree else HERE.parent, parser or None


def run_once(spec: str, key: str, port: int) -> tuple[float, float]:
    """Run one contender on one scenario; return (its value, peak RSS in MB)."""
    name, tree, parser = _split(spec)
    scenario = SCENARIOS[key]
    url = f"http://127.0.0.1:{port}/b/{scenario['latency']}/{scenario['chunks']}/v1"
    command = [
        sys.executable,
        str(tree / "benchmarks" / "peers.py"),
        "_client",
        "--contender",
        name,
        "--url",
        url,
        "--requests",
        str(scenario["requests"]),
        "--inflight",
        str(scenario["inflight"]),
    ]
    if scenario["chunks"]:
        command.append("--stream")
    if shutil.which("taskset"):
        command = ["taskset", "-c", "1", *command]
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    if parser:
        env["TRIO_LLM_HTTP_PARSER"] = parser
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if scenario["chunks"]:
        value = result["events"] / result["wall"]
    elif scenario["latency"] >= 200:
        ideal = scenario["requests"] / scenario["inflight"] * scenario["latency"] / 1000
        value = ideal / result["wall"]
    else:
        value = result["cpu"] / result["requests"] * 1e6
    return value, result["rss_peak_kb"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="S1,S3,S4", help="any of S1,S2,S3,S4")
    parser.add_argument("--contenders", default="trio-llm,aiohttp")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    keys = args.scenarios.split(",")
    contenders = args.contenders.split(",")
    values: dict[tuple[str, str], list[float]] = {}
    server, port = start_server()
    try:
        for trial in range(args.trials):
            order = contenders if trial % 2 == 0 else contenders[::-1]
            for key in keys:
                for spec in order:
                    value, rss = run_once(spec, key, port)
                    values.setdefault((key, spec), []).append(value)
                    print(f"{key} {spec}: {value:,.2f} (peak RSS {rss:.1f} MB)", flush=True)
    finally:
        server.kill()
    print("\nmedians")
    for key in keys:
        unit = (
            "chunks/s"
            if SCENARIOS[key]["chunks"]
            else "efficiency"
            if SCENARIOS[key]["latency"] >= 200
            else "us CPU/request"
        )
        cells = [f"{spec} {statistics.median(values[key, spec]):,.2f}" for spec in contenders]
        print(f"{key} ({unit}): " + " | ".join(cells))


if __name__ == "__main__":
    main()
