"""The state of a ``--via provider`` job: which lines went into which batch, on disk.

The file is ``OUT.job.json`` beside the output file (:func:`state_path`), one JSON object,
replaced atomically (written to ``.OUT.job.json.tmp``, flushed to disk, renamed over the
old one, the directory synced) at every step, and always *before* the step's request is
sent: a part is recorded (its lines) before anything is uploaded, its upload as
``uploading`` before ``POST /files``, its creation as ``creating`` before the batch is
created. A process killed at any moment leaves a state that says what may exist at the
provider, and the next run looks for it there before creating anything again.

It is written only by the run holding OUT's lock (``_locked``), so it needs no lock of its
own.

A part's lines are kept as ranges of line numbers with the byte offset of each range's
first line (``[first, last, offset]``: every non-blank line from ``first`` to ``last`` is
in the part), and a fingerprint of their ``custom_id``\\ s: a later run reads them again
from INPUT and refuses to go on if INPUT changed under the job.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from typing import Any, Final, final

import attrs

from .. import _json
from .._errors import BatchInputError, ConfigurationError
from ._locked import sync_directory

__all__ = [
    "Job",
    "Part",
    "load_job",
    "new_job",
    "refuse_if_batches_run",
    "save_job",
    "state_path",
]

_VERSION: Final = 1

#: Part statuses, in order. ``planned``: recorded, nothing sent. ``uploading``: its file
#: may be at the provider (``file_id`` unknown). ``creating``: its batch may exist
#: (``batch_id`` unknown). ``running``: created. ``ended``: its results wait to be merged.
#: ``merged``: every line has its output line. ``dropped``: cancelled before it was
#: created (its lines were never sent).
PLANNED: Final = "planned"
UPLOADING: Final = "uploading"
CREATING: Final = "creating"
RUNNING: Final = "running"
ENDED: Final = "ended"
MERGED: Final = "merged"
DROPPED: Final = "dropped"

#: Statuses of a part whose lines must not be planned again (its batch may run).
LIVE: Final = frozenset({PLANNED, UPLOADING, CREATING, RUNNING, ENDED})


@final
@attrs.define(kw_only=True)
class Part:
    """One batch of the job: its lines, and how far it got.

    Attributes:
        index: its number in the job (from 0), in the batch's metadata.
        url: the endpoint of its lines.
        model: the model of its lines (``""`` where a batch may mix them).
        default_model: the model of lines that name none, when it was planned.
        lines: ``[first, last, offset]`` ranges of its input lines (see the module).
        count: its lines.
        size: the bytes of its batch input (the file, or the requests).
        fingerprint: a hash of its ``custom_id``\\ s, in order.
        status: see :data:`LIVE` and the module.
        intent_at: Unix time its latest upload or create began (to find it again).
        file_id: the uploaded file (OpenAI).
        batch_id: the batch at the provider.
        remote_status: the batch's status, as the provider says it.
        outcome: how it ended: ``completed``, ``failed``, ``expired``, ``cancelled``.
        total: requests the provider counts in it.
        done: requests it processed.
        failed: requests that ended in an error.
        results: where its results are (file ids, a URL).
        errors: why the whole batch failed, if it did.
        answered: its lines merged into OUT (succeeded, failed).
    """

    index: int
    url: str
    model: str
    default_model: str | None = None
    lines: list[list[int]] = attrs.Factory(list)
    count: int = 0
    size: int = 0
    fingerprint: str = ""
    status: str = PLANNED
    intent_at: float | None = None
    file_id: str | None = None
    batch_id: str | None = None
    remote_status: str | None = None
    outcome: str | None = None
    total: int = 0
    done: int = 0
    failed: int = 0
    results: list[str] = attrs.Factory(list)
    errors: list[str] = attrs.Factory(list)
    answered: list[int] = attrs.Factory(lambda: [0, 0])

    @property
    def live(self) -> bool:
        """Whether its lines belong to it still (not merged, not dropped)."""
        return self.status in LIVE


@final
@attrs.define(kw_only=True)
class Job:
    """A job: the batches one output file's lines went into.

    Attributes:
        job_id: random, in every batch's metadata and file name.
        provider: the provider's name.
        base_url: the API's base URL (credentials redacted).
        simulated: made against the ``--simulate`` fake server, whose batches end with
            the process that ran it.
        created_at: Unix time the job began.
        parts: its batches, in the order they were planned.
    """

    job_id: str
    provider: str
    base_url: str
    simulated: bool = False
    created_at: float = 0.0
    parts: list[Part] = attrs.Factory(list)
    version: int = _VERSION

    def file_name(self, part: Part) -> str:
        """The name ``part``'s lines are uploaded under (OpenAI keeps it)."""
        return f"trio-llm-{self.job_id}-part{part.index}.jsonl"

    def metadata(self, part: Part) -> dict[str, str]:
        """The metadata of ``part``'s batch: the job and the part (OpenAI keeps it)."""
        return {"trio_llm_job": self.job_id, "trio_llm_part": str(part.index)}

    @property
    def live(self) -> list[Part]:
        """Parts whose lines are not all in OUT yet, and not dropped."""
        return [part for part in self.parts if part.live]


