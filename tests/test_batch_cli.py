"""The `trio-llm batch` command: kills and resumes in child processes, exit codes, output."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_llm._cli import main

EXAMPLES = Path(__file__).parent.parent / "examples"
ENV = {**os.environ, "PYTHONWARNINGS": "error"}


def start_fake_server(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """Start `trio-llm fake-server` on a free port; return the process and its base URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "trio_llm", "fake-server", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    assert server.stdout is not None
    match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", server.stdout.readline())
    assert match, "the fake server did not report its address"
    return server, match.group(1)


def stop(server: subprocess.Popen[str]) -> None:
    """Stop a fake server started by :func:`start_fake_server`, closing its pipe."""
    server.send_signal(signal.SIGINT)
    server.communicate(timeout=10)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """A fake server in its own process answering after 50 ms."""
    server, url = start_fake_server("--latency", "0.05")
    yield url
    stop(server)


def write_prompts(path: Path, count: int) -> list[str]:
    """Write ``count`` short-form lines; return their custom_ids."""
    ids = [f"line-{i}" for i in range(count)]
    with path.open("w") as file:
        for custom_id in ids:
            file.write(json.dumps({"custom_id": custom_id, "prompt": custom_id}) + "\n")
    return ids


def output_ids(path: Path) -> Counter[str]:
    """Count the custom_ids of an output file whose lines must all be whole."""
    data = path.read_bytes()
    return Counter(json.loads(line)["custom_id"] for line in data.splitlines())


def batch(*argv: str) -> subprocess.Popen[str]:
    """Start `python -m trio_llm batch ...` in a child process."""
    return subprocess.Popen(
        [sys.executable, "-m", "trio_llm", "batch", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def wait_for_lines(path: Path, count: int, process: subprocess.Popen[str]) -> None:
    """Wait until ``path`` has ``count`` lines (the batch is well under way)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {count} lines")


@pytest.mark.parametrize("kill", [signal.SIGINT, signal.SIGKILL])
def test_killed_run_resumes_with_each_custom_id_once(
    tmp_path: Path, server_url: str, kill: signal.Signals
) -> None:
    """A run killed mid-batch (SIGINT or SIGKILL) and run again answers every line once."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_prompts(source, 400)
    argv = [str(source), "-o", str(target), "--base-url", server_url, "--concurrency", "8"]
    process = batch(*argv, "--progress-interval", "0.2")
    wait_for_lines(target, 40, process)
    process.send_signal(kill)
    _out, err = process.communicate(timeout=30)
    done = output_ids(target)
    assert 40 <= sum(done.values()) < 400
    assert set(done.values()) == {1}
    if kill == signal.SIGINT:
        assert process.returncode == 130
        assert "SIGINT: starting no new requests" in err
        assert "To resume, run the same command again: trio-llm batch" in err
        assert re.search(r"trio-llm batch: \d+/400 \(\d+%\) \| [\d.]+ lines/s \| ETA", err)
        assert "not answered yet" in err
    else:
        assert process.returncode == -signal.SIGKILL

    again = batch(*argv)
    _out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert output_ids(target) == Counter(ids)
    assert f"{sum(done.values())} answered already" in err
    assert "done: all 400 lines answered OK" in err


def test_second_interrupt_stops_at_once(tmp_path: Path) -> None:
    """A second SIGINT cancels the requests in flight at once, without waiting for grace."""
    server, url = start_fake_server("--latency", "30")
    try:
        source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        write_prompts(source, 20)
        process = batch(str(source), "-o", str(target), "--base-url", url, "--grace", "60")
        assert process.stderr is not None
        assert "sending 20" in process.stderr.readline()  # the run has started
        time.sleep(0.3)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=20)
        assert time.monotonic() - started < 10
        assert process.returncode == 130
        assert "SIGINT again: cancelling the requests in flight" in err
        assert target.read_bytes() == b""
    finally:
        stop(server)


def test_simulated_sample_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's quick start: the sample batch, simulated, answers every line (exit 0)."""
    target = tmp_path / "out.jsonl"
    sample = EXAMPLES / "data" / "sample_batch.jsonl"
    assert main(["batch", str(sample), "-o", str(target), "--simulate"]) == 0
    err = capsys.readouterr().err
    assert "--simulate: answering from the built-in fake LLM server" in err
    lines = sample.read_text().splitlines()
    assert output_ids(target) == Counter(json.loads(line)["custom_id"] for line in lines)
    assert f"done: all {len(lines)} lines answered OK" in err
    assert re.search(rf"answered OK\s+{len(lines)}", err)  # the summary table


def test_simulated_anthropic_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--provider anthropic runs /v1/messages lines; without it they are refused, by line."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {
            "custom_id": f"m{i}",
            "method": "POST",
            "url": "/v1/messages",
            "body": {"max_tokens": 20, "messages": [{"role": "user", "content": f"q{i}"}]},
        }
        for i in range(5)
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["batch", str(source), "-o", str(target), "--simulate", "--provider", "anthropic"]
    assert main(argv) == 0
    assert output_ids(target) == Counter(line["custom_id"] for line in lines)
    record = json.loads(target.read_text().splitlines()[0])
    assert record["response"]["status_code"] == 200
    assert record["response"]["body"]["type"] == "message"
    capsys.readouterr()
    other = tmp_path / "openai.jsonl"
    assert main(["batch", str(source), "-o", str(other), "--simulate"]) == 2
    assert "provider='anthropic'" in capsys.readouterr().err
    assert not other.exists()  # refused up front: nothing created, nothing sent


