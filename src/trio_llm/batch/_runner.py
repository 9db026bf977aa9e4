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
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import IO, Any, final

import attrs
import trio

from .._client import Client, ClientStatistics
from .._errors import ConfigurationError, LLMError
from .._fanout import as_completed
from .._types import Usage
from ..providers._registry import PROVIDER_NAMES, provider_named
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
    read_lines,
)
from ._output import OutputFile, answer_record, error_record, failure_record
from ._progress import Counters, Reporter, Watched, open_reporter

__all__ = ["BatchSummary", "run_batch"]


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
        unanswered: lines with no answer yet (the run was interrupted): rerun to send them.
        retries: retry attempts the client made during the run.
        rate_limited: 429 responses the client received during the run.
        prompt_tokens: prompt tokens of the answers, as the server reported them.
        completion_tokens: completion tokens of the answers.
        tokens: ``prompt_tokens + completion_tokens``.
        elapsed: seconds the run took, by the trio clock.
        interrupted: the run was stopped by SIGINT or SIGTERM (``handle_signals``).
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
    ) -> None:
        self._client = client
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

    def _work(self) -> Iterator[Request | Invalid]:
        """Yield the lines to handle, pulled one at a time by free workers.

        Lines answered already are skipped without being parsed (the first pass marked
        the others); once a stop is asked for, nothing more is yielded.
        """
        plan = self._plan
        handle = plan.handle
        for number, raw in read_lines(self._input):
            if self._stopping:
                return
            if not handle[number]:
                continue
            duplicate = plan.duplicates.get(number)
            if duplicate is not None:
                yield duplicate_line(number, *duplicate)
            else:
                yield parse_line(raw, number, default_model=self._default_model)

    async def _handle(self, item: Request | Invalid) -> None:
        """Answer one line and write its output line at once (never half of one)."""
        counters = self._counters
        if isinstance(item, Invalid):
            await trio.lowlevel.checkpoint()
            self._output.write(
                error_record(
                    None if item.keyed_by_line else item.custom_id,
                    code=item.code,
                    message=f"{self._plan.path}:{item.line}: {item.reason}",
                    line=item.line,
                )
            )
            counters.invalid += 1
            return
        fields: dict[str, Any] = dict(item.body)
        model = fields.pop("model", None)
        usage: Usage
        try:
            if not self._client._provider.accepts_batch_url(item.url):
                raise ConfigurationError(_wrong_provider(item.url))
            if item.url in (CHAT_URL, MESSAGES_URL):
                # A provider's native body passes its adapter's translation unchanged.
                chat = await self._client.chat(fields.pop("messages"), model=model, **fields)
                body, request_id, usage = chat.raw, chat.request_id, chat.usage
            else:
                vectors = await self._client.embed(fields.pop("input"), model=model, **fields)
                body, request_id, usage = vectors.raw, vectors.request_id, vectors.usage
        except LLMError as exc:
            # The answer is the error: written like any other, so the line is not resent
            # (unless --retry-failed). Anything else is a bug and ends the run.
            self._output.write(failure_record(item.custom_id, exc))
            counters.failed += 1
            return
        # No checkpoint between the reply and this write: a cancellation cannot fall
        # between them, so every reply received is written, whole.
        self._output.write(answer_record(item.custom_id, body=body, request_id=request_id))
        counters.succeeded += 1
        counters.prompt_tokens += usage.prompt_tokens
        counters.completion_tokens += usage.completion_tokens

    async def send_all(self, limit: int) -> None:
        """Handle every marked line, ``limit`` at a time, until done or stopped."""
        if file_identity(self._input) != self._plan.identity:
            raise ConfigurationError(f"{self._plan.path} changed while the batch was starting")
        with self.scope:
            async with as_completed(self._handle, self._work(), limit=limit) as done:
                async for _ in done:
                    pass  # each worker wrote its line already

    async def execute(self, limit: int, *, handle_signals: bool, grace: float) -> None:
        """Handle every marked line (:meth:`send_all`), reporting progress meanwhile.

        With ``handle_signals``, SIGINT and SIGTERM stop the run (:meth:`watch_signals`).
        The reporter is closed however this ends.
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

    def summary(self, *, before: ClientStatistics, started: float) -> BatchSummary:
        """Say what the run did, given the client's statistics and the clock at its start."""
        plan, counters = self._plan, self._counters
        after = self._client.statistics()
        return BatchSummary(
            input_path=plan.path,
            output_path=self._output.path,
            total=plan.total,
            succeeded=counters.succeeded,
            failed=counters.failed,
            invalid=counters.invalid,
            skipped=self._answered_before,
            skipped_failed=plan.answered_failed,
            unanswered=plan.total - self._answered_before - counters.handled,
            retries=after.retried - before.retried,
            rate_limited=after.rate_limited - before.rate_limited,
            prompt_tokens=counters.prompt_tokens,
            completion_tokens=counters.completion_tokens,
            tokens=counters.prompt_tokens + counters.completion_tokens,
            elapsed=trio.current_time() - started,
            interrupted=self.interrupted,
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
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.scope.cancel_called:
                    continue  # stopping at once already
                if self._stopping:
                    self.scope.cancel()
                    self._reporter.note(f"{name} again: cancelling the requests in flight")
                    continue
                self.stop(grace)
                in_flight = self._client.statistics().in_flight
                self._reporter.note(
                    f"{name}: starting no new requests; waiting up to {grace:g} s for the "
                    f"{in_flight} in flight (press Ctrl-C again to stop at once)"
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
) -> BatchSummary:
    """Send every request of a batch file and write each answer; resume where a run ended.

    Each input line (Batch API format or ``{"custom_id", "prompt"}``) gets exactly one
    line in ``output_path`` (Batch API output format), appended as soon as its answer
    arrives, in completion order. Lines whose ``custom_id`` the output file answers
    already are skipped, so running again after an interruption sends only the rest.

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
            ``progress_interval`` seconds.
        progress_interval: seconds between plain progress lines.
        handle_signals: on SIGINT or SIGTERM, start no new request and give those in
            flight ``grace`` seconds to finish and be written; a second signal cancels
            them at once. The summary then says ``interrupted``. Main thread only.
        grace: seconds requests in flight get to finish after the first signal.

    Returns:
        What the run did (:class:`BatchSummary`).

    Raises:
        BatchInputError: invalid input lines (with ``skip_invalid`` off), or an output
            file that is not batch output; raised before any request is sent.
        ConfigurationError: another run holds the output file, or both paths name the
            same file.
        OSError: a file cannot be read or written.

    Cancellation: the requests in flight are cancelled and nothing more is written; every
    line written is whole, and a later run sends the unanswered lines only.
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    started = trio.current_time()
    before = client.statistics()
    source, target = os.fspath(input_path), os.fspath(output_path)
    # Blocking file calls on purpose: local files, buffered (see _output).
    with open(source, "rb", buffering=1 << 20) as input_file:  # noqa: ASYNC230
        if _is_same_file(input_file, target):
            raise ConfigurationError(f"the output file {target} is the input file")
        with OutputFile.open(target) as output:
            run = await _prepare_run(
                client,
                input_file,
                output,
                input_path=source,
                skip_invalid=skip_invalid,
                retry_failed=retry_failed,
                progress=progress,
                progress_interval=progress_interval,
            )
            limit = concurrency or client.max_concurrency
            await run.execute(limit, handle_signals=handle_signals, grace=grace)
    return run.summary(before=before, started=started)


async def _prepare_run(
    client: Client,
    input_file: IO[bytes],
    output: OutputFile,
    *,
    input_path: str,
    skip_invalid: bool,
    retry_failed: bool,
    progress: bool,
    progress_interval: float,
) -> _Run:
    """Scan OUTPUT, check INPUT and repair OUTPUT (steps 2 to 4); return the run to make.

    Raises:
        BatchInputError: as :func:`run_batch`, before any request is sent.
    """
    scan = await output.scan()
    plan = await check_input(
        input_file,
        input_path,
        scan.answered,
        default_model=client.model,
        skip_invalid=skip_invalid,
        retry_failed=retry_failed,
    )
    notes = await output.prepare(retry_failed=retry_failed)
    counters = Counters()
    reporter = open_reporter(
        Watched(
            client=client,
            counters=counters,
            total=plan.total,
            answered_before=plan.answered_ok + plan.answered_failed,
            to_handle=plan.to_send + plan.to_record,
        ),
        enabled=progress,
        interval=progress_interval,
    )
    for note in notes:
        reporter.note(note)
    return _Run(
        client=client,
        input_file=input_file,
        plan=plan,
        output=output,
        counters=counters,
        reporter=reporter,
    )


def _wrong_provider(url: str) -> str:
    """Say which providers a client needs to send ``url`` lines (the client's cannot)."""
    adapters = [provider_named(name) for name in PROVIDER_NAMES]
    names = [f"provider={adapter.name!r}" for adapter in adapters if adapter.accepts_batch_url(url)]
    return f"{url} lines need a client opened with {' or '.join(names)}"


def _is_same_file(file: IO[bytes], path: str) -> bool:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(file.fileno())
    return (status.st_dev, status.st_ino) == (mine.st_dev, mine.st_ino)


def _plan_text(plan: InputPlan, output: str, answered_before: int) -> str:
    parts = [f"{plan.total:,} lines in {plan.path}"]
    if answered_before:
        parts.append(f"{answered_before:,} answered already in {output}")
    parts.append(f"sending {plan.to_send:,}")
    if plan.to_record:
        parts.append(f"recording {plan.to_record:,} invalid as errors")
    return "; ".join(parts) + f" -> {output}"
