"""`trio-llm batch --via provider` in child processes: SIGKILL at each step, Ctrl-C, --cancel.

The fake server runs in the test's own process (its holds stop the child at a known step,
and its counters say what the child created); the command runs as a child process,
killed with SIGKILL at that step, then run again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import attrs
import pytest
import trio

from trio_llm._cli import main
from trio_llm.batch import _job_run
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

ENV = {**os.environ, "PYTHONWARNINGS": "error"}
LINES = 30


def write_prompts(path: Path, count: int = LINES) -> Path:
    """Write ``count`` short-form lines ``r0``, ``r1``, ..."""
    with path.open("w") as file:
        for i in range(count):
            row = {"custom_id": f"r{i}", "prompt": f"question {i}", "max_tokens": 5}
            file.write(json.dumps(row) + "\n")
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    """Parse every line of an output file (each must be whole)."""
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def each_once(path: Path, count: int = LINES) -> list[dict[str, Any]]:
    """Every line of the input has exactly one output line."""
    records = read_output(path)
    assert Counter(r["custom_id"] for r in records) == Counter(f"r{i}" for i in range(count))
    return records


def line_count(path: Path) -> int:
    """Whole lines in ``path`` so far."""
    return read_output(path).__len__() if path.exists() else 0


def command(server: FakeLLMServer, provider: str, source: Path, target: Path) -> list[str]:
    """The command line of a --via provider run against ``server``."""
    base = server.root_url if provider == "anthropic" else server.base_url
    return [
        sys.executable,
        "-m",
        "trio_llm",
        "batch",
        str(source),
        "-o",
        str(target),
        "--via",
        "provider",
        "--provider",
        provider,
        "--base-url",
        base,
        "--model",
        "m",
        "--poll-interval",
        "0.2",
    ]


def log_file(path: Path) -> IO[bytes]:
    """Open a file for a child's stdout and stderr."""
    return path.open("wb")


async def start(argv: list[str], log: Path) -> trio.Process:
    """Start the command, its output going to ``log``."""
    with log_file(log) as file:
        return await trio.lowlevel.open_process(argv, stdout=file, stderr=file, env=ENV)


async def finish(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run the command to its end."""
    with trio.fail_after(60):
        return await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, env=ENV
        )


async def until(predicate: Any, *, seconds: float = 30.0) -> None:
    """Wait until ``predicate()`` holds."""
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)


def creates(server: FakeLLMServer) -> int:
    return sum(server.stats.batches_created.values())


STEPS = [
    ("openai", "POST /v1/files"),  # uploaded; its answer (the file id) never read
    ("openai", "POST /v1/batches"),  # created; its answer (the batch id) never read
    ("openai", "GET /v1/batches/{batch_id}"),  # created and recorded: polling
    ("openai", "GET /v1/files/{file_id}/content"),  # merging: half the lines written
    ("anthropic", "POST /v1/messages/batches"),
    ("anthropic", "GET /v1/messages/batches/{message_batch_id}"),
    ("anthropic", "GET /v1/messages/batches/{message_batch_id}/results"),
]


@pytest.mark.parametrize(("provider", "route"), STEPS)
async def test_sigkill_at_each_step_then_rerun_answers_each_line_once(
    tmp_path: Path, provider: str, route: str
) -> None:
    """SIGKILL with a step's request in flight; the rerun creates no second batch."""
    source, target = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=0.5)) as server:
        argv = command(server, provider, source, target)
        merging = route.endswith(("/content", "/results"))
        hold = server.hold(route, partial=0.5) if merging else server.hold(route)
        process = await start(argv, tmp_path / "first.log")
        with trio.fail_after(30):
            await hold.wait_arrived()
        if merging:
            await until(lambda: line_count(target) > 0)
        process.kill()  # SIGKILL
        assert await process.wait() == -signal.SIGKILL
        hold.release()
        written = line_count(target)
        assert (written > 0) == merging
        done = await finish(argv)
        uploads = server.stats.files_uploaded
    assert done.returncode == 0, done.stderr.decode()
    assert creates(server) == 1
    if provider == "openai":
        assert uploads == 1
    each_once(target)
    if route.startswith("POST"):  # found at the provider, where the killed run made it
        what = "uploaded" if route == "POST /v1/files" else "created"
        assert f"part 0: found {'file-' if what == 'uploaded' else ''}" in done.stderr.decode()
        assert f", {what} before" in done.stderr.decode()