def test_resume_command_repeats_every_non_default_flag() -> None:
    """The command printed on interruption resumes the same run, --retry-failed included."""
    from trio_llm._cli import build_parser
    from trio_llm.batch._command import _resume_command

    argv = ["batch", "in.jsonl", "-o", "out.jsonl", "--provider", "anthropic"]
    args = build_parser().parse_args([*argv, "--retry-failed", "--simulate", "--rpm", "60"])
    assert _resume_command(args) == (
        "trio-llm batch in.jsonl -o out.jsonl --provider anthropic --rpm 60 "
        "--simulate --retry-failed"
    )


def test_invalid_input_exits_2_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad input: exit 2, file:line in the message and a hint; nothing is written."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"custom_id": "a", "prompt": "hi"}\n{"custom_id": "b"\n')
    assert main(["batch", str(source), "-o", str(target), "--simulate"]) == 2
    err = capsys.readouterr().err
    assert f"error: {source}:2: invalid JSON" in err
    assert "--skip-invalid" in err
    assert not target.exists()


def test_skip_invalid_and_retry_failed_exit_statuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recorded invalid lines make the status 1; the message points at --retry-failed."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"custom_id": "a", "prompt": "hi"}\n[]\n')
    argv = ["batch", str(source), "-o", str(target), "--simulate"]
    assert main([*argv, "--skip-invalid"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 lines answered with an error" in err
    assert "--retry-failed" in err
    assert main([*argv, "--retry-failed", "--skip-invalid"]) == 1  # still invalid
    assert sum(output_ids(target).values()) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["batch", "in.jsonl"], "-o/--output"),
        (["batch", "in.jsonl", "-o", "o.jsonl", "--grace", "-1"], "--grace"),
        (["batch", "in.jsonl", "-o", "o.jsonl", "--rpm", "0"], "--rpm"),
    ],
)
def test_bad_flags_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad batch flags print usage and exit 2."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing input file is a usage error, and no output file is created."""
    target = tmp_path / "out.jsonl"
    assert main(["batch", str(tmp_path / "nope.jsonl"), "-o", str(target), "--simulate"]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    assert not target.exists()


def test_the_summaries_example_runs_offline_and_resumes(tmp_path: Path) -> None:
    """examples/batch_summaries.py runs with no arguments, then resumes with nothing to do."""
    script = [sys.executable, str(EXAMPLES / "batch_summaries.py")]
    first = subprocess.run(
        script, cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=60, check=False
    )
    assert first.returncode == 0, first.stderr
    assert "fake LLM server" in first.stderr
    assert "100 summarised now, 0 already done, 0 with errors" in first.stdout
    assert sum(output_ids(tmp_path / "summaries.jsonl").values()) == 100
    second = subprocess.run(
        script, cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=60, check=False
    )
    assert second.returncode == 0, second.stderr
    assert "0 summarised now, 100 already done" in second.stdout
