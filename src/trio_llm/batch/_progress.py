"""Progress of a batch on stderr: a rich progress bar on a terminal, plain lines otherwise.

rich renders the bar (:mod:`._terminal`, imported only when a bar is drawn), the notes
above it and the final summary table. Its live display normally refreshes from a thread
of its own; here ``auto_refresh`` is off and a task in the run's nursery refreshes it at
most 10 times a second, reading counters the run only increments, so the hot path pays
nothing for it and no thread is started.

While requests are being retried, the progress line also says why: the latest error a
retry was decided after, which the client keeps (``Requester.last_retry_error``).
"""

from __future__ import annotations

import math
import sys
from collections import deque
from typing import TYPE_CHECKING, Final

import attrs
import trio

from .._cost import format_usd
from .._errors import APIConnectionError, APIStatusError

if TYPE_CHECKING:
    from rich.console import Console

    from .._client import Client, ClientStatistics
    from ._budget import Budget
    from ._summary import BatchSummary

__all__ = [
    "SCAN_SHOWN_AFTER",
    "Counters",
    "Reporter",
    "ScanProgress",
    "Snapshot",
    "Watched",
    "cost_text",
    "format_duration",
    "format_size",
    "open_reporter",
    "open_scan_progress",
    "print_summary",
    "retry_reason",
]

_RATE_WINDOW: Final = 10.0  # seconds of history behind the rate and the ETA
# Seconds the reason for retries stays on the progress line after the last retry: long
# enough to read, short enough not to blame a cause that has gone away.
_REASON_SHOWN_FOR: Final = 10.0
#: Seconds the passes before sending run before their progress shows (a small file's
#: scan takes less, and would only flash a bar).
SCAN_SHOWN_AFTER: Final = 0.5


@attrs.define(kw_only=True, slots=True)
class Counters:
    """What this run has done so far; the run increments, the reporter reads."""

    succeeded: int = 0
    failed: int = 0
    invalid: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # USD of the answers with a known price
    unpriced: int = 0  # answers with no known price

    @property
    def handled(self) -> int:
        """Lines answered (or recorded) by this run."""
        return self.succeeded + self.failed + self.invalid

    def add_cost(self, cost: float | None) -> None:
        """Count an answer's cost (``None``: unknown)."""
        if cost is None:
            self.unpriced += 1
        else:
            self.cost += cost


def cost_text(s: Snapshot) -> str:
    """Say what a run has cost (``$0.0123``, ``$0.0123 of $5.00``).

    ``""`` when unknown, or nothing yet and there is no budget.
    """
    if s.cost is None or (not s.cost and s.max_cost is None):
        return ""
    budget = f" of {format_usd(s.max_cost)}" if s.max_cost is not None else ""
    return format_usd(s.cost) + budget


def format_duration(seconds: float) -> str:
    """Format ``seconds`` as ``M:SS`` or ``H:MM:SS`` (``?`` when not finite)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"


def retry_reason(error: BaseException) -> str:
    """Say in a few words why a request failed: ``503 Service Unavailable``.

    The request's URL is left out (it is the same for every line, and may hold
    credentials); only the first line of a message is kept.
    """
    if isinstance(error, APIStatusError):
        text = f"{error.status_code} {error.message}"
    elif isinstance(error, APIConnectionError):
        # "Connection error on POST <url>: ConnectError: ..." or "ReadTimeout on POST
        # <url>: ...": what follows the URL says what went wrong.
        text = str(error)
        if error.url:
            head, on_url, detail = text.partition(f" on {error.method} {error.url}: ")
            if on_url:
                text = detail if head.startswith("Connection error") else f"{head}: {detail}"
            request = f"{error.method} {error.url}" if error.method else error.url
            text = text.replace(request, "the server").replace(error.url, "the server")
    else:
        text = f"{type(error).__name__}: {error}"
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(error).__name__


def _latest_retry_error(client: Client) -> BaseException | None:
    """The error the client's latest retry was decided after, if it keeps it."""
    error = getattr(client._requester, "last_retry_error", None)
    return error if isinstance(error, BaseException) else None


