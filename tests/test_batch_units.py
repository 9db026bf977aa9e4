"""Batch pieces on their own: error lines, output checks, long files, command messages."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import trio_llm
from trio_llm._cli import build_parser
from trio_llm.batch import _command
from trio_llm.batch._input import parse_line
from trio_llm.batch._output import failure_record
from trio_llm.batch._runner import BatchSummary
from trio_llm.testing import FakeLLMServer

if sys.version_info >= (3, 11):
    group = BaseExceptionGroup  # noqa: F821 - a builtin from 3.11 on
else:  # pragma: no cover - trio's own dependency on 3.10
    from exceptiongroup import BaseExceptionGroup as group


def record(line: bytes) -> dict[str, Any]:
    """Decode one output line."""
    assert line.endswith(b"\n")
    decoded: dict[str, Any] = json.loads(line)
    return decoded


def test_failure_records_name_the_kind_of_failure() -> None:
    """Each error becomes an error line with a stable code (and the response when any)."""
    status = trio_llm.NotFoundError(
        "no such model",
        status_code=404,
        body={"error": {"message": "no such model"}},
        request_id="req_1",
        code="model_not_found",
    )
    line = record(failure_record("a", status))
    assert line["error"] == {"code": "model_not_found", "message": str(status)}
    assert line["response"] == {
        "status_code": 404,
        "request_id": "req_1",
        "body": {"error": {"message": "no such model"}},
    }
    plain = trio_llm.APIStatusError("teapot", status_code=418)
    assert record(failure_record("a", plain))["error"]["code"] == "http_418"
    deadline = trio_llm.RetryDeadlineExceeded(
        "too late", deadline=1.0, attempts=3, last_error=trio_llm.ServerError("x", status_code=503)
    )
    line = record(failure_record("a", deadline))
    assert (line["error"]["code"], line["response"]["status_code"]) == ("deadline_exceeded", 503)
    cases: list[tuple[trio_llm.LLMError, str]] = [
        (trio_llm.APITimeoutError("slow"), "timeout"),
        (trio_llm.APIConnectionError("refused"), "connection_error"),
        (trio_llm.APIResponseError("bad", status_code=200, request_id=None), "invalid_response"),
        (trio_llm.ConfigurationError("no model"), "client_error"),
    ]
    for error, code in cases:
        line = record(failure_record("a", error))
        assert (line["custom_id"], line["error"]["code"]) == ("a", code)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"custom_id": null, "prompt": "x"}', "not null"),
        (b'{"custom_id": true, "prompt": "x"}', "not a boolean"),
        (b'{"custom_id": {}, "prompt": "x"}', "not an object"),
        (b'{"custom_id": "a", "prompt": "x", "messages": []}', "either 'prompt' or 'messages'"),
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
            b'"body": {"messages": ["hi"]}}',
            "body.messages[0] must be an object, not a string",
        ),
    ],
)
def test_more_invalid_lines(raw: bytes, reason: str) -> None:
    """Wrong types are named in JSON's terms."""
    parsed = parse_line(raw, 1, default_model="m")
    assert isinstance(parsed, trio_llm.batch._input.Invalid)
    assert reason in parsed.reason


@pytest.mark.parametrize(
    "value", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]], ids=["str", "strs", "ids", "idss"]
)
def test_embedding_inputs_that_are_accepted(value: object) -> None:
    """Embedding input: a string, strings, token ids, or lists of token ids."""
    body = {"input": value}
    raw = json.dumps(
        {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": body}
    ).encode()
    assert isinstance(parse_line(raw, 1, default_model="m"), trio_llm.batch._input.Request)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ({"custom_id": 5, "error": None}, "custom_id is not a string"),
        ({"custom_id": "a", "error": "boom"}, "error is neither null nor an object"),
        ({"custom_id": "a", "error": None}, "neither a response nor an error"),
        ({"id": "x"}, "no custom_id"),
    ],
)
async def test_output_lines_that_are_not_batch_output(
    tmp_path: Path, fake_llm: FakeLLMServer, line: dict[str, Any], problem: str
) -> None:
    """Output lines are checked for the fields a resume relies on."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a", "prompt": "hi"}\n')
    target = tmp_path / "out.jsonl"
    target.write_text(json.dumps(line) + "\n")
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(trio_llm.BatchInputError, match=problem):
            await trio_llm.run_batch(source, target, client=client)


async def test_long_files_are_scanned_checked_and_compacted(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """5,000 answered lines (some failed, blank lines between): resumed and compacted."""
    count = 5000
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with source.open("w") as requests, target.open("w") as answers:
        for i in range(count):
            requests.write(json.dumps({"custom_id": f"r{i}", "prompt": f"q{i}"}) + "\n")
            failed = i % 1000 == 0
            answer = {
                "id": f"b{i}",
                "custom_id": f"r{i}",
                "response": None if failed else {"status_code": 200, "body": {}},
                "error": {"code": "timeout", "message": "x"} if failed else None,
            }
            answers.write(json.dumps(answer) + "\n" + ("\n" if i % 999 == 0 else ""))
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        resumed = await trio_llm.run_batch(source, target, client=client)
        retried = await trio_llm.run_batch(source, target, client=client, retry_failed=True)
    assert (resumed.skipped, resumed.skipped_failed, resumed.succeeded) == (count, 5, 0)
    assert (retried.skipped, retried.succeeded) == (count - 5, 5)
    lines = target.read_text().splitlines()
    assert len(lines) == count
    assert all(json.loads(line)["error"] is None for line in lines)


async def test_unusual_text_survives_the_round_trip(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """Non-ASCII text is written as UTF-8; a lone surrogate in a custom_id, escaped."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"custom_id": "café", "prompt": "naïve ☕ \\ud83d\\ude00"}\n'
        '{"custom_id": "odd\\ud800", "prompt": "x"}\n',
        encoding="utf-8",
    )
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        summary = await trio_llm.run_batch(source, target, client=client)
        again = await trio_llm.run_batch(source, target, client=client)
    assert (summary.succeeded, again.skipped) == (2, 2)
    text = target.read_text("utf-8")
    assert '"custom_id":"café"' in text
    assert '"custom_id":"odd\\ud800"' in text


