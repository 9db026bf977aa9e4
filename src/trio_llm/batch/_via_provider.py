"""``run_batch(..., via="provider")``: a batch file through the provider's Batch API.

The run, in order:

1. Open OUTPUT (locked) and the job state beside it (``OUT.job.json``, see ``_job``).
2. Scan OUTPUT, check INPUT (every problem with its line number, the Batch API's limits
   included), repair OUTPUT: as online mode does, with the same functions.
3. Plan: the lines not answered in OUTPUT and in no batch of the job yet are cut into
   parts (``_provider_plan``), recorded in the state before anything is sent.
4. Submit each new part: upload (OpenAI), create; each step recorded as an intent first,
   so that a run killed with a request in flight looks for what it created before
   creating it again.
5. Follow: poll every running batch each ``poll_interval``; merge each ended batch's
   results into OUTPUT (output lines exactly as online mode writes them), then an error
   line for each of its lines the results do not answer; mark the part merged.

Every line ends in OUTPUT once: results are written only for ``custom_id``\\ s of the part
not answered yet, so a merge cut short is simply done again. Cancelled (Ctrl-C, SIGTERM,
a cancel scope), the run stops at once; the batches keep running at the provider, and the
same command resumes polling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Final

import trio

from .._client import Client
from .._errors import (
    ConfigurationError,
    redact_url,
)
from .._request import sole_route
from ..providers._batch_api import BatchAPI, batch_api_for
from ._input import check_input, unsendable_urls
from ._job import (
    PLANNED,
    Job,
    load_job,
    new_job,
    state_path,
)
from ._job_run import JobRun
from ._keys import FAILED, OK
from ._locked import names
from ._output import OutputFile
from ._progress import open_scan_progress
from ._provider_plan import LineEncoder
from ._provider_progress import open_provider_reporter
from ._summary import BatchSummary, ViaProvider, naming

__all__ = ["run_provider_batch"]

# The base URL a --simulate job is recorded under: its server ends with the process.
_SIMULATED: Final = "simulated"


def _job_for(path: str, client: Client, *, simulated: bool, notes: list[str]) -> Job:
    """Return the job of the output file (a new one if none), checked against the client.

    A ``--simulate`` job's batches ended with the process that ran its fake server: its
    parts that were sent are planned again (the simulation costs nothing).

    Raises:
        ConfigurationError: the job's batches are at another provider or base URL.
    """
    provider = client._provider.name
    base_url = _SIMULATED if simulated else redact_url(client.base_url)
    job = load_job(path)
    if job is None:
        return new_job(provider, base_url, simulated=simulated)
    live = job.live
    if (job.provider, job.base_url) != (provider, base_url):
        if live:
            where = "the --simulate server" if job.simulated else f"{job.base_url}"
            raise ConfigurationError(
                f"{path}: the job's {len(live)} batch(es) are at {where} (provider "
                f"{job.provider}): run with those settings to resume or --cancel them, or "
                "remove the file to forget them (their lines are then sent again)"
            )
        job.provider, job.base_url, job.simulated = provider, base_url, simulated
    if simulated:
        lost = [part for part in live if part.status != PLANNED]
        for part in lost:
            part.status, part.intent_at, part.file_id, part.batch_id = PLANNED, None, None, None
            part.remote_status, part.total, part.done, part.failed = None, 0, 0, 0
        if lost:
            lines = sum(part.count for part in lost)
            notes.append(
                f"--simulate: the simulated batches of the last run ended with it; "
                f"submitting their {lines:,} lines again"
            )
    return job


def _limit(value: int | None, provider_limit: int) -> int:
    return provider_limit if value is None else value


async def run_provider_batch(
    input_path: str,
    output_path: str,
    *,
    client: Client,
    via: ViaProvider,
    retry_failed: bool = False,
    skip_invalid: bool = False,
    progress: bool = False,
    progress_interval: float = 10.0,
    handle_signals: bool = False,
    simulated: bool = False,
) -> BatchSummary:
    """Run a batch file through the provider's Batch API: ``run_batch(via=via)``, and more.

    ``simulated``: the client speaks to the ``--simulate`` fake server of this process
    (a later run's server will not know its batches: see :func:`_job_for`).

    Cancellation: as for :func:`open_provider_run`.
    """
    started = trio.current_time()
    before = client.statistics()
    async with open_provider_run(
        client,
        input_path,
        output_path,
        via,
        retry_failed=retry_failed,
        skip_invalid=skip_invalid,
        progress=progress,
        progress_interval=progress_interval,
        simulated=simulated,
    ) as run:
        await run.execute(handle_signals=handle_signals)
    return run.summary(before=before, started=started)


@contextlib.asynccontextmanager
async def open_provider_run(
    client: Client,
    input_path: str,
    output_path: str,
    via: str | ViaProvider,
    *,
    retry_failed: bool,
    skip_invalid: bool,
    progress: bool,
    progress_interval: float,
    simulated: bool = False,
) -> AsyncIterator[JobRun]:
    """Open the files and the job, check INPUT and plan (steps 1 to 3); yield the run.

    ``via``: its settings (``"provider"``: the defaults).

    The block runs it (:meth:`JobRun.execute`: steps 4 and 5); leaving closes the files.

    Raises:
        BatchInputError, ConfigurationError, OSError: before anything is sent, as for
            ``run_batch``; ``ConfigurationError`` also when the job's batches are at
            another provider or base URL, or the client has several endpoints.

    Cancellation: the requests in flight are abandoned; the state and OUTPUT stay whole,
    the batches created keep running at the provider, and the same call resumes them.
    """
    via = _settings(via)
    sole_route(client._router)  # every call of the job goes to that one server
    api = batch_api_for(client)
    encoder = LineEncoder(
        api, client._provider, max_bytes=_limit(via.max_batch_bytes, api.max_bytes)
    )
    # Blocking file calls on purpose: local files, buffered (see _output).
    with open(input_path, "rb", buffering=1 << 20) as input_file:  # noqa: ASYNC230
        if names(output_path, input_file):
            raise ConfigurationError(f"the output file {output_path} is the input file")
        with naming(output_path), OutputFile.open(output_path) as output:
            notes: list[str] = []
            job = _job_for(state_path(output.path), client, simulated=simulated, notes=notes)
            size = os.fstat(input_file.fileno()).st_size + output.size()
            with open_scan_progress(size, enabled=progress, interval=progress_interval) as scanning:
                scan = await output.scan(progress=scanning)
                answered = scan.answered
                with naming(input_path):
                    plan = await check_input(
                        input_file,
                        input_path,
                        answered,
                        default_model=client.model,
                        skip_invalid=skip_invalid or via.cancel,  # --cancel: none needed
                        retry_failed=retry_failed,
                        unsendable=unsendable_urls(client._provider),
                        line_check=encoder.check(client.model),
                        progress=scanning,
                    )
            plan.scan_elapsed = scanning.elapsed
            notes += await output.prepare(retry_failed=retry_failed)
            # As check_input counts them: with retry_failed, error lines are not answers.
            flags = OK if retry_failed else OK | FAILED
            run = JobRun(
                client=client,
                api=api,
                encoder=encoder,
                input_file=input_file,
                plan=plan,
                output=output,
                job=job,
                answered=lambda key: bool(answered.keys.flags(key) & flags),
                reporter=open_provider_reporter(enabled=progress, interval=progress_interval),
                via=via,
            )
            await _plan(run, job, via, api, client.model)
            for note in notes:
                run.note(note)
            yield run


def _settings(via: str | ViaProvider) -> ViaProvider:
    """The settings ``via`` names (``"provider"``: the defaults)."""
    if isinstance(via, ViaProvider):
        return via
    if via != "provider":
        raise ValueError(f"via must be 'online' or 'provider', not {via!r}")
    return ViaProvider()


async def _plan(
    run: JobRun, job: Job, via: ViaProvider, api: BatchAPI, default_model: str | None
) -> None:
    """Plan the lines of no batch yet into new parts (none with ``cancel``); say so."""
    before_plan = len(job.parts)
    if via.cancel:
        run.text = _plan_text(run, job, before_plan, 0, api.name, cancel=True)
        return
    max_lines = _limit(via.max_batch_lines, api.max_lines)
    new_lines = await run.plan(default_model=default_model, max_lines=max_lines)
    run.text = _plan_text(run, job, before_plan, new_lines, api.name)


def _plan_text(
    run: JobRun, job: Job, before_plan: int, new_lines: int, provider: str, *, cancel: bool = False
) -> str:
    plan = run._plan
    parts = [f"{plan.total:,} lines in {plan.path}"]
    if run.skipped:
        parts.append(f"{run.skipped:,} answered already")
    resumed = [part for part in job.parts[:before_plan] if part.live]
    if resumed:
        lines = sum(part.count for part in resumed)
        parts.append(f"{lines:,} in {len(resumed)} batch(es) of this job at {provider}")
    if cancel:
        parts.append("cancelling them")
    elif new_lines:
        count = len(job.parts) - before_plan
        parts.append(f"submitting {new_lines:,} in {count} new batch(es) to {provider}'s Batch API")
    return (
        "; ".join(parts)
        + f" -> {run._output.path} (job {job.job_id}, {state_path(run._output.path)})"
    )
