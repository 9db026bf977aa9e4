"""The batch progress line: columns that fit the terminal, Ctrl-C's echo, retry reasons."""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import attrs
import pytest
import trio

import trio_llm
from trio_llm import ClientStatistics
from trio_llm.batch._progress import (
    SCAN_SHOWN_AFTER,
    Counters,
    Reporter,
    Watched,
    open_reporter,
    open_scan_progress,
    print_summary,
    retry_reason,
)
from trio_llm.batch._terminal import BAR_MIN, DROPPED_FIRST, ECHO_ROOM, fit

BAR_CELLS = "━╸╺"
# Every column's text for a run at 1,056 of 5,000 lines (the widths fit() is given).
WIDTHS = {
    "spinner": 1,
    "label": 5,
    "count": 11,
    "percent": 4,
    "rate": 9,
    "eta": 10,
    "failed": 10,
    "retries": 11,
    "tokens": 15,
    "cost": 23,  # "• cost $0.0123 of $5.00"
    "reason": 60,
}


def screen(output: str, width: int) -> list[str]:
    """Play ``output`` on a terminal ``width`` cells wide (with autowrap); return its lines.

    Knows what rich's live display sends: text, CR, LF, erase line, cursor up, and
    styles and cursor visibility (ignored).
    """
    lines: list[list[str]] = [[]]
    row = column = 0
    for match in re.finditer(r"\x1b\[([0-9;?]*)([A-Za-z])|(.)", output, re.DOTALL):
        params, command, char = match.groups()
        if command == "K":
            lines[row] = []
        elif command == "A":
            row = max(0, row - int(params or 1))
        elif command is not None:
            continue
        elif char == "\r":
            column = 0
        elif char == "\n":
            row, column = row + 1, 0
        else:
            if column == width:  # the last cell was written: this character wraps
                row, column = row + 1, 0
            while len(lines) <= row:
                lines.append([])
            cells = lines[row]
            cells.extend(" " * (column + 1 - len(cells)))
            cells[column] = char
            column += 1
        while len(lines) <= row:
            lines.append([])
    return ["".join(cells).rstrip() for cells in lines if "".join(cells).strip()]


def bar_cells(line: str) -> int:
    """How many cells of ``line`` the bar takes."""
    return sum(line.count(cell) for cell in BAR_CELLS)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make stderr a terminal for rich (captured by capsys); set its width with COLUMNS."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.delenv("TERM", raising=False)


@pytest.fixture
async def client() -> AsyncIterator[trio_llm.Client]:
    """A client that is never used to send (the reporter reads its statistics only)."""
    async with trio_llm.open_client(base_url="http://127.0.0.1:9/v1", model="m") as client:
        yield client


@attrs.define
class RetryingClient:
    """Stands in for a client whose requester keeps the error of its latest retry."""

    client: trio_llm.Client
    retried: int = 0
    _requester: Any = attrs.field(factory=lambda: SimpleNamespace(last_retry_error=None))

    def retry(self, error: Exception) -> None:
        """Count a retry decided after ``error``, as the client does."""
        self.retried += 1
        self._requester.last_retry_error = error

    def statistics(self) -> ClientStatistics:
        """The real client's statistics, with this double's retries."""
        return attrs.evolve(self.client.statistics(), retried=self.retried)


def open_bar(client: object, counters: Counters, *, total: int = 5_000) -> Reporter:
    """Open the reporter ``run_batch(progress=True)`` opens, for ``total`` lines."""
    watched = Watched(
        client=cast("trio_llm.Client", client),
        counters=counters,
        total=total,
        answered_before=0,
        to_handle=total,
    )
    return open_reporter(watched, enabled=True, interval=10.0)


async def redraw(reporter: Reporter) -> None:
    """Let the reporter redraw once (it does every 0.1 s)."""
    with trio.move_on_after(0.15):
        await reporter.run()


async def bar_at_1056_of_5000(client: object) -> Reporter:
    """Start a bar, then show it at 1,056 of 5,000 lines, 5 s later."""
    counters = Counters()
    reporter = open_bar(client, counters)
    reporter.start("5,000 lines in in.jsonl; sending 5,000 -> out.jsonl")
    await trio.sleep(5.0)
    counters.succeeded = 1_056
    counters.prompt_tokens, counters.completion_tokens = 16_896, 23_616
    await redraw(reporter)
    return reporter