def test_a_body_that_cannot_be_sent_as_utf8_is_invalid() -> None:
    """A lone surrogate escape in a body is refused up front; a proper pair is fine."""
    lone = b'{"custom_id": "a", "prompt": "x \\udc00 y"}'
    parsed = parse_line(lone, 1, default_model="m")
    assert isinstance(parsed, trio_llm.batch._input.Invalid)
    assert "lone surrogate" in parsed.reason
    pair = b'{"custom_id": "a", "prompt": "x \\ud83d\\ude00 y"}'
    assert isinstance(parse_line(pair, 1, default_model="m"), trio_llm.batch._input.Request)


async def test_connection_failures_become_error_lines(tmp_path: Path) -> None:
    """No server: each line records a connection_error, and the run completes."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a", "prompt": "hi"}\n')
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1", model="m", retry=None
    ) as client:
        summary = await trio_llm.run_batch(source, target, client=client)
    line = json.loads(target.read_text())
    assert line["error"]["code"] == "connection_error"
    assert (summary.failed, summary.complete, summary.all_succeeded) == (1, True, False)


def batch_args(*extra: str) -> argparse.Namespace:
    """Parse a `trio-llm batch` command line."""
    return build_parser().parse_args(["batch", "in.jsonl", "-o", "out.jsonl", *extra])


def summary(**fields: Any) -> BatchSummary:
    """A summary with zeros but for ``fields``."""
    counts = (
        "total succeeded failed invalid skipped skipped_failed unanswered retries "
        "rate_limited prompt_tokens completion_tokens tokens"
    )
    base: dict[str, Any] = dict.fromkeys(counts.split(), 0)
    base.update(input_path="in.jsonl", output_path="out.jsonl", elapsed=1.0, interrupted=False)
    base.update(fields)
    return BatchSummary(**base)


def test_resume_command_repeats_the_flags_that_matter() -> None:
    """The resume hint repeats non-default flags, quoted for a shell."""
    args = batch_args("--model", "my model", "--rpm", "60", "--simulate", "--skip-invalid")
    assert _command._resume_command(args) == (
        "trio-llm batch in.jsonl -o out.jsonl --model 'my model' --rpm 60 --simulate --skip-invalid"
    )


def test_exit_statuses_follow_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """0 all OK, 1 some errors, 130 interrupted, each with its closing line."""
    args = batch_args()
    assert _command._exit_status(summary(total=3, succeeded=3), args) == 0
    assert _command._exit_status(summary(total=3, succeeded=2, failed=1), args) == 1
    interrupted = summary(total=3, succeeded=1, unanswered=2, interrupted=True)
    assert _command._exit_status(interrupted, args) == 130
    err = capsys.readouterr().err
    assert "done: all 3 lines answered OK in out.jsonl" in err
    assert "1 of 3 lines answered with an error" in err
    assert "interrupted: 1 of 3 lines answered in out.jsonl, 2 not yet" in err
    assert "run the same command again: trio-llm batch in.jsonl -o out.jsonl" in err


def test_failures_are_reported_through_exception_groups(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Errors wrapped by nurseries get their own message and status; others propagate."""
    args = batch_args()
    assert _command._report_failure(group("g", [KeyboardInterrupt()]), args) == 130
    assert _command._report_failure(group("g", [OSError(28, "No space left")]), args) == 3
    assert _command._report_failure(trio_llm.APIConnectionError("down"), args) == 1
    output_error = trio_llm.BatchInputError("bad", path="out.jsonl", line=1, reason="bad")
    assert _command._report_failure(output_error, args) == 2
    err = capsys.readouterr().err
    assert "interrupted before sending" in err
    assert "No space left; rerun the same command to resume" in err
    assert "--skip-invalid" not in err  # only for input problems
    with pytest.raises(group):
        _command._report_failure(group("g", [ValueError(), TypeError()]), args)
    with pytest.raises(ValueError, match="bug"):
        _command._report_failure(ValueError("bug"), args)
