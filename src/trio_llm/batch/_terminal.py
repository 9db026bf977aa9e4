"""The progress bar of a batch on a terminal, laid out again for the width at each redraw.

Imported only when a bar is drawn (rich's progress module costs import time). The line,
left to right::

    ⠋ batch ━━━━━━━━━━ 1,056/5,000  21% • 205.0/s • ETA 0:22 • failed 0 • retries 3 • ...

As the terminal narrows, secondary columns go first, one at a time, in
:data:`DROPPED_FIRST` order; the bar (at least :data:`BAR_MIN` cells) and the
``done/total`` count always stay. The line also stays :data:`ECHO_ROOM` cells short of
the terminal's width: the terminal echoes Ctrl-C as ``^C`` after the line, and an echo
that wrapped to the next line would leave the bar behind, stale, above the next message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import attrs
import trio
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
)
from rich.table import Column
from rich.text import Text

from ._progress import (
    SCAN_SHOWN_AFTER,
    Reporter,
    ScanProgress,
    Snapshot,
    Watched,
    cost_text,
    format_duration,
    format_size,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "BAR_MIN",
    "DISPLAYED",
    "DROPPED_FIRST",
    "ECHO_ROOM",
    "Layout",
    "TerminalReporter",
    "TerminalScanProgress",
    "bar_cells",
    "fit",
]

_REFRESH: Final = 0.1  # seconds between redraws of the bar: 10 a second at most
BAR_MIN: Final = 10  # cells: a narrower bar says nothing the count does not
_BAR_MAX: Final = 40  # cells: rich's default bar width
ECHO_ROOM: Final = 2  # cells left free for the terminal's "^C" echo
_REASON_MIN: Final = 16  # cells: "• retrying: 503…" says little in fewer
_REASON_WANTED: Final = 40  # cells the reason gets before any less important column

# Left to right; "bar" and "count" are always shown.
DISPLAYED: Final = (
    "spinner",
    "label",
    "bar",
    "count",
    "percent",
    "rate",
    "eta",
    "failed",
    "retries",
    "tokens",
    "cost",
    "reason",
)
# What goes first as the terminal narrows. The label repeats the "trio-llm batch:" lines
# above the bar; tokens, rate and percent are nice to have, then the cost (and budget);
# why requests are retried, when the run ends and what failed go last. The reason shows
# only while retrying, the cost only when every answer so far has a price.
DROPPED_FIRST: Final = (
    "label",
    "tokens",
    "rate",
    "percent",
    "cost",
    "retries",
    "spinner",
    "reason",
    "eta",
    "failed",
)


@attrs.frozen(kw_only=True)
class Layout:
    """The columns that fit a width, and the cells given to the flexible ones.

    Attributes:
        columns: the names of the columns shown, left to right.
        bar_width: cells of the bar.
        reason_width: cells of the retry reason (0 when it is not shown).
    """

    columns: tuple[str, ...]
    bar_width: int
    reason_width: int


def fit(widths: Mapping[str, int], width: int) -> Layout:
    """Choose the columns that fit a terminal ``width`` cells wide.

    Columns are kept from the most important down (:data:`DROPPED_FIRST` read
    backwards) until one does not fit; it and every less important one are dropped, so a
    narrower terminal never shows a column that a wider one dropped. The retry reason
    takes up to 40 cells before any less important column, or all that is left if that
    is at least :data:`_REASON_MIN` cells (it is cut to fit). Cells left over go to the
    reason, up to its whole text, then to the bar, up to 40 cells.

    Args:
        widths: the cells each column's text needs, by name; a column missing here or
            0 cells wide is not shown. The bar's entry is ignored.
        width: the terminal's width.
    """
    room = width - ECHO_ROOM
    shown = {"bar", "count"}
    used = BAR_MIN + 1 + widths.get("count", 0)
    reason_width = 0
    for name in reversed(DROPPED_FIRST):
        needed = widths.get(name, 0)
        if name == "reason" and needed:
            needed = min(needed, _REASON_WANTED, max(_REASON_MIN, room - used - 1))
        if not needed:
            continue
        if used + 1 + needed > room:
            break
        shown.add(name)
        used += 1 + needed
        if name == "reason":
            reason_width = needed
    spare = room - used  # negative when even the bar and the count do not fit
    if reason_width:
        grown = min(widths["reason"], reason_width + spare)
        spare -= grown - reason_width
        reason_width = grown
    bar_width = max(1, min(_BAR_MAX, BAR_MIN + spare))
    columns = tuple(name for name in DISPLAYED if name in shown)
    return Layout(columns=columns, bar_width=bar_width, reason_width=reason_width)


def bar_cells(s: Snapshot, *, final: bool = False) -> dict[str, Text]:
    """Return the text of each column of the bar's line for ``s`` (by name).

    The spinner's and the bar's entries only give their widths (rich draws them). The
    final line has no spinner; for a run that stopped early it says ``stopped`` where
    the ETA was.
    """
    most = f"{s.total:,}/{s.total:,}"
    cells = {
        "label": Text("batch", style="bold"),
        "bar": Text(),
        "count": Text(f"{s.done:,}/{s.total:,}".rjust(len(most))),
        "percent": Text(f"{s.percent:3.0f}%"),
        "rate": Text(f"• {s.rate:,.1f}/s"),
        "eta": Text("• stopped" if final and not s.finished else f"• ETA {format_duration(s.eta)}"),
        "failed": Text.assemble("• ", (f"failed {s.failed:,}", "red" if s.failed else "")),
        "retries": Text(f"• retries {s.retries:,}"),
        "tokens": Text(f"• tokens {s.tokens:,}"),
    }
    cost = cost_text(s)
    if cost:
        cells["cost"] = Text(f"• cost {cost}")
    if not final:
        cells["spinner"] = Text(" ")
    if s.reason:
        said = "last retry" if final else "retrying"
        cells["reason"] = Text.assemble("• ", (f"{said}: {s.reason}", "yellow"))
    return cells


class _Cell(ProgressColumn):
    """A column that shows the text of its name in ``task.fields["cells"]``."""

    def __init__(self, name: str) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self._name = name

    def render(self, task: Task) -> Text:
        """Return this column's text for ``task``."""
        cells: dict[str, Text] = task.fields["cells"]
        return cells[self._name]


