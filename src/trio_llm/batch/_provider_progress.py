"""Progress of a ``--via provider`` job: each batch's status and request counts.

On a terminal, a rich display with one line per batch (status, a bar of the requests the
provider has processed, failures), redrawn by a task of the run at most 10 times a
second, as the online bar is (no thread). Elsewhere (logs, CI, pipes), a plain line each
time a batch's status changes, and at most every ``interval`` seconds while its counts
grow.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Final

import trio

from ._job import Part

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["ProviderReporter", "describe", "open_provider_reporter"]

_REFRESH: Final = 0.1


def describe(part: Part) -> str:
    """Say where a batch is: ``part 0: in_progress 1,200/5,000, 3 failed (batch_abc)``.

    The batch's id comes last: a terminal too narrow for the line cuts it first.
    """
    name = f"part {part.index}"
    if part.status in ("planned", "uploading", "creating", "dropped"):
        return f"{name}: {part.status} ({part.count:,} lines)"
    if part.status == "merged":
        ok, errors = part.answered
        ended = part.outcome or part.remote_status
        return f"{name}: {ended}, merged: {ok:,} OK, {errors:,} with an error ({part.batch_id})"
    total = part.total or part.count
    failed = f", {part.failed:,} failed" if part.failed else ""
    return f"{name}: {part.remote_status} {part.done:,}/{total:,}{failed} ({part.batch_id})"


class ProviderReporter:
    """Reports a job's progress; this base class reports nothing (``progress=False``)."""

    def start(self, text: str) -> None:
        """Say what the run is about to do."""

    def note(self, text: str) -> None:
        """Show a message."""

    def changed(self, part: Part) -> None:
        """Show that ``part`` changed (its status, its counts)."""

    async def run(self) -> None:
        """Report until cancelled."""
        await trio.sleep_forever()

    def close(self) -> None:
        """Stop reporting."""


def _say(text: str) -> None:
    print(f"trio-llm batch: {text}", file=sys.stderr, flush=True)


class _PlainReporter(ProviderReporter):
    """A line per status change; counts at most every ``interval`` seconds."""

    def __init__(self, *, interval: float) -> None:
        self._interval = interval
        # part -> (its status, the trio time and the text of the line shown last)
        self._shown: dict[int, tuple[str, float, str]] = {}

    def start(self, text: str) -> None:
        _say(text)

    def note(self, text: str) -> None:
        _say(text)

    def changed(self, part: Part) -> None:
        status = f"{part.status}/{part.remote_status}"
        now = trio.current_time()
        text = describe(part)
        shown = self._shown.get(part.index)
        if shown is not None and (
            shown[2] == text or (shown[0] == status and now - shown[1] < self._interval)
        ):
            return  # nothing new, or only counts that were shown lately
        self._shown[part.index] = (status, now, text)
        _say(text)


class _TerminalReporter(ProviderReporter):
    """A rich display: one line per batch, redrawn by :meth:`run`."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        self._console = Console(stderr=True)
        self._progress: Progress = Progress(
            SpinnerColumn(),
            BarColumn(bar_width=10),
            TextColumn("{task.fields[text]}"),
            console=self._console,
            auto_refresh=False,  # no refresh thread: run() redraws
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._tasks: dict[int, TaskID] = {}
        self._started = False

    def start(self, text: str) -> None:
        self._console.print(f"trio-llm batch: {text}", highlight=False, soft_wrap=True)
        self._progress.start()
        self._started = True

    def note(self, text: str) -> None:
        self._console.print(f"trio-llm batch: {text}", highlight=False, soft_wrap=True)

    def changed(self, part: Part) -> None:
        total = part.total or part.count
        done = total if part.status == "merged" else part.done
        task = self._tasks.get(part.index)
        if task is None:
            task = self._tasks[part.index] = self._progress.add_task("batch", total=total, text="")
        self._progress.update(task, total=total, completed=done, text=describe(part))

    async def run(self) -> None:
        while True:
            await trio.sleep(_REFRESH)
            self._progress.refresh()

    def close(self) -> None:
        if self._started:
            self._progress.refresh()
            self._progress.stop()


def open_provider_reporter(*, enabled: bool, interval: float) -> ProviderReporter:
    """Return the reporter of a job: none, a terminal display, or plain lines."""
    if not enabled:
        return ProviderReporter()
    from rich.console import Console

    if Console(stderr=True).is_interactive:
        return _TerminalReporter()
    return _PlainReporter(interval=interval)