@attrs.frozen(kw_only=True)
class Snapshot:
    """The counters of a run at one moment, as a progress line shows them.

    Attributes:
        reason: why requests are being retried (:func:`retry_reason` of the latest
            error), while they are; ``None`` when nothing was retried lately.
        finished: every line this run had to handle is handled.
        cost: what the run's answers cost so far, in USD (``None``: some have no price).
        max_cost: the run's budget, if it has one.
    """

    done: int
    total: int
    rate: float
    eta: float
    failed: int
    retries: int
    rate_limited: int
    tokens: int
    in_flight: int
    reason: str | None = None
    finished: bool = False
    cost: float | None = None
    max_cost: float | None = None

    @property
    def percent(self) -> float:
        """Lines answered, in percent of the input's."""
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
        budget: the run's budget, if it has one.
    """

    client: Client
    counters: Counters
    total: int
    answered_before: int
    to_handle: int
    budget: Budget | None = None


class Reporter:
    """Reports a run's progress; this base class reports nothing (``progress=False``)."""

    def __init__(self, watched: Watched) -> None:
        self._client = watched.client
        self._counters = watched.counters
        self._total = watched.total
        self._before = watched.answered_before
        self._to_handle = watched.to_handle
        self._budget = watched.budget
        self._base: ClientStatistics = watched.client.statistics()
        self._samples: deque[tuple[float, int]] = deque()
        self._retries_seen = 0
        self._retried_at = -math.inf  # trio time the retry count last grew

    def start(self, text: str) -> None:
        """Say what the run is about to do, and start showing progress."""

    def note(self, text: str) -> None:
        """Show a message (above the bar on a terminal)."""

    async def run(self) -> None:
        """Report until cancelled."""
        await trio.sleep_forever()

    def close(self) -> None:
        """Show the final state and stop."""

    def snapshot(self) -> Snapshot:
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
        retries = stats.retried - self._base.retried
        return Snapshot(
            done=self._before + handled,
            total=self._total,
            rate=rate,
            eta=eta,
            failed=counters.failed + counters.invalid,
            retries=retries,
            rate_limited=stats.rate_limited - self._base.rate_limited,
            tokens=counters.prompt_tokens + counters.completion_tokens,
            in_flight=stats.in_flight,
            reason=self._reason(retries, now),
            finished=remaining <= 0,
            cost=None if counters.unpriced else counters.cost,
            max_cost=None if self._budget is None else self._budget.max_cost,
        )

    def _reason(self, retries: int, now: float) -> str | None:
        """Why requests are being retried, if one was in the last ``_REASON_SHOWN_FOR`` s."""
        if retries != self._retries_seen:
            self._retries_seen = retries
            self._retried_at = now
        if now - self._retried_at >= _REASON_SHOWN_FOR:
            return None
        error = _latest_retry_error(self._client)
        return retry_reason(error) if error is not None else None


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
        reason = f" | retrying: {s.reason}" if s.reason else ""
        cost = f" | cost {cost_text(s)}" if cost_text(s) else ""
        self._print(
            f"{s.done:,}/{s.total:,} ({s.percent:.0f}%) | {s.rate:,.1f} lines/s | "
            f"ETA {format_duration(s.eta)} | failed {s.failed:,} | retries {s.retries:,} | "
            f"429s {s.rate_limited:,} | tokens {s.tokens:,}{cost} | in flight {s.in_flight}"
            f"{reason}"
        )

    def close(self) -> None:
        self._report()


def format_size(size: int, *, like: int | None = None) -> str:
    """Format a number of bytes: ``3.71 GB``, ``12.5 MB``, ``900 kB``.

    With ``like``, in the unit ``like`` would be written in (``0.52 GB`` beside ``3.71 GB``).
    """
    scale = size if like is None else like
    if scale >= 10**9:
        return f"{size / 10**9:.2f} GB"
    if scale >= 10**6:
        return f"{size / 10**6:.1f} MB"
    return f"{size / 10**3:.0f} kB"


