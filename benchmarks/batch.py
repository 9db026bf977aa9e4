"""How fast is `trio-llm batch`, and does its memory stay flat as the input grows?

Run it with ``python benchmarks/batch.py`` (a few minutes; ``--quick`` for a smaller run).
It starts the fake LLM server in a child process (pinned to CPU 0 with ``taskset`` when
available: it is the bottleneck otherwise) and runs ``python -m trio_llm batch`` over
inputs of 10,000 and 100,000 short requests in other child processes (pinned to the other
CPUs), measuring for each:

- requests per second, end to end (both passes over the input included);
- the peak resident set size of the batch process (``ru_maxrss`` from ``wait4``), which
  should not grow with the input: requests are streamed, and the only per-line state is a
  64-bit hash per ``custom_id`` during the check and a bit per line during the run;
- the cost of running the finished batch again (scan OUTPUT, check INPUT, send nothing).

Each output is checked: one line per ``custom_id``, every one a success.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONCURRENCY = 64


def pinned(command: list[str], cpus: str) -> list[str]:
    """Prefix ``command`` with ``taskset -c cpus`` when taskset exists and there are 2+ CPUs."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpus, *command]
    return command


def write_input(path: Path, count: int) -> None:
    """Write ``count`` short-form requests of a few tokens each."""
    with path.open("w") as file:
        for i in range(count):
            file.write(
                json.dumps({"custom_id": f"req-{i}", "prompt": f"Say hi {i}", "max_tokens": 8})
                + "\n"
            )


def run_batch(url: str, source: Path, target: Path, cpus: str) -> tuple[float, float, float, str]:
    """Run the batch command; return (seconds, CPU seconds, peak RSS in MiB, stderr)."""
    command = [
        sys.executable,
        "-m",
        "trio_llm",
        "batch",
        str(source),
        "-o",
        str(target),
        "--base-url",
        url,
        "--concurrency",
        str(CONCURRENCY),
        "--progress-interval",
        "30",
    ]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(pinned(command, cpus), stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        err.seek(0)
        text = err.read()
    if process.returncode != 0:
        raise SystemExit(f"batch failed ({process.returncode}):\n{text}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, text


def check_output(path: Path, count: int) -> None:
    """Every custom_id answered once, successfully."""
    seen = set()
    with path.open("rb") as file:
        for line in file:
            record = json.loads(line)
            assert record["error"] is None, record
            seen.add(record["custom_id"])
    assert seen == {f"req-{i}" for i in range(count)}, "missing or extra custom_ids"


def baseline_rss(cpus: str) -> float:
    """Peak RSS of a process that only imports what the batch command imports."""
    code = "import trio_llm, trio_llm.batch._command, rich.progress, rich.table"
    process = subprocess.Popen(pinned([sys.executable, "-c", code], cpus))
    _pid, _status, usage = os.wait4(process.pid, 0)
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 lines")
    args = parser.parse_args()
    sizes = [1_000, 10_000] if args.quick else [10_000, 100_000]
    server_cpus, batch_cpus = ("0", "1-") if (os.cpu_count() or 1) > 1 else ("0", "0")
    if batch_cpus == "1-":
        batch_cpus = f"1-{(os.cpu_count() or 2) - 1}"

    server = subprocess.Popen(
        pinned([sys.executable, "-m", "trio_llm", "fake-server", "--port", "0"], server_cpus),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        match = re.search(r"(http://\S+/v1)", server.stdout.readline())
        assert match, "the fake server did not start"
        url = match.group(1)
        print(f"fake server at {url} (CPU {server_cpus}); batch on CPU {batch_cpus}; "
              f"--concurrency {CONCURRENCY}; Python {sys.version.split()[0]}")  # fmt: skip
        print(f"baseline: importing the batch command peaks at {baseline_rss(batch_cpus):.1f} MiB")
        rows = []
        with tempfile.TemporaryDirectory() as scratch:
            for count in sizes:
                source = Path(scratch) / f"in-{count}.jsonl"
                target = Path(scratch) / f"out-{count}.jsonl"
                write_input(source, count)
                elapsed, cpu, rss, _err = run_batch(url, source, target, batch_cpus)
                check_output(target, count)
                again, _cpu, rss_again, err = run_batch(url, source, target, batch_cpus)
                assert f"{count:,} answered already" in err, err
                rows.append((count, rss))
                print(
                    f"{count:>9,} lines: {elapsed:6.1f} s, {count / elapsed:6.0f} requests/s, "
                    f"batch CPU {cpu / count * 1e6:4.0f} us/request, peak RSS {rss:5.1f} MiB; "
                    f"rerun when finished: {again:4.1f} s, peak RSS {rss_again:5.1f} MiB"
                )
        (small, small_rss), (large, large_rss) = rows[0], rows[-1]
        print(
            f"peak RSS {small:,} -> {large:,} lines: {small_rss:.1f} -> {large_rss:.1f} MiB "
            f"({large_rss - small_rss:+.1f} MiB for {large - small:,} more lines)"
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=10)


if __name__ == "__main__":
    main()
