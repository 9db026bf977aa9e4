"""One run of a ``--via provider`` job: submit, follow, merge (see ``_via_provider``)."""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import IO, Final, final

import trio

from .. import _json
from .._client import Client, ClientStatistics
from .._errors import (
    APIStatusError,
    BatchInputError,
    ConfigurationError,
    LLMError,
    RetryDeadlineExceeded,
    error_from_response,
)
from .._retry import is_retryable
from ..providers._batch_api import BatchAPI, RemoteBatch, ResultLine
from ._input import Bits, InputPlan, Invalid
from ._job import (
    CREATING,
    DROPPED,
    ENDED,
    MERGED,
    PLANNED,
    RUNNING,
    UPLOADING,
    Job,
    Part,
    save_job,
    state_path,
)
from ._keys import OK, KeyTable
from ._output import OutputFile, answer_record, error_record, failure_record
from ._progress import Counters
from ._provider_plan import LineEncoder, each_id, plan_parts, read_part
from ._provider_progress import ProviderReporter
from ._stops import brief
from ._summary import BatchSummary, ProviderBatch, ViaProvider, invalid_record, naming, summarize

__all__ = ["JobRun", "result_record"]

# Codes of the error lines of requests a batch ended without answering.
_NOT_ANSWERED: Final = {
    "failed": ("batch_failed", "failed as a whole"),
    "expired": ("batch_expired", "expired before this request was processed"),
    "cancelled": ("batch_cancelled", "was cancelled before this request was processed"),
}


def _ignore(_value: object) -> None:
    """Drop a value (``KeyTable.mark`` says what the key had)."""


class _Stop(Exception):
    """The run stops: an error that would repeat (see :meth:`JobRun.halt`)."""


def result_record(result: ResultLine) -> tuple[bytes, bool]:
    """Return a result's output line, as online mode writes it, and whether it succeeded."""
    custom_id = result.custom_id
    status = result.status_code
    if result.error_code is not None or status is None:
        code = result.error_code or "batch_error"
        message = result.error_message or "the request did not run"
        return error_record(custom_id, code=code, message=message), False
    if 200 <= status < 300:
        body = result.body if isinstance(result.body, dict) else {"value": result.body}
        line = answer_record(custom_id, body=body, request_id=result.request_id, status_code=status)
        return line, True
    content = b"" if result.body is None else _json.dumps(result.body, exact_non_finite=False)
    error = error_from_response(status, {}, content, request_id=result.request_id)
    return failure_record(custom_id, error), False


