"""``run_batch``: send every line of a batch file once, resumably, writing each answer.

The run, in order:

1. Open OUTPUT (created if absent) and lock it, so a second run cannot write it too.
2. Scan OUTPUT: which ``custom_id``\\ s are answered already (a compact hash set).
3. Check INPUT, streaming: every problem is reported, with its line number, before
   anything is sent; the lines still to handle are marked (a bit per line).
4. Repair OUTPUT: cut off a partial last line; with ``retry_failed``, drop error lines.
5. Send: a second streaming pass feeds the marked lines to a fixed set of workers (the
   fan-out core, :func:`trio_llm.as_completed`); each worker writes its answer's line as
   soon as it has it. Memory stays O(concurrency) whatever the input's length.

Fail fast (see :func:`run_batch`): failures that may be a dead endpoint's are held back
until a success (or the end) shows they were the lines' own; when enough come in a row,
the run stops and their lines, like the unsent ones, are left for the rerun.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import IO, TYPE_CHECKING, Any, Final, final

import trio

from .._client import Client, ClientStatistics
from .._errors import (
    APIStatusError,
    ConfigurationError,
    LLMError,
)
from .._fanout import as_completed
from .._types import Usage
from ._budget import Budget
from ._input import (
    CHAT_URL,
    MESSAGES_URL,
    InputPlan,
    Invalid,
    Request,
    check_input,
    duplicate_line,
    file_identity,
    parse_line,
    unsendable_urls,
)
from ._input import wrong_provider as _wrong_provider  # noqa: F401 - its old home; tests use it
from ._job import refuse_if_batches_run
from ._keys import AnsweredKeys
from ._lines import marked_lines
from ._locked import names
from ._output import OutputFile, answer_record, failure_record
from ._progress import Counters, Reporter, Watched, open_reporter, open_scan_progress
from ._shard import Shard
from ._stops import brief, is_outage, is_systematic, status_stop
from ._summary import BatchSummary as BatchSummary
from ._summary import ProviderBatch as ProviderBatch
from ._summary import ViaProvider as ViaProvider
from ._summary import invalid_record, naming, summarize

if TYPE_CHECKING:
    from ._job_run import JobRun

__all__ = [
    "DEFAULT_MAX_CONSECUTIVE_FAILURES",
    "BatchSummary",
    "ProviderBatch",
    "ViaProvider",
    "invalid_record",
    "run_batch",
]

#: Lines in a row that fail like a dead or failing endpoint before a run stops.
DEFAULT_MAX_CONSECUTIVE_FAILURES: Final = 20


@final
class _Run:
    """One run's state: what to send, where answers go, and how to stop."""

    def __init__(
        self,
        *,
        client: Client,
        input_file: IO[bytes],
        plan: InputPlan,
        output: OutputFile,
        counters: Counters,
        reporter: Reporter,
        max_failures: int | None,
        budget: Budget | None = None,
    ) -> None:
        self._client = client
        self._budget = budget
        self._input = input_file
        self._plan = plan
        self._output = output
        self._counters = counters
        self._reporter = reporter
        self._default_model = client.model
        self._answered_before = plan.answered_ok + plan.answered_failed
        self._stopping = False
        self.interrupted = False
        self.scope = trio.CancelScope()
        self._max_failures = max_failures
        # The current run of failures that may be the endpoint's: (custom_id, error).
        self._held: list[tuple[str, LLMError]] = []
        self.stopped: str | None = None
        self.stop_error: LLMError | None = None
        self._write_error: OSError | None = None
        # Lines being sent, retries and their waits included (the client counts only
        # the requests holding a slot, none while they wait to retry).
        self._sending = 0

    def _work(self) -> Iterator[Request | Invalid]:
        """Yield the lines to handle, pulled one at a time by free workers.

        Lines answered already are skipped without being parsed (the first pass marked
        the others); once a stop is asked for, nothing more is yielded.
        """
        plan = self._plan
        handle = plan.handle
        unsendable = plan.unsendable
        with naming(plan.path):
            for number, raw in marked_lines(self._input, handle):
                if self._stopping:
                    return
                duplicate = plan.duplicates.get(number)
                if duplicate is not None:
                    yield duplicate_line(number, *duplicate)
                else:
                    yield parse_line(
                        raw, number, default_model=self._default_model, unsendable=unsendable
                    )

    async def _handle(self, item: Request | Invalid) -> None:
        """Answer one line and write its output line at once (never half of one)."""
        counters = self._counters
        if isinstance(item, Invalid):
            await trio.lowlevel.checkpoint()
            if self._write(invalid_record(self._plan.path, item)):
                counters.invalid += 1
            return
        budget = self._budget
        bound = 0.0 if budget is None else budget.reserve(item.body)
        if bound is None:  # over budget: start no more requests (this line stays unsent)
            self._stopping = True
            return
        try:
            body, request_id, usage, cost = await self._send(item)
        except BaseException as exc:
            if budget is not None:
                budget.release(bound)
            if not isinstance(exc, LLMError):
                raise
            self._failed(item.custom_id, exc)
            return
        if budget is not None:
            budget.settle(bound, cost)
        # No checkpoint between the reply and this write: a cancellation cannot fall
        # between them, so every reply received is written, whole. A success shows the
        # failures held back were the lines' own: they are written first.
        self._flush_held()
        if self._write(answer_record(item.custom_id, body=body, request_id=request_id)):
            counters.succeeded += 1
            counters.prompt_tokens += usage.prompt_tokens
            counters.completion_tokens += usage.completion_tokens
            counters.add_cost(cost)

    async def _send(self, item: Request) -> tuple[dict[str, Any], str | None, Usage, float | None]:
        """Send one request; return its reply's body, request id, the tokens and USD it spent.

        A reply from the client's response cache spent none (its ``cost`` is ``0.0``).
        """
        fields: dict[str, Any] = dict(item.body)
        model = fields.pop("model", None)
        self._sending += 1
        try:
            if item.url in (CHAT_URL, MESSAGES_URL):
                # A provider's native body passes its adapter's translation unchanged.
                chat = await self._client.chat(fields.pop("messages"), model=model, **fields)
                usage = Usage() if chat.cached else chat.usage
                return chat.raw, chat.request_id, usage, chat.cost
            vectors = await self._client.embed(fields.pop("input"), model=model, **fields)
            usage = Usage() if vectors.cached else vectors.usage
            return vectors.raw, vectors.request_id, usage, vectors.cost
        finally:
            self._sending -= 1

    def _failed(self, custom_id: str, error: LLMError) -> None:
        """Record a line's error, hold it back, or stop the run (see the module's docstring).

        An error is the line's answer, written so the line is not resent (unless
        ``retry_failed``); but a line whose error stops the run, or came after the stop,
        is left unanswered for the rerun.
        """
        systematic = is_systematic(error)
        outage = not systematic and is_outage(error)
        if self.stopped is not None and (systematic or outage):
            return
        if isinstance(error, APIStatusError) and systematic:
            self._halt(status_stop(error, self._client.base_url), error)
        elif outage and self._max_failures is not None:
            held = self._held
            held.append((custom_id, error))
            if len(held) >= self._max_failures:
                what = f"{len(held):,} requests in a row failed, none succeeded in between"
                self._halt(f"{what}; the last: {brief(str(error))}", error)
        else:
            self._record_failure(custom_id, error)

    def _record_failure(self, custom_id: str, error: LLMError) -> None:
        if self._write(failure_record(custom_id, error)):
            self._counters.failed += 1

    def _flush_held(self) -> None:
        """Write the failures held back: they were not a dead endpoint's after all."""
        held, self._held = self._held, []
        for custom_id, error in held:
            self._record_failure(custom_id, error)

    def _halt(self, reason: str, error: LLMError) -> None:
        """Stop the run at once: no new request, those in flight cancelled."""
        self.stopped, self.stop_error = reason, error
        self._held.clear()  # left unanswered: the rerun sends them again
        self._stopping = True
        self.scope.cancel()

    def _write(self, line: bytes) -> bool:
        """Append ``line`` to OUTPUT; return whether it was written.

        The first write that fails stops the run at once (it is raised at the end); no
        line is written after it, so a full disk that frees up cannot let later lines in
        behind a failed one.
        """
        if self._write_error is not None:
            return False
        try:
            self._output.write(line)
        except OSError as exc:
            self._write_error = exc
            self._stopping = True
            self.scope.cancel()
            return False
        return True

    async def send_all(self, limit: int) -> None:
        """Handle every marked line, ``limit`` at a time, until done or stopped."""
        if file_identity(self._input) != self._plan.identity:
            raise ConfigurationError(f"{self._plan.path} changed while the batch was starting")
        with self.scope:
            async with as_completed(self._handle, self._work(), limit=limit) as done:
                async for _ in done:
                    pass  # each worker wrote its line already
        if self.stopped is None and self._write_error is None:
            # Ended (or interrupted) in too short a run of failures to stop it.
            self._flush_held()  # (cancelled from outside, nothing more is written)

    async def execute(self, limit: int, *, handle_signals: bool, grace: float) -> None:
        """Handle every marked line (:meth:`send_all`), reporting progress meanwhile.

        With ``handle_signals``, SIGINT and SIGTERM stop the run (:meth:`watch_signals`).
        The reporter is closed however this ends.

        Raises:
            OSError: a line could not be written (the first such error, alone; the run
                stopped at once).
        """
        reporter = self._reporter
        reporter.start(_plan_text(self._plan, self._output.path, self._answered_before))
        try:
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    await nursery.start(self.watch_signals, grace)
                nursery.start_soon(reporter.run)
                await self.send_all(limit)
                nursery.cancel_scope.cancel()
        finally:
            reporter.close()
        if self._write_error is not None:
            raise self._write_error

    def summary(self, *, before: ClientStatistics, started: float) -> BatchSummary:
        """Say what the run did, given the client's statistics and the clock at its start."""
        return summarize(
            self._plan,
            self._output.path,
            self._counters,
            skipped=self._answered_before,
            before=before,
            after=self._client.statistics(),
            started=started,
            interrupted=self.interrupted,
            stopped=self.stopped,
            stop_error=self.stop_error,
            max_cost=None if self._budget is None else self._budget.max_cost,
            over_budget=self._budget is not None and self._budget.refused is not None,
        )

    def stop(self, grace: float) -> None:
        """Start no new request; cancel those in flight after ``grace`` seconds."""
        self._stopping = True
        self.interrupted = True
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + grace)

    async def watch_signals(
        self, grace: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """On SIGINT or SIGTERM, stop gently; on a second one, cancel at once.

        The receiver stays open until the run ends (this task is cancelled then), so a
        third Ctrl-C cannot raise ``KeyboardInterrupt`` in the middle of the clean-up.
        """
        started = False
        while True:
            try:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    if not started:
                        task_status.started()
                        started = True
                    async for signum in signals:
                        self._on_signal(signal.Signals(signum).name, grace)
            except KeyboardInterrupt:
                if started:
                    # A SIGINT not read yet when the run ended is raised again as the
                    # receiver closes; the run is over, and its summary is what is left.
                    return
                # A Ctrl-C in the instant before the receiver was installed: the run's
                # first signal; then watch for the next one as usual.
                task_status.started()
                started = True
                self._on_signal("SIGINT", grace)

    def _on_signal(self, name: str, grace: float) -> None:
        if self.scope.cancel_called:
            return  # stopping at once already
        if self._stopping:
            self.scope.cancel()
            self._reporter.note(f"{name} again: cancelling the requests in flight")
            return
        self.stop(grace)
        self._reporter.note(
            f"{name}: starting no new requests; waiting up to {grace:g} s for "
            f"the {self._sending} in flight (press Ctrl-C again to stop at once)"
        )


async def run_batch(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    client: Client,
    concurrency: int | None = None,
    retry_failed: bool = False,
    skip_invalid: bool = False,
    progress: bool = False,
    progress_interval: float = 10.0,
    handle_signals: bool = False,
    grace: float = 30.0,
    max_consecutive_failures: int | None = DEFAULT_MAX_CONSECUTIVE_FAILURES,
    shard: tuple[int, int] | None = None,
    max_cost: float | None = None,
    via: str | ViaProvider = "online",
) -> BatchSummary:
    """Send every request of a batch file and write each answer; resume where a run ended.

    Each input line (Batch API format or ``{"custom_id", "prompt"}``) gets exactly one
    line in ``output_path`` (Batch API output format), appended as soon as its answer
    arrives, in completion order. Lines whose ``custom_id`` the output file answers
    already are skipped, so running again after an interruption sends only the rest.

    Fails fast: a 401, 403, 404, 405 or 407, or ``max_consecutive_failures`` lines in a
    row failing with no answer, a 5xx, a 429 or the deadline (after their retries), stop the
    run (those in flight cancelled; ``summary.stopped`` says why; those lines stay unanswered
    for the rerun). Other statuses (400, 422) are the line's answer. See ``docs/batch.md``.

    Args:
        input_path: the JSONL file of requests.
        output_path: the JSONL file of answers; created if absent, appended to if not.
        client: the client to send with (its concurrency, rate limit and retry policy
            apply; chat bodies without a ``model`` use the client's).
        concurrency: lines in progress at once (default: the client's
            ``max_concurrency``, which bounds requests in flight in any case).
        retry_failed: send again the lines answered with an error in the output file
            (their error lines are removed first, so each line still ends up once).
        skip_invalid: record invalid input lines as error lines instead of raising.
        progress: show progress on stderr: a bar on a terminal, else a line every
            ``progress_interval`` seconds (default 10).
        handle_signals: on SIGINT or SIGTERM, start no new request and give those in
            flight ``grace`` seconds to finish and be written; a second signal cancels
            them at once. The summary then says ``interrupted``. Main thread only.
        grace: seconds requests in flight get to finish after the first signal.
        max_consecutive_failures: see above (at least 1); ``None``: no such stop.
        shard: ``(K, N)``: handle only shard K of N (by a stable hash of ``custom_id``,
            see ``docs/several-machines.md``); the summary counts its lines only.
        max_cost: a budget in USD: a line that might not fit is not sent, and the run ends
            ``over_budget`` (``docs/howto-cost.md``); every line's model needs a price.
        via: ``"provider"``: through the provider's Batch API (:class:`ViaProvider`).

    Returns: what the run did (:class:`BatchSummary`).

    Raises:
        BatchInputError: invalid input lines (with ``skip_invalid`` off), or an output
            file that is not batch output; raised before any request is sent.
        ConfigurationError: another run holds the output file, or it is the input (or no price).
        OSError: a file cannot be read or written (``filename`` names it); a failed
            write stops the run at once and is raised alone, every line before it whole.

    Cancellation: the requests in flight are cancelled and nothing more is written; every
    line written is whole, and a later run sends the unanswered lines only.
    """
    limit, part = _checked(client, concurrency, max_consecutive_failures, via, shard, max_cost)
    started, before = trio.current_time(), client.statistics()
    async with _opener(via)(
        client,
        os.fspath(input_path),
        os.fspath(output_path),
        skip_invalid=skip_invalid,
        retry_failed=retry_failed,
        progress=progress,
        progress_interval=progress_interval,
        max_failures=max_consecutive_failures,
        shard=part,
        budget=None if max_cost is None else Budget.for_client(max_cost, client),
    ) as run:
        await run.execute(limit, handle_signals=handle_signals, grace=grace)
    return run.summary(before=before, started=started)


def _opener(via: str | ViaProvider) -> Callable[..., AbstractAsyncContextManager[_Run | JobRun]]:
    """:func:`_open_run`, or its counterpart for a job through the provider's Batch API."""
    return _open_run if via == "online" else partial(_open_job_run, via)


@contextlib.asynccontextmanager
async def _open_job_run(
    via: str | ViaProvider, client: Client, input_path: str, output_path: str, **options: Any
) -> AsyncIterator[JobRun]:
    """:func:`_open_run`'s counterpart through the provider's Batch API (``_via_provider``).

    The options of reading and progress apply; ``max_failures`` is the online runs' (and
    ``shard`` and ``budget`` were refused by :func:`_checked`).
    """
    from ._via_provider import open_provider_run

    for online_only in ("max_failures", "shard", "budget"):
        del options[online_only]
    async with open_provider_run(client, input_path, output_path, via, **options) as run:
        yield run


def _checked(
    client: Client,
    concurrency: int | None,
    max_failures: int | None,
    via: str | ViaProvider,
    shard: tuple[int, int] | None,
    max_cost: float | None,
) -> tuple[int, Shard | None]:
    """Check :func:`run_batch`'s settings (``ValueError``); return its concurrency and shard.

    A shard and a budget are for online runs: a job through the provider's Batch API is
    submitted whole.
    """
    for name, value in (("concurrency", concurrency), ("max_consecutive_failures", max_failures)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1 (or None), got {value}")
    if via != "online":
        for name, setting in (("shard", shard), ("max_cost", max_cost)):
            if setting is not None:
                raise ValueError(
                    f"{name}= is for online runs: via='provider' submits the whole job"
                )
    return concurrency or client.max_concurrency, None if shard is None else Shard(*shard)


@contextlib.asynccontextmanager
async def _open_run(
    client: Client,
    input_path: str,
    output_path: str,
    *,
    skip_invalid: bool,
    retry_failed: bool,
    progress: bool,
    progress_interval: float,
    max_failures: int | None,
    shard: Shard | None = None,
    budget: Budget | None = None,
) -> AsyncIterator[_Run]:
    """Open both files and do steps 1 to 4; the block sends (step 5); leaving closes them.

    Raises:
        BatchInputError, ConfigurationError, OSError: as :func:`run_batch`, before any
            request is sent.
    """
    # Blocking file calls on purpose: local files, buffered (see _output).
    with open(input_path, "rb", buffering=1 << 20) as input_file:  # noqa: ASYNC230
        if names(output_path, input_file):
            raise ConfigurationError(f"the output file {output_path} is the input file")
        with naming(output_path), OutputFile.open(output_path) as output:
            refuse_if_batches_run(output.path)
            size = os.fstat(input_file.fileno()).st_size + output.size()
            with open_scan_progress(size, enabled=progress, interval=progress_interval) as scanning:
                scan = await output.scan(progress=scanning)
                with naming(input_path):
                    plan = await check_input(
                        input_file,
                        input_path,
                        scan.answered,
                        default_model=client.model,
                        skip_invalid=skip_invalid,
                        retry_failed=retry_failed,
                        unsendable=unsendable_urls(client._provider),
                        shard=shard,
                        progress=scanning,
                    )
            plan.scan_elapsed = scanning.elapsed
            scan.answered = AnsweredKeys()  # its table is not needed from here on
            if budget is not None:  # before OUTPUT is changed: a refusal changes nothing
                budget.check_prices(plan.models)
            notes = await output.prepare(retry_failed=retry_failed)
            counters = Counters()
            watched = Watched(
                client=client,
                counters=counters,
                total=plan.total,
                answered_before=plan.answered_ok + plan.answered_failed,
                to_handle=plan.to_send + plan.to_record,
                budget=budget,
            )
            reporter = open_reporter(watched, enabled=progress, interval=progress_interval)
            for note in notes:
                reporter.note(note)
            yield _Run(
                client=client,
                input_file=input_file,
                plan=plan,
                output=output,
                counters=counters,
                reporter=reporter,
                max_failures=max_failures,
                budget=budget,
            )


def _plan_text(plan: InputPlan, output: str, answered_before: int) -> str:
    in_shard = f", {plan.total:,} in shard {plan.shard}" if plan.shard else ""
    parts = [f"{plan.total + plan.other_shards:,} lines in {plan.path}{in_shard}"]
    if answered_before:
        parts.append(f"{answered_before:,} answered already in {output}")
    parts.append(f"sending {plan.to_send:,}")
    if plan.to_record:
        parts.append(f"recording {plan.to_record:,} invalid as errors")
    return "; ".join(parts) + f" -> {output}"