def state_path(output_path: str) -> str:
    """Return where the job state of ``output_path`` is kept: ``OUT.job.json``."""
    return output_path + ".job.json"


def _temporary(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp")


def new_job(provider: str, base_url: str, *, simulated: bool) -> Job:
    """Return a new job with a fresh id and no parts."""
    return Job(
        job_id=secrets.token_hex(6),
        provider=provider,
        base_url=base_url,
        simulated=simulated,
        created_at=time.time(),
    )


def save_job(path: str, job: Job) -> None:
    """Replace the state file with ``job``, atomically and durably (see the module).

    Raises:
        OSError: it could not be written (the old state is left as it was).
    """
    temporary = _temporary(path)
    data = _json.dumps(attrs.asdict(job), exact_non_finite=False)
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    sync_directory(path)


def _bad_state(path: str, why: str) -> BatchInputError:
    return BatchInputError(
        f"{path}: not a trio-llm job state ({why}); it records the batches of {path[:-9]} "
        "at the provider: restore it, or remove it to forget them (their lines are then "
        "sent again)",
        path=path,
        line=1,
        reason=f"not a job state: {why}",
    )


def load_job(path: str) -> Job | None:
    """Read the job state at ``path``; ``None`` if there is none.

    Raises:
        BatchInputError: the file is not a job state (naming it and what to do).
    """
    with contextlib.suppress(OSError):
        os.unlink(_temporary(path))  # a killed save's leftover; the rename never happened
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return None
    try:
        payload: Any = _json.loads(data)
        if not isinstance(payload, dict):
            raise ValueError("not a JSON object")
        if payload.get("version") != _VERSION:
            raise ValueError(f"version {payload.get('version')!r}, expected {_VERSION}")
        parts = [Part(**part) for part in payload.pop("parts")]
        return Job(**payload, parts=parts)
    except (ValueError, TypeError, KeyError) as exc:
        raise _bad_state(path, str(exc)) from None


def refuse_if_batches_run(output_path: str) -> None:
    """Refuse an online run on an output whose job has batches at the provider.

    Their lines would be sent twice, and answered twice.

    Raises:
        ConfigurationError: the job state of ``output_path`` has live parts.
        BatchInputError: it is not a job state.
    """
    path = state_path(output_path)
    job = load_job(path)
    live = job.live if job is not None else []
    if live:
        lines = sum(part.count for part in live)
        raise ConfigurationError(
            f"{output_path} has {len(live)} batch(es) of {lines:,} lines at the provider "
            f"({path}): resume them with --via provider, or cancel them with --via "
            "provider --cancel, before sending lines online"
        )