async def test_the_bar_stays_at_80_columns_and_the_label_and_tokens_go(
    terminal: None,
    client: trio_llm.Client,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 80 columns the bar and the whole count stay; the label and the tokens drop."""
    monkeypatch.setenv("COLUMNS", "80")
    await bar_at_1056_of_5000(client)
    line = screen(capsys.readouterr().err, 80)[-1]
    assert bar_cells(line) >= BAR_MIN
    assert " 1,056/5,000  21% • " in line
    for shown in ("/s • ETA 0:", "• failed 0 • retries 0"):
        assert shown in line
    assert "…" not in line
    assert "batch" not in line
    assert "tokens" not in line


async def test_at_60_columns_the_rate_and_the_percentage_go_too(
    terminal: None,
    client: trio_llm.Client,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 60 columns the bar, count, ETA, failures and retries stay; rate and % drop."""
    monkeypatch.setenv("COLUMNS", "60")
    await bar_at_1056_of_5000(client)
    line = screen(capsys.readouterr().err, 60)[-1]
    assert bar_cells(line) >= BAR_MIN
    assert re.search(r" 1,056/5,000 • ETA 0:\d\d • failed 0 • retries 0$", line), line
    assert "%" not in line
    assert "/s" not in line


def test_columns_drop_in_order_as_the_terminal_narrows() -> None:
    """Narrowing drops DROPPED_FIRST's columns in order, never the bar or the count."""
    previous: set[str] | None = None
    for width in range(200, 29, -1):
        layout = fit(WIDTHS, width)
        shown = set(layout.columns)
        dropped = [name for name in DROPPED_FIRST if name not in shown]
        assert dropped == list(DROPPED_FIRST[: len(dropped)]), width
        assert previous is None or shown <= previous, width
        assert {"bar", "count"} <= shown
        assert layout.bar_width >= BAR_MIN
        line = sum(layout.bar_width if name == "bar" else WIDTHS[name] for name in shown)
        cut = WIDTHS["reason"] - layout.reason_width
        assert line - cut + len(shown) - 1 <= width - ECHO_ROOM, width
        previous = shown
    assert previous == {"bar", "count"}
    assert set(fit(WIDTHS, 200).columns) == {"bar", *WIDTHS}


async def test_ctrl_c_echo_leaves_no_stale_bar_above_the_note(
    terminal: None,
    client: trio_llm.Client,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The terminal's "^C" echo fits on the bar's line, so the note replaces that line."""
    monkeypatch.setenv("COLUMNS", "80")
    reporter = await bar_at_1056_of_5000(client)
    sys.stderr.write("^C")  # what the terminal echoes when Ctrl-C is pressed
    reporter.note("SIGINT: starting no new requests")
    await redraw(reporter)
    lines = screen(capsys.readouterr().err, 80)
    assert lines[:2] == [
        "trio-llm batch: 5,000 lines in in.jsonl; sending 5,000 -> out.jsonl",
        "trio-llm batch: SIGINT: starting no new requests",
    ]
    assert len(lines) == 3
    assert bar_cells(lines[2]) >= BAR_MIN


async def test_the_last_line_of_a_stopped_run_says_stopped_not_an_eta(
    terminal: None,
    client: trio_llm.Client,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run closed before its last line leaves a line that says it stopped, with no ETA."""
    monkeypatch.setenv("COLUMNS", "100")
    reporter = await bar_at_1056_of_5000(client)
    reporter.close()
    lines = screen(capsys.readouterr().err, 100)
    assert "1,056/5,000  21%" in lines[-1]
    assert "• stopped •" in lines[-1]
    assert "ETA" not in lines[-1]


async def test_the_bar_says_why_requests_are_being_retried(
    terminal: None,
    client: trio_llm.Client,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While requests are retried, the line ends with the latest error, cut to fit."""
    monkeypatch.setenv("COLUMNS", "80")
    retrying = RetryingClient(client)
    counters = Counters()
    reporter = open_bar(retrying, counters, total=300)
    reporter.start("300 lines in in.jsonl; sending 300 -> out.jsonl")
    await redraw(reporter)
    assert "retrying" not in screen(capsys.readouterr().err, 80)[-1]
    retrying.retry(trio_llm.ServerError("Service Unavailable", status_code=503))
    await redraw(reporter)
    line = screen(capsys.readouterr().err, 80)[-1]
    assert line.endswith("• retrying: 503 Service Unavailable"), line
    assert bar_cells(line) >= BAR_MIN
    monkeypatch.setenv("COLUMNS", "60")
    reporter = open_bar(retrying, counters, total=300)
    reporter.start("again, at 60 columns")
    retrying.retry(trio_llm.ServerError("Service Unavailable", status_code=503))
    await redraw(reporter)
    line = screen(capsys.readouterr().err, 60)[-1]
    assert re.search(r"• retrying: 503 Se\S*…$", line), line


async def test_the_retry_reason_goes_once_retries_stop(
    terminal: None,
    client: trio_llm.Client,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten seconds after the last retry, the line no longer blames its error."""
    monkeypatch.setenv("COLUMNS", "120")
    retrying = RetryingClient(client)
    reporter = open_bar(retrying, Counters(), total=300)
    reporter.start("300 lines")
    retrying.retry(trio_llm.ServerError("Bad Gateway", status_code=502))
    await redraw(reporter)
    assert "retrying: 502 Bad Gateway" in screen(capsys.readouterr().err, 120)[-1]
    await trio.sleep(10.0)
    await redraw(reporter)
    line = screen(capsys.readouterr().err, 120)[-1]
    assert "retries 1" in line
    assert "retrying" not in line


async def test_plain_progress_lines_say_why_requests_are_being_retried(
    client: trio_llm.Client,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off a terminal, the progress line ends with the latest retry's error too."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    retrying = RetryingClient(client)
    reporter = open_bar(retrying, Counters(), total=300)
    reporter.start("300 lines")
    retrying.retry(trio_llm.RateLimitError("Rate limit reached", status_code=429))
    reporter.close()
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("trio-llm batch: 0/300 (0%) | ")
    assert last.endswith(" | in flight 0 | retrying: 429 Rate limit reached")


def test_the_retry_reason_leaves_out_the_url_and_its_credentials() -> None:
    """A connection error's reason says what failed, not where (the URL may hold a key)."""
    url = "http://user:SECRET@example.invalid/v1/chat/completions?api_key=SECRET"
    refused = trio_llm.APIConnectionError(
        f"Connection error on POST {url}: ConnectError: cannot connect to example.invalid",
        method="POST",
        url=url,
    )
    assert retry_reason(refused) == "ConnectError: cannot connect to example.invalid"
    timeout = trio_llm.APITimeoutError(
        f"ReadTimeout on POST {url}: timed out\nmore detail", method="POST", url=url
    )
    assert retry_reason(timeout) == "ReadTimeout: timed out"
    idle = trio_llm.APITimeoutError(
        f"no event from POST {url} within stream_idle=5s", method="POST", url=url
    )
    assert retry_reason(idle) == "no event from the server within stream_idle=5s"


async def test_a_client_keeps_its_latest_retry_error_for_the_progress_line(
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real client retrying 503s puts "retrying: 503 ..." on the progress line."""
    from trio_llm.testing import FakeLLMConfig, open_fake_llm

    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    policy = trio_llm.RetryPolicy(attempts=3)
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=503)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", retry=policy) as failing,
    ):
        reporter = open_bar(failing, Counters(), total=1)
        reporter.start("1 line")
        with pytest.raises(trio_llm.ServerError):
            await failing.chat("hi")
        reporter.close()
    last = capsys.readouterr().err.splitlines()[-1]
    assert "| retries 2 |" in last
    assert last.endswith(" | retrying: 503 Injected error: 503 Service Unavailable."), last


# --- the passes before sending -------------------------------------------------------

GB = 10**9


def frames(output: str) -> list[str]:
    """The lines rich's live display drew one over the other (styles left out)."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.replace("\r\x1b[2K", "\0"))
    return [frame for frame in plain.split("\0") if frame.strip()]


async def scan_4_gb(width: int, *, what: str = "scanning out.jsonl", fail: bool = False) -> None:
    """Scan 3 GB of output, then check 1 GB of input, a second a gigabyte."""
    with open_scan_progress(4 * GB, enabled=True, interval=10.0) as scanning:
        scanning.phase(what)
        for _ in range(3):
            await trio.sleep(1.0)
            scanning.advance(GB)
        scanning.phase("checking in.jsonl")
        await trio.sleep(1.0)
        if fail:
            raise trio_llm.BatchInputError("in.jsonl:1: bad", path="in.jsonl", line=1, reason="bad")
        scanning.advance(GB)
    assert scanning.elapsed == pytest.approx(4.0)


async def test_the_scan_shows_a_bar_then_how_long_it_took(
    terminal: None,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bar of bytes read with the elapsed time; then one line saying how long it took."""
    monkeypatch.setenv("COLUMNS", "80")
    await scan_4_gb(80)
    err = capsys.readouterr().err
    drawn = frames(err)[:-1]
    assert any(
        re.fullmatch(r"\S scanning out\.jsonl ━+\S* +75% 3\.00/4\.00 GB 0:03 ETA 0:01", line)
        for line in drawn
    ), drawn
    assert all(len(line) <= 80 - ECHO_ROOM for line in drawn)
    assert screen(err, 80)[-1] == (
        "trio-llm batch: scanning out.jsonl, checking in.jsonl: done in 4.0 s (4.00 GB)"
    )


async def test_a_long_path_is_cut_to_fit_the_scan_bar(
    terminal: None,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 60 columns a long path ends in an ellipsis; the numbers and the bar stay."""
    monkeypatch.setenv("COLUMNS", "60")
    await scan_4_gb(60, what="scanning /data/batches/2024/very-long-output-file-name.jsonl")
    drawn = frames(capsys.readouterr().err)[:-1]
    assert all(len(line) <= 60 - ECHO_ROOM for line in drawn), drawn
    assert any(
        re.fullmatch(r"\S scanning /\S*… ━+\S* +75% 3\.00/4\.00 GB 0:03 ETA 0:01", line)
        for line in drawn
    ), drawn


async def test_a_failed_scan_says_no_done(
    terminal: None,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bar goes, and no line says the passes were done: the error says what happened."""
    with pytest.raises(trio_llm.BatchInputError):
        await scan_4_gb(80, fail=True)
    assert "done in" not in capsys.readouterr().err


async def test_a_short_scan_shows_nothing(
    terminal: None, autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """Passes that take less than SCAN_SHOWN_AFTER draw no bar and print no line."""
    with open_scan_progress(GB, enabled=True, interval=10.0) as scanning:
        scanning.phase("scanning out.jsonl")
        await trio.sleep(SCAN_SHOWN_AFTER / 2)
        scanning.advance(GB)
    assert capsys.readouterr().err == ""


async def test_plain_scan_progress_is_a_line_every_interval(
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off a terminal: a line every interval while scanning, then how long it took."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    with open_scan_progress(4 * GB, enabled=True, interval=2.0) as scanning:
        scanning.phase("scanning out.jsonl")
        for _ in range(4):
            await trio.sleep(1.0)
            scanning.advance(GB)
    assert capsys.readouterr().err.splitlines() == [
        "trio-llm batch: scanning out.jsonl: 50% of 4.00 GB read in 2 s",
        "trio-llm batch: scanning out.jsonl: 100% of 4.00 GB read in 4 s",
        "trio-llm batch: scanning out.jsonl: done in 4.0 s (4.00 GB)",
    ]
    with open_scan_progress(4 * GB, enabled=False, interval=2.0) as quiet:
        await trio.sleep(3.0)
        quiet.advance(GB)
    assert capsys.readouterr().err == ""
    assert quiet.elapsed == pytest.approx(3.0)


def test_the_summary_says_how_long_the_scan_took(capsys: pytest.CaptureFixture[str]) -> None:
    """The summary table has the seconds spent before sending, and a rate without them."""
    from trio_llm.batch._runner import BatchSummary

    fields: dict[str, Any] = dict.fromkeys(
        ("total", "succeeded", "failed", "invalid", "skipped", "skipped_failed", "unanswered",
         "retries", "rate_limited", "prompt_tokens", "completion_tokens", "tokens"), 0,
    )  # fmt: skip
    fields.update(total=1_000_000, skipped=999_000, succeeded=1_000)
    summary = BatchSummary(
        input_path="in.jsonl", output_path="out.jsonl", elapsed=14.0, scan_elapsed=12.0,
        interrupted=False, **fields,
    )  # fmt: skip
    print_summary(summary)
    err = capsys.readouterr().err
    assert re.search(r"elapsed +14\.0 s \(500\.0 lines/s\)", err), err
    assert re.search(r"of which scanning the files +12\.0 s", err), err