class ScanProgress:
    """Progress of the passes before the first request: scanning OUTPUT, checking INPUT.

    The passes tell it each block they read (:meth:`advance`, a megabyte at a time:
    nothing per line). This base class shows nothing, and measures how long the passes
    take: leaving its ``with`` block sets :attr:`elapsed`. On a terminal a bar appears
    once they have taken ``SCAN_SHOWN_AFTER`` seconds (a small file's would only flash);
    elsewhere a line every ``interval`` seconds.

    Attributes:
        total: the bytes the passes are to read.
        done: the bytes read so far.
        what: what the pass going on does (``scanning out.jsonl``).
        elapsed: seconds the passes took (set on leaving the ``with`` block).
    """

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.done = 0
        self.what = ""
        self.elapsed = 0.0
        self._phases: list[str] = []
        self._started = trio.current_time()

    def __enter__(self) -> ScanProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.elapsed = trio.current_time() - self._started
        self._stop(done=exc_info[0] is None)

    def phase(self, what: str, *, more: int = 0) -> None:
        """Start a pass: ``what`` it does (``scanning out.jsonl``), ``more`` bytes to read."""
        self.what = what
        self.total += more
        self._phases.append(what)

    def advance(self, size: int) -> None:
        """Count ``size`` more bytes read."""
        self.done += size

    def _stop(self, *, done: bool) -> None:
        """Stop showing progress; if ``done`` (not failed), say how long it took if shown."""

    def _done_text(self) -> str:
        phases = ", ".join(self._phases)
        return f"{phases}: done in {self.elapsed:.1f} s ({format_size(self.done)})"

    def _percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


class _PlainScanProgress(ScanProgress):
    """A line every ``interval`` seconds, and one at the end if any was printed."""

    def __init__(self, total: int, *, interval: float) -> None:
        super().__init__(total)
        self._interval = interval
        self._next = self._started + interval
        self._shown = False

    def advance(self, size: int) -> None:
        self.done += size
        now = trio.current_time()
        if now >= self._next:
            self._next = now + self._interval
            self._shown = True
            print(
                f"trio-llm batch: {self.what}: {self._percent():.0f}% of "
                f"{format_size(self.total)} read in {now - self._started:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def _stop(self, *, done: bool) -> None:
        if self._shown and done:
            print(f"trio-llm batch: {self._done_text()}", file=sys.stderr, flush=True)


def open_scan_progress(total: int, *, enabled: bool, interval: float) -> ScanProgress:
    """Return the progress of the passes before sending: none, a bar, or plain lines."""
    if not enabled:
        return ScanProgress(total)
    console = _stderr_console()
    if console.is_interactive:
        from ._terminal import TerminalScanProgress

        return TerminalScanProgress(total, console=console)
    return _PlainScanProgress(total, interval=interval)


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
        from ._terminal import TerminalReporter

        return TerminalReporter(watched, console=console)
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
    if summary.cache_hits:
        table.add_row("  of which from the cache", f"{summary.cache_hits:,}")
    table.add_row("failed", f"{summary.failed:,}")
    if summary.invalid:
        table.add_row("invalid lines recorded", f"{summary.invalid:,}")
    if summary.unanswered:
        table.add_row("not answered yet", f"{summary.unanswered:,}")
    if summary.batches:  # --via provider
        statuses: dict[str, int] = {}
        for batch in summary.batches:
            statuses[batch.status] = statuses.get(batch.status, 0) + 1
        shown = ", ".join(f"{count} {status}" for status, count in statuses.items())
        table.add_row("batches of the job", shown)
    table.add_row("retries", f"{summary.retries:,}")
    table.add_row("429s received", f"{summary.rate_limited:,}")
    table.add_row(
        "tokens",
        f"{summary.tokens:,} ({summary.prompt_tokens:,} prompt + "
        f"{summary.completion_tokens:,} completion)",
    )
    cost = "unknown (a model has no price)" if summary.cost is None else format_usd(summary.cost)
    if summary.max_cost is not None:
        cost += f" (budget {format_usd(summary.max_cost)})"
    table.add_row("cost", cost)
    handled = summary.succeeded + summary.failed + summary.invalid
    sending = summary.elapsed - summary.scan_elapsed
    rate = handled / sending if sending > 0 else 0.0
    table.add_row("elapsed", f"{summary.elapsed:,.1f} s ({rate:,.1f} lines/s)")
    table.add_row("of which scanning the files", f"{summary.scan_elapsed:,.1f} s")
    _stderr_console().print(table)
