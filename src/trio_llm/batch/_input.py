"""Checking a batch input file: one streaming pass finds every problem and plans the run.

Lines are parsed and checked by ``_parse`` (:func:`parse_line`); blank lines are ignored;
line numbers count every physical line, from 1.

:func:`check_input` is the first pass: it reads every line, finds every problem (with
its line number) and duplicate ``custom_id``, and marks which lines the run must handle,
before anything is sent. The run's own pass re-reads the file and parses only those.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from typing import IO, Final, final

import attrs
import trio

from .._errors import BatchInputError
from ._keys import FAILED, OK, SEEN, AnsweredKeys, key_hash
from ._lines import Bits, chunks, estimate_lines, file_identity, read_lines
from ._parse import (
    CHAT_URL,
    EMBEDDINGS_URL,
    MESSAGES_URL,
    NO_URL_REFUSED,
    Invalid,
    Request,
    checked_line,
    duplicate_line,
    fast_custom_id,
    parse_line,
    unsendable_urls,
    wrong_provider,
)
from ._progress import ScanProgress
from ._shard import Shard

__all__ = [
    "CHAT_URL",
    "EMBEDDINGS_URL",
    "MESSAGES_URL",
    "Bits",
    "InputPlan",
    "Invalid",
    "Request",
    "check_input",
    "duplicate_line",
    "file_identity",
    "parse_line",
    "read_lines",
    "unsendable_urls",
    "wrong_provider",
]

# How many problems an error message lists; the count covers them all.
_LISTED_PROBLEMS: Final = 10
# Lines parsed between two checkpoints, so a long pass never starves other tasks.
_LINES_PER_CHECKPOINT: Final = 2048


@final
@attrs.define(kw_only=True)
class InputPlan:
    """What the first pass found, and what the run must do.

    Attributes:
        path: the input file, as given.
        total: non-blank lines.
        to_send: valid lines not answered yet: the requests to send.
        to_record: invalid lines to record as error lines (only with ``skip_invalid``).
        answered_ok: lines already answered successfully in OUTPUT.
        answered_failed: lines already answered with an error in OUTPUT.
        handle: the lines the run must handle (send or record), by line number.
        duplicates: line number -> (custom_id, line of its first occurrence), for each
            line repeating an earlier ``custom_id``.
        identity: the input file's (device, inode, size, mtime), to notice a change.
        unsendable: url -> why the client cannot send it (such lines are invalid).
        models: the models the lines to send name (``""``: the client's default).
        scan_elapsed: seconds the passes before sending took (scanning OUTPUT, then
            this check), as the run measured them.
        shard: the shard the run handles (``None``: the whole file); ``total`` and the
            rest count its lines only.
        other_shards: non-blank lines of the other shards (not checked, not handled).
    """

    path: str
    total: int = 0
    to_send: int = 0
    to_record: int = 0
    answered_ok: int = 0
    answered_failed: int = 0
    handle: Bits = attrs.Factory(Bits)
    duplicates: dict[int, tuple[str, int]] = attrs.Factory(dict)
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)
    unsendable: Mapping[str, str] = NO_URL_REFUSED
    scan_elapsed: float = 0.0
    shard: Shard | None = None
    other_shards: int = 0
    models: set[str] = attrs.Factory(set)


async def _locate_duplicates(
    file: IO[bytes],
    suspects: dict[int, int],
    default_model: str | None,
    unsendable: Mapping[str, str],
    progress: ScanProgress,
) -> tuple[dict[int, tuple[str, int]], list[Request | Invalid]]:
    """Confirm suspected duplicates exactly, in a second pass over the file.

    The first pass compares 64-bit hashes; this one compares the strings of the lines
    whose hashes are suspect (``suspects``: line number -> hash of its ``custom_id``).

    Returns:
        line -> (custom_id, line of its first occurrence), for each true duplicate; and
        the suspects that were only hash collisions, parsed, to be planned as usual.
    """
    wanted = set(suspects.values())
    first_line: dict[str, int] = {}
    duplicates: dict[int, tuple[str, int]] = {}
    collided: list[Request | Invalid] = []
    read = 0
    for number, raw in read_lines(file):
        read += len(raw)
        if number % _LINES_PER_CHECKPOINT == 0:
            await trio.lowlevel.checkpoint()
            progress.advance(read)
            read = 0
        custom_id = fast_custom_id(raw)[0]
        if custom_id is None:  # the line may still have one orjson cannot read
            custom_id = parse_line(
                raw, number, default_model=default_model, unsendable=unsendable
            ).custom_id
        if custom_id is None or key_hash(custom_id) not in wanted:
            continue
        first = first_line.setdefault(custom_id, number)
        if number in suspects:
            if first < number:
                duplicates[number] = (custom_id, first)
            else:
                collided.append(
                    parse_line(raw, number, default_model=default_model, unsendable=unsendable)
                )
    progress.advance(read)
    return duplicates, collided


def _problem_message(path: str, problems: list[Invalid], count: int) -> str:
    def describe(problem: Invalid) -> str:
        return f"{path}:{problem.line}: {problem.reason}"

    if count == 1:
        return f"{describe(problems[0])}; nothing was sent"
    listed = "\n".join(f"  {describe(problem)}" for problem in problems)
    more = f"\n  ... and {count - len(problems)} more" if count > len(problems) else ""
    return f"{path}: {count} invalid lines; nothing was sent:\n{listed}{more}"


class _Planner:
    """Count each checked line into the plan: answered already, to send, or to record.

    Invalid lines not answered already are problems: the first few (by line number) are
    kept for the error message, and all are counted.
    """

    __slots__ = ("_failed_lines", "_keys", "failed_flag", "plan", "problem_count", "problems")

    def __init__(self, plan: InputPlan, answered: AnsweredKeys, *, retry_failed: bool) -> None:
        self.plan = plan
        self._keys = answered.keys
        # With retry_failed, lines answered with an error count as unanswered: their error
        # lines are removed before the run.
        self.failed_flag = 0 if retry_failed else FAILED
        self._failed_lines: set[int] = set() if retry_failed else answered.failed_lines
        self.problems: list[Invalid] = []
        self.problem_count = 0

    def answered(self, flags: int) -> bool:
        """Count a line whose ``custom_id`` has ``flags`` if OUTPUT answers it; say if so."""
        if flags & OK:
            self.plan.answered_ok += 1
            return True
        if flags & self.failed_flag:
            self.plan.answered_failed += 1
            return True
        return False

    def add(self, item: Request | Invalid) -> None:
        """Plan ``item``'s line, answered or not."""
        if isinstance(item, Invalid) and item.keyed_by_line:
            if item.line in self._failed_lines:
                self.plan.answered_failed += 1
                return
        elif item.custom_id is None:  # pragma: no cover - keyed_by_line covers it
            raise AssertionError(item)
        elif self.answered(self._keys.flags(item.custom_id)):
            return  # (an invalid line: answered before it was changed)
        self.handle(item)

    def handle(self, item: Request | Invalid) -> None:
        """Plan the line of ``item``, which OUTPUT does not answer: to send, or to record."""
        plan = self.plan
        if isinstance(item, Invalid):
            self._add_problem(item)
            plan.to_record += 1
        else:
            plan.to_send += 1
            plan.models.add(item.body.get("model") or "")
        plan.handle.set(item.line)

    def _add_problem(self, item: Invalid) -> None:
        problems = self.problems
        self.problem_count += 1
        if len(problems) < _LISTED_PROBLEMS or item.line < problems[-1].line:
            # Keep the first few by line number (duplicates are decided last).
            bisect.insort(problems, item, key=lambda problem: problem.line)
            del problems[_LISTED_PROBLEMS:]

    def error(self) -> BatchInputError:
        """Return the error that reports the problems (there must be some)."""
        path = self.plan.path
        first = self.problems[0]
        return BatchInputError(
            _problem_message(path, self.problems, self.problem_count),
            path=path,
            line=first.line,
            reason=first.reason,
            custom_id=first.custom_id,
            invalid_lines=self.problem_count,
        )


@final
class _CheckingPlanner(_Planner):
    """A :class:`_Planner` that gives each valid line to plan to a further check first.

    Used only when ``check_input`` has a ``line_check``: the common path pays nothing.
    """

    __slots__ = ("_check",)

    def __init__(
        self,
        plan: InputPlan,
        answered: AnsweredKeys,
        *,
        retry_failed: bool,
        check: Callable[[Request], Invalid | None],
    ) -> None:
        super().__init__(plan, answered, retry_failed=retry_failed)
        self._check = check

    def handle(self, item: Request | Invalid) -> None:
        """Plan ``item``'s line as :meth:`_Planner.handle`, invalid if the check says so."""
        if isinstance(item, Request):
            item = self._check(item) or item
        super().handle(item)


async def check_input(
    file: IO[bytes],
    path: str,
    answered: AnsweredKeys,
    *,
    default_model: str | None,
    skip_invalid: bool,
    retry_failed: bool,
    unsendable: Mapping[str, str] = NO_URL_REFUSED,
    shard: Shard | None = None,
    progress: ScanProgress | None = None,
    line_check: Callable[[Request], Invalid | None] | None = None,
) -> InputPlan:
    """Run the first pass over the input: check every line, plan the run.

    Args:
        file: the input, open in binary mode.
        path: its name, for messages.
        answered: what OUTPUT already answers (lines found there are not handled again);
            the ids of the input's lines are added to its table (flagged ``SEEN``).
        default_model: the model for bodies that name none.
        skip_invalid: plan to record invalid lines as error lines instead of failing.
        retry_failed: plan to handle again the lines OUTPUT answers with an error.
        unsendable: url -> why the client cannot send it (see :func:`parse_line`).
        shard: plan only this shard's lines (see ``_shard``); the others are skipped.
        progress: told of each block read.
        line_check: a further check of each valid line the run must handle (a Batch
            API's limits): an :class:`Invalid` it returns makes the line invalid.

    Raises:
        BatchInputError: some lines are invalid (and not recorded in OUTPUT already), and
            ``skip_invalid`` is false.

    Memory: a 64-bit hash and a byte per ``custom_id`` (see ``_keys``), a bit per line.

    Cancellation: nothing is planned; ``answered`` keeps some of the input's ids flagged
    ``SEEN``, which the next check clears.
    """
    progress = progress or ScanProgress()
    progress.phase(f"checking {path}")
    plan = InputPlan(path=path, identity=file_identity(file), unsendable=unsendable, shard=shard)
    planner = (
        _Planner(plan, answered, retry_failed=retry_failed)
        if line_check is None
        else _CheckingPlanner(plan, answered, retry_failed=retry_failed, check=line_check)
    )
    answered.keys.clear(SEEN)  # from an earlier check with the same keys, if any
    answered.keys.reserve(estimate_lines(file))  # (when resuming, it has room already)
    suspects = await _check_lines(file, planner, answered, default_model, progress)
    if suspects:
        progress.phase(f"confirming duplicates in {path}", more=plan.identity[2])
        plan.duplicates, collided = await _locate_duplicates(
            file, suspects, default_model, unsendable, progress
        )
        for number, (custom_id, first_line) in plan.duplicates.items():
            planner.add(duplicate_line(number, custom_id, first_line))
        for item in collided:
            planner.add(item)
    if planner.problem_count and not skip_invalid:
        raise planner.error()
    return plan


async def _check_lines(
    file: IO[bytes],
    planner: _Planner,
    answered: AnsweredKeys,
    default_model: str | None,
    progress: ScanProgress,
) -> dict[int, int]:
    """Check and plan each line of ``file``; return the suspected duplicates.

    Only the lines OUTPUT does not answer are checked in full: for the others, only the
    ``custom_id`` matters (an answered line is not handled again, valid or not). Each
    line is read with orjson first; the standard library has the last word where orjson
    refuses a line, or a check fails (see :func:`fast_custom_id`).

    Returns:
        line -> hash of its ``custom_id``, for each line whose ``custom_id`` hash an
        earlier line had: maybe a duplicate, decided once the whole file is read.
    """
    plan = planner.plan
    unsendable, shard = plan.unsendable, plan.shard
    mark, failed_flag = answered.keys.mark, planner.failed_flag
    suspects: dict[int, int] = {}
    number = total = answered_ok = answered_failed = 0
    for chunk in chunks(file):
        await trio.lowlevel.checkpoint()
        progress.advance(len(chunk))
        lines = chunk.split(b"\n")
        last = lines[-1]  # b"" after a newline, else the file's last line, which has none
        if not last:
            lines.pop()
        for raw in lines:
            number += 1
            if not raw or raw.isspace():
                continue
            # parse_line reads each line with its newline, as the file iteration gave it
            ending = b"" if raw is last else b"\n"
            custom_id, payload = fast_custom_id(raw)
            item: Request | Invalid | None = None
            if custom_id is None:
                item = parse_line(
                    raw + ending, number, default_model=default_model, unsendable=unsendable
                )
                custom_id = item.custom_id
            if shard is not None and not shard.owns(custom_id, number):
                plan.other_shards += 1
                continue
            total += 1
            if custom_id is None:
                assert item is not None
                planner.add(item)
                continue
            before = mark(custom_id, SEEN)
            if before & SEEN:  # maybe a duplicate: decided once the whole file is read
                suspects[number] = key_hash(custom_id)
            elif before & OK:
                answered_ok += 1
            elif before & failed_flag:
                answered_failed += 1
            else:
                if item is None:
                    item = checked_line(payload, raw, ending, number, default_model, unsendable)
                planner.handle(item)
    plan.total += total
    plan.answered_ok += answered_ok
    plan.answered_failed += answered_failed
    return suspects
