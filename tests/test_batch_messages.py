"""`trio-llm batch`: one clear line per failure, and its exit status (issue 15, items 5, 8, 9).

Fail-fast stops (exit 3, a diagnosis and the resume command), I/O errors at run time
(exit 3, one line naming the file), Ctrl-C while starting, and the input mistakes that
used to be reported badly or not at all.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trio_llm
from trio_llm._cli import main
from trio_llm.batch import _command, _runner
from trio_llm.batch._input import Invalid, parse_line
from trio_llm.batch._output import OutputFile
from trio_llm.testing import FakeLLMConfig, open_fake_llm

ENV = {**os.environ, "PYTHONWARNINGS": "error"}


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    """A fake server in its own process that wants the key "right"; its base URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "trio_llm", "fake-server", "--port", "0", "--api-key", "right"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    assert server.stdout is not None
    match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", server.stdout.readline())
    assert match, "the fake server did not report its address"
    yield match.group(1)
    server.send_signal(signal.SIGINT)
    server.communicate(timeout=10)


def write_prompts(path: Path, count: int) -> None:
    """Write ``count`` short-form lines."""
    path.write_text(
        "".join(json.dumps({"custom_id": f"r{i}", "prompt": "hi"}) + "\n" for i in range(count))
    )


def output_lines(path: Path) -> list[dict[str, Any]]:
    """The output file's records (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def messages(err: str) -> list[str]:
    """The command's own lines on stderr (not the summary table)."""
    return [line for line in err.splitlines() if line.startswith("trio-llm batch: ")]


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- fail fast (item 5) ------------------------------------------------------------


def test_a_wrong_key_exits_3_with_a_diagnosis_and_the_resume_command(
    tmp_path: Path,
    keyed_server: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """401: exit 3, one diagnosis naming the key's variable, the resume command; resumable."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 300)
    monkeypatch.setenv("MY_KEY", "wrong")
    argv = ["batch", str(source), "-o", str(target), "--base-url", keyed_server]
    assert main([*argv, "--api-key-env", "MY_KEY"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert messages(err)[-2:] == [
        f"trio-llm batch: stopped: every request gets 401 invalid_api_key from {keyed_server} "
        "(Incorrect API key provided.); check the API key in $MY_KEY",
        f"trio-llm batch: 0 of 300 lines answered in {target}, 300 not yet. Once fixed, "
        f"resume with: trio-llm batch {source} -o {target} --base-url {keyed_server} "
        "--api-key-env MY_KEY",
    ]
    assert output_lines(target) == []
    monkeypatch.setenv("MY_KEY", "right")
    assert main([*argv, "--api-key-env", "MY_KEY"]) == 0
    assert len(output_lines(target)) == 300


def test_a_dead_url_exits_3_naming_the_base_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Connection refused on every line: stop after the threshold, ask whether it is up."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 500)
    url = closed_port_url()
    argv = ["batch", str(source), "-o", str(target), "--base-url", url, "--max-attempts", "1"]
    assert main([*argv, "--max-consecutive-failures", "7"]) == 3
    lines = messages(capsys.readouterr().err)
    assert lines[-2].startswith(
        "trio-llm batch: stopped: 7 requests in a row failed, none succeeded in between; "
        f"the last: Connection error on POST {url}/chat/completions"
    )
    assert lines[-2].endswith("; is the server up? check --base-url")
    assert lines[-1].endswith("--max-attempts 1 --max-consecutive-failures 7")
    assert output_lines(target) == []


def test_max_consecutive_failures_0_records_every_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-consecutive-failures 0: a dead endpoint's lines are all written as errors (1)."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 30)
    argv = ["batch", str(source), "-o", str(target), "--base-url", closed_port_url()]
    assert main([*argv, "--max-attempts", "1", "--max-consecutive-failures", "0"]) == 1
    assert [r["error"]["code"] for r in output_lines(target)] == ["connection_error"] * 30
    assert "30 of 30 lines answered with an error" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "x"])
def test_a_bad_failure_limit_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-consecutive-failures takes a whole number >= 0."""
    with pytest.raises(SystemExit) as exited:
        main(["batch", "in.jsonl", "-o", "out.jsonl", "--max-consecutive-failures", value])
    assert exited.value.code == 2
    assert "--max-consecutive-failures" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (trio_llm.PermissionDeniedError("no", status_code=403), "may use this model"),
        (trio_llm.NotFoundError("no", status_code=404), "check --base-url, --provider"),
        (trio_llm.ServerError("down", status_code=503), "try again later"),
        (trio_llm.RateLimitError("slow", status_code=429), "check the quota"),
        (trio_llm.APIResponseError("html", status_code=200, request_id=None), "not the API's"),
        (
            trio_llm.RetryDeadlineExceeded(
                "late", deadline=1, attempts=2, last_error=trio_llm.APIConnectionError("x")
            ),
            "is the server up?",
        ),
    ],
)
def test_each_stop_says_what_to_check(error: trio_llm.LLMError, hint: str) -> None:
    """The hint after the diagnosis fits the error that stopped the run."""
    from trio_llm._cli import build_parser

    args = build_parser().parse_args(["batch", "in.jsonl", "-o", "out.jsonl"])
    assert hint in _command._stop_hint(error, args)


