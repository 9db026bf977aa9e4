"""How long does resuming a batch of millions of lines take, and how much memory?

Run it with ``python benchmarks/batch_scale.py`` (about 15 minutes and 5 GB of scratch
disk for the default sizes; ``--lines 1000000`` for a quick look). For each size N it
writes, in a temporary directory, N short-form input lines
``{"custom_id": "req-%08d", "prompt": "Question %d"}`` and an output file that answers
all but the last ``--unanswered`` (1,000) of them with Batch API output lines of about
370 bytes (the format ``trio-llm batch`` writes), then runs the resume::

    python -m trio_llm batch IN -o OUT --simulate --model m

in a child process, and prints for it:

- ``ready``: seconds from the start of the command to the line saying what it will send,
  printed once the output has been scanned and the input checked (the cost of resuming);
- ``wall``: seconds for the whole command (the last lines sent too, by ``--simulate``'s
  built-in server: ~4 s whatever N), and ``CPU`` seconds of the child (less sensitive
  than wall time to other work on the machine);
- ``peak`` RSS of the child (``ru_maxrss`` from ``wait4``) and ``B/line``: how much more
  that is than the peak of the same resume at 2,000 lines, per line.

Each size runs ``--runs`` times (3) and the medians are printed; the output file is cut
back to its generated size before each run (a run appends the answers it sends). With
``--baseline TREE`` another checkout (its ``src``) runs the same files in turns with this
one, and the ratios this/baseline are printed too::

    python benchmarks/batch_scale.py --lines 1000000,3000000 --baseline /work/main

``--src TREE`` runs another checkout instead of this one. ``--fresh`` measures the start
of a new job instead: an empty output, every input line checked in full, and the run
killed once it is ready to send. The files are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

HERE = Path(__file__).resolve().parent
_READY = re.compile(r"sending [\d,]+ -> ")
_SMALL = 2_000  # lines of the run whose peak RSS counts as the fixed cost

# One output line as `trio-llm batch` writes it (compact JSON, keys in this order), with
# a short answer: about 370 bytes.
_ANSWER = (
    '{"id":"batch_req_%024x","custom_id":"req-%08d","response":{"status_code":200,'
    '"request_id":"req_%016x","body":{"id":"chatcmpl-%012x","model":"m","choices":[{'
    '"index":0,"message":{"role":"assistant","content":"Answer %d."},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":8,"completion_tokens":3,"total_tokens":11}}},"error":null}\n'
)
_QUESTION = '{"custom_id": "req-%08d", "prompt": "Question %d"}\n'
_CHUNK = 100_000  # lines formatted per write


def write_files(directory: Path, count: int, unanswered: int) -> tuple[Path, Path]:
    """Write the input of ``count`` lines and its output answering all but ``unanswered``.

    In a child process: this one stays small, and a child started from it reports this
    one's size as its own peak if larger (``ru_maxrss`` counts the memory it had before
    its ``exec``).
    """
    source, target = directory / f"in-{count}.jsonl", directory / f"out-{count}.jsonl"
    arguments = [str(source), str(target), str(count), str(unanswered)]
    subprocess.run([sys.executable, __file__, "_write", *arguments], check=True)
    return source, target


def _write(source: str, target: str, count: int, unanswered: int) -> None:
    answered = count - unanswered
    with open(source, "w") as inputs, open(target, "w") as outputs:
        for start in range(0, count, _CHUNK):
            stop = min(start + _CHUNK, count)
            inputs.write("".join([_QUESTION % (i, i) for i in range(start, stop)]))
            outputs.write(
                "".join(
                    [
                        _ANSWER % (i * 7919, i, i * 104729, i * 31, i)
                        for i in range(start, min(stop, answered))
                    ]
                )
            )


@attrs.frozen
class Measure:
    """One resume: seconds to ready, seconds in all, CPU seconds, peak RSS in bytes."""

    ready: float
    wall: float
    cpu: float
    rss: int


def resume(src: Path, source: Path, target: Path, size: int, *, stop: bool = False) -> Measure:
    """Cut ``target`` back to ``size`` bytes and run the resume with ``src`` first.

    With ``stop``, kill it as soon as it is ready to send (its measures are kept).
    """
    os.truncate(target, size)
    env = dict(os.environ, PYTHONPATH=str(src), TTY_INTERACTIVE="0")
    command = [sys.executable, "-m", "trio_llm", "batch", str(source), "-o", str(target)]
    command += ["--simulate", "--model", "m"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    ready = None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if ready is None and _READY.search(line):
            ready = time.perf_counter() - started
            if stop:
                process.kill()
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    text = "".join(lines)
    ended = (-signal.SIGKILL, "") if stop else (0, "done: all")
    if process.returncode != ended[0] or ready is None or ended[1] not in text:
        raise SystemExit(f"the resume failed (exit {process.returncode}):\n{text}")
    cpu = usage.ru_utime + usage.ru_stime
    return Measure(ready=ready, wall=wall, cpu=cpu, rss=usage.ru_maxrss * 1024)


def tree_src(text: str) -> Path:
    """The ``src`` directory of a checkout (or that directory itself)."""
    path = Path(text).resolve()
    src = path / "src" if (path / "src" / "trio_llm").is_dir() else path
    if not (src / "trio_llm").is_dir():
        raise argparse.ArgumentTypeError(f"no trio_llm package in {path} or {path}/src")
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", default="1000000,3000000,10000000", help="sizes, by commas")
    parser.add_argument("--unanswered", type=int, default=1000, help="lines left to send")
    parser.add_argument("--runs", type=int, default=3, help="runs of each size (medians)")
    parser.add_argument("--src", type=tree_src, default=HERE.parent / "src", help="tree to run")
    parser.add_argument("--baseline", type=tree_src, help="a tree to compare with, in turns")
    parser.add_argument("--dir", help="where to write the files (default: a temporary dir)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="measure the start of a new job instead (an empty output; killed once ready)",
    )
    args = parser.parse_args()
    sizes = [int(text.replace("_", "")) for text in args.lines.split(",")]
    trees = {"this": args.src} | ({"baseline": args.baseline} if args.baseline else {})
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
    for name, src in trees.items():
        print(f"{name}: {src}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="batch_scale-") as scratch:
        directory = Path(scratch)
        small: dict[str, int] = {}
        unanswered = _SMALL if args.fresh else args.unanswered // 2
        source, target = write_files(directory, _SMALL, unanswered)
        size = target.stat().st_size
        for name, src in trees.items():
            small[name] = int(statistics.median(
                resume(src, source, target, size, stop=args.fresh).rss for _ in range(args.runs)
            ))  # fmt: skip
            what = "start" if args.fresh else "resume"
            print(f"{name}: the {what} of {_SMALL:,} lines peaks at {small[name] / 2**20:.1f} MiB")
        header = f"{'lines':>11} {'tree':>8} {'ready s':>8} {'wall s':>7} {'CPU s':>6}"
        print(f"{header} {'peak MiB':>9} {'B/line':>7} {'us/line':>8}   (medians of {args.runs})")
        for count in sizes:
            began = time.perf_counter()
            source, target = write_files(directory, count, count if args.fresh else args.unanswered)
            size = target.stat().st_size
            print(
                f"{count:>11,} lines written in {time.perf_counter() - began:.0f} s "
                f"(input {source.stat().st_size / 2**30:.2f} GiB, output {size / 2**30:.2f} GiB)"
            )
            runs: dict[str, list[Measure]] = {name: [] for name in trees}
            for _ in range(args.runs):
                for name, src in trees.items():  # in turns: drift falls on both alike
                    runs[name].append(resume(src, source, target, size, stop=args.fresh))
            medians = {}
            for name, measures in runs.items():
                ready = statistics.median(m.ready for m in measures)
                wall = statistics.median(m.wall for m in measures)
                cpu = statistics.median(m.cpu for m in measures)
                rss = statistics.median(m.rss for m in measures)
                per_line = (rss - small[name]) / (count - _SMALL)
                medians[name] = (ready, wall, cpu, rss)
                print(
                    f"{count:>11,} {name:>8} {ready:8.1f} {wall:7.1f} {cpu:6.1f} "
                    f"{rss / 2**20:9.1f} {per_line:7.1f} {ready / count * 1e6:8.2f}"
                )
            if "baseline" in medians:
                pairs = zip(medians["this"], medians["baseline"], (8, 7, 6, 9), strict=True)
                ratios = " ".join(f"{new / old:{width}.2f}" for new, old, width in pairs)
                print(f"{count:>11,} {'ratio':>8} {ratios}")
            source.unlink()
            target.unlink()


if __name__ == "__main__":
    if sys.argv[1:2] == ["_write"]:
        _write(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
