"""What a batch run did: :class:`BatchSummary`."""

from __future__ import annotations

from typing import final

import attrs

from .._errors import LLMError

__all__ = ["BatchSummary"]


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
            known price.
        max_cost: the run's budget in USD (``run_batch(max_cost=...)``), if it had one.
        over_budget: the run stopped starting requests because the next one might not
            have fitted in ``max_cost``; the lines not sent are ``unanswered``, and a
            rerun sends them with a new budget.
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
