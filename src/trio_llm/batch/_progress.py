"""Progress of a batch on stderr: a rich progress bar on a terminal, plain lines otherwise.

rich renders the bar, the notes above it and the final summary table. Its live display
normally refreshes from a thread of its own; here ``auto_refresh`` is off and a task in
the run's nursery refreshes it at most 10 times a second, reading counters the run only
increments, so the hot path pays nothing for it and no thread is started.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from typing import TYPE_CHECKING, Final

import attrs
import trio

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from .._client import Client, ClientStatistics
    from ._runner import BatchSummary

__all__ = ["Counters", "Reporter", "Watched", "open_reporter", "print_summary"]

_TERMINAL_REFRESH: Final = 0.1  # seconds between redraws of the bar: 10 a second at most
_RATE_WINDOW: Final = 10.0  # seconds of history behind the rate and the ETA


@attrs.define(kw_only=True, slots=True)
class Counters:
    """What this run has done so far; the run increments, the reporter reads."""

    succeeded: int = 0
    failed: int = 0
    invalid: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def handled(self) -> int:
        """Lines answered (or recorded) by this run."""
        return self.succeeded + self.failed + self.invalid


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"


@attrs.frozen(kw_only=True)
class _Snapshot:
    done: int
    total: int
    rate: float
    eta: float
    failed: int
    retries: int
    rate_limited: int
    tokens: int
    in_flight: int

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


@attrs.frozen(kw_only=True)
class Watched:
    """What a reporter watches.

    Attributes:
        client: the run's client (for retries, 429s and requests in flight).
        counters: the run's counters.
        total: lines in the input.
        answered_before: lines already answered in OUTPUT when the run started.
        to_handle: lines this run has to answer (or record).
    """

    client: Client
    counters: Counters
    total: int
    answered_before: int
    to_handle: int


class Reporter:
    """Reports a run's progress; this base class reports nothing (``progress=False``)."""

    def __init__(self, watched: Watched) -> None:
        self._client = watched.client
        self._counters = watched.counters
        self._total = watched.total
        self._before = watched.answered_before
        self._to_handle = watched.to_handle
        self._base: ClientStatistics = watched.client.statistics()
        self._samples: deque[tuple[float, int]] = deque()

    def start(self, text: str) -> None:
        """Say what the run is about to do, and start showing progress."""

    def note(self, text: str) -> None:
        """Show a message (above the bar on a terminal)."""

    async def run(self) -> None:
        """Report until cancelled."""
        await trio.sleep_forever()

    def close(self) -> None:
        """Show the final state and stop."""

    def snapshot(self) -> _Snapshot:
        """Read the counters now (at most a few times a second: not free)."""
        now = trio.current_time()
        counters = self._counters
        handled = counters.handled
        samples = self._samples
        samples.append((now, handled))
        while len(samples) > 2 and now - samples[1][0] >= _RATE_WINDOW:
            samples.popleft()
        then, handled_then = samples[0]
        rate = (handled - handled_then) / (now - then) if now > then else 0.0
        remaining = self._to_handle - handled
        eta = remaining / rate if rate > 0 else (0.0 if remaining <= 0 else math.inf)
        stats = self._client.statistics()
        return _Snapshot(
            done=self._before + handled,
            total=self._total,
            rate=rate,
            eta=eta,
            failed=counters.failed + counters.invalid,
            retries=stats.retried - self._base.retried,
            rate_limited=stats.rate_limited - self._base.rate_limited,
            tokens=counters.prompt_tokens + counters.completion_tokens,
            in_flight=stats.in_flight,
        )