async def test_ctrl_c_while_polling_says_the_batches_run_on(tmp_path: Path) -> None:
    """Ctrl-C stops polling (exit 130) and prints the resume and the cancel commands."""
    source, target = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    # 20 s: validating for 2 s, answering for 16 s, 2 s to end (cancelled: to say so)
    async with open_fake_llm(FakeLLMConfig(batch_delay=20.0)) as server:
        argv = command(server, "openai", source, target)
        polls = server.hold("GET /v1/batches/{batch_id}")
        process = await start(argv, tmp_path / "first.log")
        with trio.fail_after(30):
            await polls.wait_arrived()
        process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            assert await process.wait() == 130
        polls.release()
        stderr = (tmp_path / "first.log").read_text()
        assert "1 batch(es) keep running at the provider (batch_" in stderr
        assert "--via provider" in stderr
        assert "--cancel" in stderr
        assert server.openai_batches[0]["status"] in ("validating", "in_progress")
        cancelled = await finish([*argv, "--cancel"])
        assert cancelled.returncode == 1, cancelled.stderr.decode()
        assert server.openai_batches[0]["status"] == "cancelled"
        records = each_once(target)
        assert {r["error"]["code"] for r in records} == {"batch_cancelled"}
        assert "--retry-failed" in cancelled.stderr.decode()
        server.config = attrs.evolve(server.config, batch_delay=0.5)
        again = await finish([*argv, "--retry-failed"])
    assert again.returncode == 0, again.stderr.decode()
    assert creates(server) == 2
    assert all(r["error"] is None for r in each_once(target))


async def test_plain_progress_says_each_status_and_exit_1_on_errors(tmp_path: Path) -> None:
    """Off a terminal: a line per status change; an errored line makes the exit status 1."""
    source, target = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=1.0, batch_error_ids=("r4",))) as server:
        done = await finish(command(server, "openai", source, target))
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    for status in ("uploading", "creating", "validating", "in_progress", "completed, merged"):
        assert status in stderr
    assert "completed, merged: 29 OK, 1 with an error (batch_" in stderr
    assert "rerun with --retry-failed" in stderr


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    """--cancel without --via provider, and invalid lines, exit 2 before anything is sent."""
    source, target = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    async with open_fake_llm() as server:
        argv = command(server, "anthropic", source, target)
        online = [word for word in argv if word not in ("--via", "provider")]
        refused = await finish([*online, "--cancel"])
        with (tmp_path / "in.jsonl").open("a") as file:
            file.write(json.dumps({"custom_id": "a b", "prompt": "x"}) + "\n")
        invalid = await finish(argv)
    assert refused.returncode == 2
    assert "add --via provider" in refused.stderr.decode()
    assert invalid.returncode == 2
    assert f"in.jsonl:{LINES + 1}: custom_id 'a b' is not accepted" in invalid.stderr.decode()
    assert creates(server) == 0
    assert not target.exists()


async def test_simulate_runs_the_whole_flow_offline(tmp_path: Path) -> None:
    """--simulate --via provider: batches at the in-process fake server, then merged."""
    source, target = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "trio_llm", "batch", str(source), "-o", str(target)]
    done = await finish([*argv, "--via", "provider", "--simulate", "--max-batch-lines", "20"])
    assert done.returncode == 0, done.stderr.decode()
    assert "submitting 30 in 2 new batch(es) to openai's Batch API" in done.stderr.decode()
    each_once(target)


def test_the_command_in_process_runs_and_resumes_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """main(): --simulate --via provider answers every line; the rerun has nothing to do."""
    source, target = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    argv = ["batch", str(source), "-o", str(target), "--via", "provider", "--simulate"]
    assert main([*argv, "--max-batch-lines", "20", "--max-batch-bytes", "100000"]) == 0
    first = capsys.readouterr().err
    assert "its Batch API batches take 2 s" in first
    assert "batches of the job" in first
    assert "2 merged" in first
    assert main(argv) == 0
    assert "30 answered already" in capsys.readouterr().err
    assert main(["batch", str(source), "-o", str(target), "--cancel"]) == 2
    each_once(target)


@pytest.mark.parametrize(
    ("flag", "why"),
    [
        ("--endpoints", "--via provider sends the job's batches to one server (--base-url)"),
        ("--cache", "--via provider neither reads nor fills a response cache"),
        (
            "--shard",
            "--via provider submits the whole job: the provider runs it, no machines to split it",
        ),
        (
            "--max-cost",
            "--via provider submits the whole job at once: no budget can stop it halfway",
        ),
    ],
)
def test_online_only_flags_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, why: str
) -> None:
    """--endpoints, --cache, --shard, --max-cost with --via provider: exit 2, one line."""
    source, target = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    given = tmp_path / "given"
    given.write_text("")
    value = {"--shard": "1/2", "--max-cost": "5"}.get(flag, str(given))
    argv = ["batch", str(source), "-o", str(target), "--via", "provider", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"trio-llm batch: error: {why}: drop {flag}\n"
    assert not target.exists()


def test_ctrl_c_just_before_the_receiver_is_installed_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C in the instant before the job's signal receiver is installed (raised there
    as KeyboardInterrupt) is its signal: exit 130 with the resume command, no traceback."""
    source, target = write_prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    real = _job_run.trio.open_signal_receiver
    calls = 0

    @contextmanager
    def ctrl_c_first(*signums: int) -> Iterator[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyboardInterrupt
        with real(*signums) as receiver:
            yield receiver

    monkeypatch.setattr(_job_run.trio, "open_signal_receiver", ctrl_c_first)
    argv = ["batch", str(source), "-o", str(target), "--via", "provider", "--simulate"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "SIGINT: stopping; the batches keep running" in err
    assert "Traceback" not in err
    assert calls == 1