@final
class JobRun:
    """One run of a job: its files, its state, and the batches it follows."""

    def __init__(
        self,
        *,
        client: Client,
        api: BatchAPI,
        encoder: LineEncoder,
        input_file: IO[bytes],
        plan: InputPlan,
        output: OutputFile,
        job: Job,
        answered: Callable[[str], bool],
        reporter: ProviderReporter,
        via: ViaProvider,
    ) -> None:
        self._client = client
        self._pricer = client._requester.pricers[client._provider.name]
        self._api = api
        self._encoder = encoder
        self._input = input_file
        self._plan = plan
        self._output = output
        self._job = job
        self._state = state_path(output.path)
        self._answered_before = answered
        self._written = KeyTable()  # the ids written by this run
        self._reporter = reporter
        self._via = via
        self._poll_interval = via.poll_interval
        #: What the run is about to do, said first (set once planned).
        self.text = ""
        self.counters = Counters()
        self.skipped = plan.answered_ok + plan.answered_failed
        self.interrupted = False
        self.stopped: str | None = None
        self.stop_error: LLMError | None = None
        self.scope = trio.CancelScope()

    # -- the state -----------------------------------------------------------------------

    def _save(self) -> None:
        with naming(self._state):
            save_job(self._state, self._job)

    def _answered(self, custom_id: str) -> bool:
        return bool(self._written.flags(custom_id)) or self._answered_before(custom_id)

    def _write(self, line: bytes, custom_id: str | None) -> None:
        self._output.write(line)
        if custom_id is not None:
            self._written.mark(custom_id, OK)

    async def plan(self, *, default_model: str | None, max_lines: int) -> int:
        """Cut the lines no batch of the job holds into new parts; record them. Step 3.

        Returns:
            The number of lines the new parts hold.
        """
        job = self._job
        held = Bits()
        for part in job.live:
            for first, last, _ in part.lines:
                for number in range(first, last + 1):
                    held.set(number)
        parts = await plan_parts(
            self._input,
            self._plan,
            skip=held,
            encoder=self._encoder,
            default_model=default_model,
            max_lines=max_lines,
            first_index=len(job.parts),
            record_invalid=self._record_invalid,
        )
        if parts:
            job.parts.extend(parts)
            self._save()  # before anything is sent
        return sum(part.count for part in parts)

    def _record_invalid(self, item: Invalid) -> None:
        self._write(invalid_record(self._plan.path, item), None)
        self.counters.invalid += 1

    # -- submitting ----------------------------------------------------------------------

    def _known_ids(self) -> frozenset[str]:
        return frozenset(part.batch_id for part in self._job.parts if part.batch_id)

    async def _submit(self, part: Part) -> None:
        """Upload (OpenAI) and create ``part``'s batch, each intent recorded first. Step 4."""
        api, job = self._api, self._job
        if part.status == CREATING:
            assert part.intent_at is not None
            found = await api.find_created(
                metadata=job.metadata(part),
                file_id=part.file_id,
                count=part.count,
                since=part.intent_at,
                known=self._known_ids(),
            )
            if found is not None:
                self._reporter.note(f"part {part.index}: found {found.id}, created before")
                self._running(part, found)
                return
        lines: list[bytes] = []
        files = api.files
        if files is None:
            lines = await self._read(part)
        elif part.file_id is None and part.status == UPLOADING:
            assert part.intent_at is not None
            part.file_id = await files.find_upload(job.file_name(part), part.size, part.intent_at)
            if part.file_id is not None:
                self._reporter.note(f"part {part.index}: found {part.file_id}, uploaded before")
        if files is not None and part.file_id is None:
            lines = await self._read(part)
            self._intend(part, UPLOADING)
            part.file_id = await files.upload(job.file_name(part), lines)
            lines = []  # its memory goes before the batch is created
        elif files is not None:  # uploaded by an earlier run: its lines must still be INPUT's
            await self._each_id(part, _ignore)
        self._intend(part, CREATING)
        batch = await api.create(
            file_id=part.file_id, lines=lines, url=part.url, metadata=job.metadata(part)
        )
        self._running(part, batch)

    async def _read(self, part: Part) -> list[bytes]:
        with naming(self._plan.path):
            return await read_part(
                self._input, self._plan.path, part, self._encoder, self._plan.unsendable
            )

    def _intend(self, part: Part, status: str) -> None:
        """Record that ``part``'s next step is starting, before its request is sent."""
        part.status = status
        part.intent_at = time.time()
        self._save()
        self._reporter.changed(part)

    def _running(self, part: Part, batch: RemoteBatch) -> None:
        part.batch_id = batch.id
        part.status = RUNNING
        self._update(part, batch, force_save=True)

    # -- following -----------------------------------------------------------------------

    def _update(self, part: Part, batch: RemoteBatch, *, force_save: bool = False) -> None:
        """Take in what the provider says of ``part``'s batch; record status changes."""
        before = (part.status, part.remote_status)
        part.remote_status = batch.status
        part.total, part.done, part.failed = batch.total, batch.done, batch.failed
        if batch.ended and part.status == RUNNING:
            part.status = ENDED
            part.outcome = batch.outcome
            part.results = list(batch.results)
            part.errors = list(batch.errors)
        if force_save or (part.status, part.remote_status) != before:
            self._save()
        self._reporter.changed(part)

    async def _poll(self, part: Part) -> float | None:
        assert part.batch_id is not None
        batch, retry_after = await self._api.retrieve(part.batch_id)
        self._update(part, batch)
        return retry_after

    async def _merge(self, part: Part) -> None:
        """Write an output line for each of ``part``'s lines not answered yet. Step 5."""
        assert part.batch_id is not None
        members = KeyTable()
        answered = [0]  # of its lines, those already in OUTPUT (a merge cut short)

        def member(custom_id: str) -> None:
            members.mark(custom_id, OK)
            if self._answered(custom_id):
                answered[0] += 1

        await self._each_id(part, member)
        counters = self.counters

        def take(result: ResultLine) -> None:
            if not members.flags(result.custom_id) or self._answered(result.custom_id):
                return  # another batch's line, or one merged already
            line, ok = result_record(result)
            self._write(line, result.custom_id)
            answered[0] += 1
            part.answered[0 if ok else 1] += 1
            if ok:
                counters.succeeded += 1
                counters.prompt_tokens += result.usage.prompt_tokens
                counters.add_cost(self._cost(result))
                counters.completion_tokens += result.usage.completion_tokens
            else:
                counters.failed += 1

        remote = RemoteBatch(
            id=part.batch_id,
            status=part.remote_status or "",
            ended=True,
            results=tuple(part.results),
        )
        await self._api.results(remote, take)
        if answered[0] < part.count:  # lines the results do not answer
            code, message = self._not_answered(part)

            def fill(custom_id: str) -> None:
                if not self._answered(custom_id):
                    self._write(error_record(custom_id, code=code, message=message), custom_id)
                    part.answered[1] += 1
                    counters.failed += 1

            await self._each_id(part, fill)
        part.status = MERGED
        part.lines = []  # every line is in OUTPUT now: OUTPUT is what counts
        self._output.sync()
        self._save()
        self._reporter.changed(part)

    async def _each_id(self, part: Part, on_id: Callable[[str], None]) -> None:
        with naming(self._plan.path):
            await each_id(self._input, self._plan.path, part, on_id)

    def _cost(self, result: ResultLine) -> float | None:
        """What an answered line cost, at the provider's Batch API price (``None``: unknown)."""
        body = result.body
        model = body.get("model") if isinstance(body, dict) else None
        return self._pricer.cost(result.usage, model if isinstance(model, str) else "", batch=True)

    @staticmethod
    def _not_answered(part: Part) -> tuple[str, str]:
        """The code and message of the error line of a request the results do not answer."""
        code, what = _NOT_ANSWERED.get(
            part.outcome or "", ("missing_result", "ended without a result for this request")
        )
        message = f"batch {part.batch_id} {what}"
        if part.outcome == "failed" and part.errors:
            message += ": " + "; ".join(part.errors[:3])
        return code, message

    # -- the run -------------------------------------------------------------------------

    def halt(self, reason: str, error: LLMError) -> None:
        """Stop the run: an error that would repeat. Raises :class:`_Stop`."""
        self.stopped, self.stop_error = reason, error
        raise _Stop(reason)

    async def _guarded(
        self, what: str, step: Callable[[], Awaitable[float | None]], *, again: bool
    ) -> float | None:
        """Run ``step``; on an API error, halt, or (``again``, a retryable one) say so.

        A poll or a merge that fails although retried is tried again at the next poll:
        the batches keep running meanwhile. Anything else stops the run.
        """
        try:
            return await step()
        except (BatchInputError, ConfigurationError):
            raise
        except LLMError as exc:
            retryable = isinstance(exc, RetryDeadlineExceeded) or is_retryable(exc)
            if not (again and retryable):
                self.halt(f"{what}: {brief(str(exc))}", exc)
            self._reporter.note(
                f"{what}: {brief(str(exc))}; trying again in {self._poll_interval:g} s"
            )
            return None

    async def _cancel_all(self) -> None:
        """Cancel every batch of the job; drop the parts not created yet."""
        for part in self._job.live:
            if part.status == CREATING:
                what = f"looking for batch part {part.index}"
                await self._guarded(what, partial(self._find_for_cancel, part), again=False)
            if part.status in (PLANNED, UPLOADING, CREATING):
                part.status = DROPPED
                self._save()
                self._reporter.changed(part)
            elif part.status == RUNNING:
                what = f"cancelling batch {part.batch_id}"
                await self._guarded(what, partial(self._cancel, part), again=False)

    async def _find_for_cancel(self, part: Part) -> None:
        assert part.intent_at is not None
        found = await self._api.find_created(
            metadata=self._job.metadata(part),
            file_id=part.file_id,
            count=part.count,
            since=part.intent_at,
            known=self._known_ids(),
        )
        if found is not None:
            self._running(part, found)

    async def _cancel(self, part: Part) -> None:
        assert part.batch_id is not None
        try:
            batch = await self._api.cancel(part.batch_id)
        except APIStatusError as exc:
            if exc.status_code != 409:  # 409: it ended already
                raise
            batch, _ = await self._api.retrieve(part.batch_id)
        self._update(part, batch)

    async def _follow(self) -> None:
        """Submit, poll and merge, every ``poll_interval``, until every part is merged.

        A step that fails in a way worth retrying (after the client's own retries) is
        tried again at the next round; a create, which the client never repeats (a lost
        answer may hide a batch that was made), is then looked for first (``_submit``).
        """
        while True:
            wait = self._poll_interval
            for part in self._job.live:
                if part.status in (PLANNED, UPLOADING, CREATING):
                    what = f"creating batch part {part.index}"
                    await self._guarded(what, partial(self._submit, part), again=True)
                if part.status == RUNNING:
                    what = f"polling batch {part.batch_id}"
                    asked = await self._guarded(what, partial(self._poll, part), again=True)
                    wait = max(wait, asked or 0.0)
                if part.status == ENDED:
                    what = f"merging batch {part.batch_id}"
                    await self._guarded(what, partial(self._merge, part), again=True)
            if not self._job.live:
                return
            await trio.sleep(wait)

    def note(self, text: str) -> None:
        """Show a message (progress on): a note on the run."""
        self._reporter.note(text)

    async def execute(self, limit: int = 0, *, handle_signals: bool, grace: float = 0.0) -> None:
        """Submit (or cancel), follow and merge, reporting meanwhile; see ``_via_provider``.

        As the online run's ``execute``: ``limit`` and ``grace`` do not apply (the requests
        are few, and a signal stops the run at once: nothing is lost).
        """
        reporter = self._reporter
        reporter.start(self.text)
        for part in self._job.live:
            if part.status != PLANNED:  # (the text counts the new ones)
                reporter.changed(part)
        failure: LLMError | OSError | None = None
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    if handle_signals:
                        await nursery.start(self._watch_signals)
                    nursery.start_soon(reporter.run)
                    try:
                        if self._via.cancel:
                            await self._cancel_all()
                        await self._follow()
                    except _Stop:
                        pass
                    except (LLMError, OSError) as exc:
                        failure = exc  # raised alone, not in the nursery's group
                    nursery.cancel_scope.cancel()
        finally:
            reporter.close()
        if failure is not None:
            raise failure

    async def _watch_signals(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """On SIGINT or SIGTERM, stop at once: nothing is lost, the batches keep running."""
        started = False
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                started = True
                async for signum in signals:
                    self._on_signal(signal.Signals(signum).name)
        except KeyboardInterrupt:
            if started:
                return  # a SIGINT not read when the run ended: the summary is what is left
            # A Ctrl-C in the instant before the receiver was installed: the run's signal.
            task_status.started()
            self._on_signal("SIGINT")

    def _on_signal(self, name: str) -> None:
        self.interrupted = True
        self.scope.cancel()
        self._reporter.note(f"{name}: stopping; the batches keep running")

    def summary(self, *, before: ClientStatistics, started: float) -> BatchSummary:
        """Say what the run did (as :class:`BatchSummary` does for online runs)."""
        return summarize(
            self._plan,
            self._output.path,
            self.counters,
            skipped=self.skipped,
            before=before,
            after=self._client.statistics(),
            started=started,
            interrupted=self.interrupted,
            stopped=self.stopped,
            stop_error=self.stop_error,
            via="provider",
            batches=tuple(
                ProviderBatch(
                    part=part.index,
                    id=part.batch_id,
                    status=part.status,
                    remote_status=part.remote_status,
                    outcome=part.outcome,
                    lines=part.count,
                    done=part.done,
                    failed=part.failed,
                )
                for part in self._job.parts
            ),
        )