class _PlainReporter(Reporter):
    """One line every ``interval`` seconds: for logs, CI and pipes."""

    def __init__(self, watched: Watched, *, interval: float) -> None:
        super().__init__(watched)
        self._interval = interval

    def _print(self, text: str) -> None:
        print(f"trio-llm batch: {text}", file=sys.stderr, flush=True)

    def start(self, text: str) -> None:
        self._samples.append((trio.current_time(), 0))
        self._print(text)

    def note(self, text: str) -> None:
        self._print(text)

    async def run(self) -> None:
        while True:
            await trio.sleep(self._interval)
            self._report()

    def _report(self) -> None:
        s = self.snapshot()
        self._print(
            f"{s.done:,}/{s.total:,} ({s.percent:.0f}%) | {s.rate:,.1f} lines/s | "
            f"ETA {_duration(s.eta)} | failed {s.failed:,} | retries {s.retries:,} | "
            f"429s {s.rate_limited:,} | tokens {s.tokens:,} | in flight {s.in_flight}"
        )

    def close(self) -> None:
        self._report()


class _TerminalReporter(Reporter):
    """A rich progress bar, redrawn by :meth:`run` at most 10 times a second."""

    def __init__(self, watched: Watched, *, console: Console) -> None:
        super().__init__(watched)
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        self._console = console
        self._progress: Progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]batch"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            auto_refresh=False,  # no refresh thread: run() redraws
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task: TaskID | None = None

    def start(self, text: str) -> None:
        self._samples.append((trio.current_time(), 0))
        self._console.print(f"trio-llm batch: {text}", highlight=False, soft_wrap=True)
        self._task = self._progress.add_task(
            "batch", total=self._total, completed=self._before, stats=""
        )
        self._progress.start()
        self._redraw()

    def note(self, text: str) -> None:
        self._console.print(f"trio-llm batch: {text}", highlight=False, soft_wrap=True)

    async def run(self) -> None:
        while True:
            await trio.sleep(_TERMINAL_REFRESH)
            self._redraw()

    def _redraw(self) -> None:
        if self._task is None:
            return
        s = self.snapshot()
        failed = f"[red]failed {s.failed:,}[/]" if s.failed else "failed 0"
        stats = (
            f"{s.done:,}/{s.total:,} {s.percent:3.0f}% • {s.rate:,.1f}/s • "
            f"ETA {_duration(s.eta)} • {failed} • retries {s.retries:,} • tokens {s.tokens:,}"
        )
        self._progress.update(self._task, completed=s.done, stats=stats)
        self._progress.refresh()

    def close(self) -> None:
        self._redraw()
        self._progress.stop()


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def open_reporter(watched: Watched, *, enabled: bool, interval: float) -> Reporter:
    """Return the reporter for this run: none, a terminal bar, or plain lines."""
    if not enabled:
        return Reporter(watched)
    console = _stderr_console()
    # rich's own test: a terminal, not TERM=dumb, and TTY_INTERACTIVE=0 not set.
    if console.is_interactive:
        return _TerminalReporter(watched, console=console)
    return _PlainReporter(watched, interval=interval)


def print_summary(summary: BatchSummary) -> None:
    """Print a run's summary table on stderr (plain text when it is not a terminal)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"trio-llm batch: {summary.output_path}",
        box=box.SIMPLE,
        show_header=False,
        title_justify="left",
    )
    table.add_column("what")
    table.add_column("lines", justify="right")
    table.add_row("lines in input", f"{summary.total:,}")
    if summary.skipped:
        detail = f" ({summary.skipped_failed:,} with an error)" if summary.skipped_failed else ""
        table.add_row("answered before this run", f"{summary.skipped:,}{detail}")
    table.add_row("answered OK", f"{summary.succeeded:,}")
    table.add_row("failed", f"{summary.failed:,}")
    if summary.invalid:
        table.add_row("invalid lines recorded", f"{summary.invalid:,}")
    if summary.unanswered:
        table.add_row("not answered yet", f"{summary.unanswered:,}")
    table.add_row("retries", f"{summary.retries:,}")
    table.add_row("429s received", f"{summary.rate_limited:,}")
    table.add_row(
        "tokens",
        f"{summary.tokens:,} ({summary.prompt_tokens:,} prompt + "
        f"{summary.completion_tokens:,} completion)",
    )
    handled = summary.succeeded + summary.failed + summary.invalid
    rate = handled / summary.elapsed if summary.elapsed > 0 else 0.0
    table.add_row("elapsed", f"{summary.elapsed:,.1f} s ({rate:,.1f} lines/s)")
    _stderr_console().print(table)