class TerminalReporter(Reporter):
    """A rich progress bar, redrawn by :meth:`run` at most 10 times a second."""

    def __init__(self, watched: Watched, *, console: Console) -> None:
        super().__init__(watched)
        self._console = console
        self._bar = BarColumn(bar_width=BAR_MIN)
        self._columns: dict[str, ProgressColumn] = {
            name: _Cell(name) for name in DISPLAYED if name not in ("spinner", "bar")
        }
        self._columns.update(spinner=SpinnerColumn(), bar=self._bar)
        self._progress = Progress(
            *(self._columns[name] for name in DISPLAYED),
            console=console,
            auto_refresh=False,  # no refresh thread: run() redraws
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task: TaskID | None = None

    def start(self, text: str) -> None:
        self._samples.append((trio.current_time(), 0))
        self._console.print(f"trio-llm batch: {text}", highlight=False, soft_wrap=True)
        self._task = self._progress.add_task("batch", total=self._total, completed=self._before)
        self._lay_out()
        self._progress.start()  # draws the line

    def note(self, text: str) -> None:
        self._console.print(f"trio-llm batch: {text}", highlight=False, soft_wrap=True)

    async def run(self) -> None:
        while True:
            await trio.sleep(_REFRESH)
            self._redraw()

    def _redraw(self, *, final: bool = False) -> None:
        if self._task is None:
            return
        self._lay_out(final=final)
        self._progress.refresh()

    def _lay_out(self, *, final: bool = False) -> None:
        """Update the line's columns and texts for the counters and the width now."""
        assert self._task is not None
        s = self.snapshot()
        cells = bar_cells(s, final=final)
        # Read at each redraw: the terminal may have been resized.
        layout = fit({name: text.cell_len for name, text in cells.items()}, self._console.width)
        self._bar.bar_width = layout.bar_width
        self._progress.columns = tuple(self._columns[name] for name in layout.columns)
        if layout.reason_width:
            cells["reason"].truncate(layout.reason_width, overflow="ellipsis")
        self._progress.update(self._task, completed=s.done, cells=cells)

    def close(self) -> None:
        self._redraw(final=True)
        self._progress.stop()


_SCAN_BAR_MAX: Final = 20  # cells
_SCAN_TEXT_MIN: Final = 12  # cells of "scanning out.jsonl" kept, however narrow
_SCAN_CELLS: Final = ("text", "percent", "bytes", "elapsed", "eta")


class TerminalScanProgress(ScanProgress):
    """A bar of the bytes read before sending, redrawn at most 10 times a second.

    It appears once the passes have taken ``SCAN_SHOWN_AFTER`` seconds, and gives way
    to one line saying how long they took. The line, left to right::

        ⠋ scanning out.jsonl ━━━━━━━━━━━━━━━━━━━━  75% 3.00/4.00 GB 0:03 ETA 0:01

    The text (what is being read) is cut to fit, then the bar narrows; it stays
    :data:`ECHO_ROOM` cells short of the terminal's width (see the module's notes).
    """

    def __init__(self, total: int, *, console: Console) -> None:
        super().__init__(total)
        self._console = console
        self._bar = BarColumn(bar_width=_SCAN_BAR_MAX)
        self._progress = Progress(
            SpinnerColumn(),
            _Cell("text"),
            self._bar,
            *(_Cell(name) for name in _SCAN_CELLS[1:]),
            console=console,
            auto_refresh=False,  # no refresh thread: advance() redraws
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task: TaskID | None = None
        self._next = self._started + SCAN_SHOWN_AFTER

    def advance(self, size: int) -> None:
        self.done += size
        now = trio.current_time()
        if now < self._next:
            return
        self._next = now + _REFRESH
        cells = self._cells(now - self._started)
        if self._task is None:
            self._task = self._progress.add_task("scan", total=self.total, cells=cells)
            self._progress.start()
        self._progress.update(self._task, completed=self.done, total=self.total, cells=cells)
        self._progress.refresh()

    def _cells(self, elapsed: float) -> dict[str, Text]:
        """Return the texts of the line after ``elapsed`` seconds, and size the bar."""
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        done = format_size(self.done, like=self.total)[:-3]  # without its unit
        cells = {
            "text": Text(self.what, no_wrap=True),
            "percent": Text(f"{self._percent():3.0f}%"),
            "bytes": Text(f"{done}/{format_size(self.total)}"),
            "elapsed": Text(format_duration(elapsed)),
            "eta": Text(f"ETA {format_duration(eta)}"),
        }
        # The spinner, the other cells, and a space after each column but the last.
        others = 1 + sum(cells[name].cell_len for name in _SCAN_CELLS[1:]) + len(_SCAN_CELLS) + 1
        room = self._console.width - ECHO_ROOM - others
        cells["text"].truncate(max(_SCAN_TEXT_MIN, room - BAR_MIN), overflow="ellipsis")
        self._bar.bar_width = max(1, min(_SCAN_BAR_MAX, room - cells["text"].cell_len))
        return cells

    def _stop(self, *, done: bool) -> None:
        if self._task is None:
            return
        self._progress.stop()  # transient: the bar goes
        self._task = None
        if done:
            self._console.print(
                f"trio-llm batch: {self._done_text()}", highlight=False, soft_wrap=True
            )
