"""What a batch run did (:class:`BatchSummary`), and what both kinds of run share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, final

import attrs
import trio

from .._errors import LLMError
from ._input import Invalid
from ._output import error_record

if TYPE_CHECKING:
    from .._client import ClientStatistics
    from ._input import InputPlan
    from ._progress import Counters

__all__ = [
    "BatchSummary",
    "ProviderBatch",
    "ViaProvider",
    "invalid_record",
    "naming",
    "summarize",
]


def _at_least_one(_instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name} must be an int >= 1 (or None), not {value!r}")


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 seconds, not {value!r}")


@final
@attrs.frozen(kw_only=True)
class ViaProvider:
    """How ``run_batch(..., via=ViaProvider(...))`` uses the provider's Batch API.

    ``via="provider"`` is ``via=ViaProvider()``. See ``docs/batch.md`` (``--via provider``).

    Attributes:
        poll_interval: seconds between two polls of a batch.
        max_batch_lines: the most lines in one batch (``None``: the provider's limit,
            50,000 for OpenAI, 100,000 for Anthropic).
        max_batch_bytes: the most bytes in one batch (``None``: the provider's limit,
            200 MB for OpenAI, 255 MB for Anthropic).
        cancel: cancel the job's running batches, merge what they answered, and submit
            nothing new.
    """

    poll_interval: float = attrs.field(default=30.0, validator=_positive)
    max_batch_lines: int | None = attrs.field(default=None, validator=_at_least_one)
    max_batch_bytes: int | None = attrs.field(default=None, validator=_at_least_one)
    cancel: bool = False


@final
@attrs.frozen(kw_only=True)
class ProviderBatch:
    """One batch of a ``via="provider"`` job, as the run left it.

    Attributes:
        part: its number in the job (from 0).
        id: the provider's batch id (``None`` if it was never created).
        status: the job's word for it: ``planned``, ``uploading``, ``creating``,
            ``running``, ``ended`` (results not merged yet), ``merged`` or ``dropped``
            (``--cancel`` before it was created).
        remote_status: the provider's own status (``in_progress``, ``completed``, ...).
        outcome: how it ended: ``completed``, ``failed``, ``expired``, ``cancelled``.
        lines: its input lines.
        done: requests the provider processed.
        failed: requests that ended in an error, as the provider counts them.
    """

    part: int
    id: str | None
    status: str
    remote_status: str | None
    outcome: str | None
    lines: int
    done: int
    failed: int


@final
@attrs.frozen(kw_only=True)
class BatchSummary:
    """What a batch run did.

    Every input line ends up in exactly one of ``skipped``, ``succeeded``, ``failed``,
    ``invalid`` and ``unanswered``.

    Attributes:
        input_path: the input file.
        output_path: the output file.
        total: request lines in the input (blank lines are not counted).
        succeeded: lines answered successfully by this run.
        failed: lines answered with an error by this run (an error status that was not
            retried, or the retries ran out, or the deadline passed).
        invalid: invalid input lines recorded as error lines by this run
            (``skip_invalid``).
        skipped: lines already answered in the output file, not sent again.
        skipped_failed: of ``skipped``, those answered with an error (kept, since
            ``retry_failed`` was off).
        unanswered: lines with no answer yet (the run was interrupted, or stopped):
            rerun to send them.
        retries: retry attempts the client made during the run.
        rate_limited: 429 responses the client received during the run.
        prompt_tokens: prompt tokens of the answers, as the server reported them.
        completion_tokens: completion tokens of the answers.
        tokens: ``prompt_tokens + completion_tokens``.
        elapsed: seconds the run took, by the trio clock.
        scan_elapsed: of ``elapsed``, the seconds spent before sending: scanning the
            output file and checking the input.
        interrupted: the run was stopped by SIGINT or SIGTERM (``handle_signals``).
        stopped: why the run stopped sending before the end, in one line, when an error
            showed that no request could succeed (see :func:`run_batch`); ``None`` if
            it did not stop so. E.g. ``"every request gets 401 invalid_api_key from
            https://api.openai.com/v1 (Incorrect API key provided)"``.
        stop_error: the error that stopped the run (``None`` with ``stopped``).
        cache_hits: lines of ``succeeded`` answered from the client's response cache
            (nothing sent; their tokens are not in ``tokens``, nor their cost in ``cost``).
        cost: what this run's answers cost in USD (see ``reply.cost``): real spend only,
            replies from the response cache cost nothing; ``None`` when some had no
            known price. With ``via="provider"``, at the provider's Batch API prices.
        max_cost: the run's budget in USD (``run_batch(max_cost=...)``), if it had one.
        over_budget: the run stopped starting requests because the next one might not
            have fitted in ``max_cost``; the lines not sent are ``unanswered``, and a
            rerun sends them with a new budget.
        via: ``"online"`` (each line sent as a request) or ``"provider"`` (the
            provider's Batch API).
        batches: with ``via="provider"``, the job's batches at the provider, as this run
            left them.
    """

    input_path: str
    output_path: str
    total: int
    succeeded: int
    failed: int
    invalid: int
    skipped: int
    skipped_failed: int
    unanswered: int
    retries: int
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    elapsed: float
    interrupted: bool
    stopped: str | None = None
    stop_error: LLMError | None = None
    cache_hits: int = 0
    scan_elapsed: float = 0.0
    cost: float | None = None
    max_cost: float | None = None
    over_budget: bool = False
    via: str = "online"
    batches: tuple[ProviderBatch, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every input line has its answer in the output file."""
        return self.unanswered == 0

    @property
    def errors(self) -> int:
        """Lines whose answer in the output file is an error."""
        return self.failed + self.invalid + self.skipped_failed

    @property
    def all_succeeded(self) -> bool:
        """Whether every input line is answered, and successfully."""
        return self.complete and self.errors == 0


def invalid_record(path: str, item: Invalid) -> bytes:
    """Return the output line of an invalid input line of ``path`` (``skip_invalid``)."""
    return error_record(
        None if item.keyed_by_line else item.custom_id,
        code=item.code,
        message=f"{path}:{item.line}: {item.reason}",
        line=item.line,
    )


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Name ``path`` in the ``OSError``\\ s of descriptor calls (``write``, ``fsync``...)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = path
        raise


def summarize(
    plan: InputPlan,
    output_path: str,
    counters: Counters,
    *,
    skipped: int,
    before: ClientStatistics,
    after: ClientStatistics,
    started: float,
    interrupted: bool,
    stopped: str | None,
    stop_error: LLMError | None,
    **particular: Any,
) -> BatchSummary:
    """Say what a run did (online or through the provider's Batch API), from its plan, its
    counters, the client's statistics before and after, and the clock at its start;
    ``particular``: the fields only one kind of run sets."""
    return BatchSummary(
        input_path=plan.path,
        output_path=output_path,
        total=plan.total,
        succeeded=counters.succeeded,
        failed=counters.failed,
        invalid=counters.invalid,
        skipped=skipped,
        skipped_failed=plan.answered_failed,
        unanswered=plan.total - skipped - counters.handled,
        retries=after.retried - before.retried,
        rate_limited=after.rate_limited - before.rate_limited,
        prompt_tokens=counters.prompt_tokens,
        completion_tokens=counters.completion_tokens,
        tokens=counters.prompt_tokens + counters.completion_tokens,
        elapsed=trio.current_time() - started,
        interrupted=interrupted,
        stopped=stopped,
        stop_error=stop_error,
        cache_hits=after.cache_hits - before.cache_hits,
        scan_elapsed=plan.scan_elapsed,
        cost=None if counters.unpriced else counters.cost,
        **particular,
    )