# -- run-time I/O errors and Ctrl-C (item 8) ----------------------------------------


def fail_writes_after(monkeypatch: pytest.MonkeyPatch, count: int, error: OSError) -> None:
    """Make OutputFile.write raise ``error`` (as a descriptor call would) after ``count``."""
    original = OutputFile.write
    done = [0]

    def write(self: OutputFile, line: bytes) -> None:
        if done[0] >= count:
            raise OSError(error.errno, error.strerror)  # no filename: a write() on an fd
        done[0] += 1
        original(self, line)

    monkeypatch.setattr(OutputFile, "write", write)


async def test_disk_full_in_several_workers_raises_one_error(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies arriving together on a full disk: one OSError naming the file, not a group."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 40)
    fail_writes_after(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=8) as client,
    ):
        with pytest.raises(OSError, match="No space left on device") as raised:
            await trio_llm.run_batch(source, target, client=client)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert len(output_lines(target)) == 3


def test_disk_full_is_one_line_and_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command says which file and how to resume, in one line; no traceback."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 40)
    fail_writes_after(monkeypatch, 5, OSError(errno.ENOSPC, "No space left on device"))
    assert main(["batch", str(source), "-o", str(target), "--simulate"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert messages(err)[-1] == (
        f"trio-llm batch: error: {target}: No space left on device; rerun the same command "
        "to resume once that is fixed (every line written is whole): "
        f"trio-llm batch {source} -o {target} --simulate"
    )


def test_a_read_only_output_names_the_file_and_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EPERM on a write (e.g. an append-only or immutable file) is a run-time error."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 4)
    fail_writes_after(monkeypatch, 0, OSError(errno.EPERM, "Operation not permitted"))
    assert main(["batch", str(source), "-o", str(target), "--simulate"]) == 3
    err = messages(capsys.readouterr().err)[-1]
    assert err.startswith(f"trio-llm batch: error: {target}: Operation not permitted; ")
    assert "None" not in err


def test_ctrl_c_while_starting_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the input is checked: 130, one line, no traceback, no output file."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 4)

    async def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_runner, "check_input", interrupted)
    assert main(["batch", str(source), "-o", str(target), "--simulate"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert messages(err)[-1].startswith("trio-llm batch: interrupted before sending;")
    assert not target.exists()


def test_ctrl_c_while_printing_the_summary_still_gives_the_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is over: a Ctrl-C during the table does not hide how it ended."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 3)

    def interrupted(summary: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_command, "print_summary", interrupted)
    assert main(["batch", str(source), "-o", str(target), "--simulate"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert messages(err)[-1] == f"trio-llm batch: done: all 3 lines answered OK in {target}"


# -- messages about the input (item 9) ------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"custom_id": ""}', "custom_id must be a non-empty string, not an empty string"),
        ('{"custom_id": "a", "prompt": ""}', "prompt must be a non-empty string, not an empty"),
        (
            '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
            '"body": {"messages": []}}',
            "body.messages must be a non-empty array of messages, not an empty array",
        ),
        ('{"custom_id": 7}', "custom_id must be a non-empty string, not a number"),
    ],
)
def test_empty_values_are_called_empty(line: str, reason: str) -> None:
    """A value that must not be empty, and is, is named as empty (not just by its type)."""
    parsed = parse_line(line.encode(), 1, default_model="m")
    assert isinstance(parsed, Invalid)
    assert parsed.reason.startswith(reason)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_input_with_no_requests_exits_2(
    tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty (or blank) input is a mistake: exit 2, and no output file is created."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(content)
    assert main(["batch", str(source), "-o", str(target), "--simulate"]) == 2
    assert messages(capsys.readouterr().err) == [
        f"trio-llm batch: error: {source} holds no requests (it is empty, or blank); nothing to do"
    ]
    assert not target.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["batch", "in.jsonl", "-o", "-"], "'-' (standard output) is not supported"),
        (["batch", "-", "-o", "out.jsonl"], "'-' (standard input) is not supported"),
    ],
)
def test_dash_is_refused_not_taken_for_a_file_name(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`-o -` and INPUT `-` are usage errors; no file named '-' appears."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "prompt": "hi"}\n')
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--simulate"])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_embedding_lines_for_anthropic_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--provider anthropic cannot send /v1/embeddings lines: found by the check, exit 2."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"custom_id": "q", "prompt": "hi"},
        {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["batch", str(source), "-o", str(target), "--simulate", "--provider", "anthropic"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {source}:2: /v1/embeddings lines need a client opened with "
        "provider='openai'; this one is provider='anthropic' (see --provider); nothing was sent"
    ) in err
    assert not target.exists()


async def test_skip_invalid_records_lines_the_provider_cannot_send(tmp_path: Path) -> None:
    """With skip_invalid, such lines are recorded as invalid_url errors and never sent."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    line = {"custom_id": "m", "method": "POST", "url": "/v1/messages", "body": {}}
    line["body"] = {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    source.write_text(json.dumps(line) + "\n")
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        summary = await trio_llm.run_batch(source, target, client=client, skip_invalid=True)
    (record,) = output_lines(target)
    assert record["error"]["code"] == "invalid_url"
    assert "need a client opened with provider='anthropic'" in record["error"]["message"]
    assert (summary.invalid, server.stats.total_requests) == (1, 0)
