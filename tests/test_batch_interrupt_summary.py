"""trio-llm batch: a Ctrl-C as a run ends still gets the summary and the resume line."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from trio_llm._cli import main
from trio_llm.batch import _command, _runner
from trio_llm.batch._progress import print_summary


@pytest.fixture
def argv(tmp_path: Path) -> list[str]:
    """`trio-llm batch` arguments for 3 short lines against the built-in fake server."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"custom_id": f"r{i}", "prompt": "hi"}) + "\n" for i in range(3))
    )
    return ["batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--simulate"]


def test_ctrl_c_while_the_summary_prints_loses_nothing(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C pressed as the summary prints: the table and the last line still print."""
    original = print_summary

    def ctrl_c_then_print(summary: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        original(summary)

    monkeypatch.setattr(_command, "print_summary", ctrl_c_then_print)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "lines in input" in err  # the summary table
    assert err.splitlines()[-1].startswith("trio-llm batch: done: all 3 lines answered OK")


def test_ctrl_c_unread_as_the_run_ends_still_gets_the_summary(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C the run's receiver has not read when it closes: summary, not 'before sending'."""
    original = _runner._Run.send_all

    async def send_all_then_ctrl_c(self: Any, limit: int) -> None:
        await original(self, limit)
        os.kill(os.getpid(), signal.SIGINT)  # queued in the receiver, which closes next

    monkeypatch.setattr(_runner._Run, "send_all", send_all_then_ctrl_c)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "before sending" not in err
    assert "lines in input" in err  # the summary table
    assert err.splitlines()[-1].startswith("trio-llm batch: done: all 3 lines answered OK")


def test_ctrl_c_while_the_client_closes_still_gets_the_summary(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C after the run, as the client closes: the summary and status still print."""
    original = _command._open_batch_client

    @asynccontextmanager
    async def ctrl_c_on_close(args: Any) -> AsyncIterator[Any]:
        async with original(args) as client:
            yield client
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(_command, "_open_batch_client", ctrl_c_on_close)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "before sending" not in err
    assert "lines in input" in err  # the summary table
    assert err.splitlines()[-1].startswith("trio-llm batch: done: all 3 lines answered OK")


def test_ctrl_c_just_before_the_receiver_is_installed_interrupts_the_run(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C in the instant before the run's signal receiver is installed (delivered as
    KeyboardInterrupt there) is the run's first signal: it stops gently, with the summary
    and exit 130, never trio's "child exited without calling task_status.started()"."""
    real = _runner.trio.open_signal_receiver
    calls = 0

    @contextmanager
    def ctrl_c_first(*signums: int) -> Iterator[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyboardInterrupt
        with real(*signums) as receiver:
            yield receiver

    monkeypatch.setattr(_runner.trio, "open_signal_receiver", ctrl_c_first)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "SIGINT: starting no new requests" in err
    assert "lines in input" in err  # the summary table
    assert "Traceback" not in err
    assert calls == 2  # watching again for a second Ctrl-C
