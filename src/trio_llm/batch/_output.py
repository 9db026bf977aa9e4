"""The output file: locked, scanned for what it answers, repaired, and appended to.

Each line is one answered input line, in the Batch API output format::

    {"id": "batch_req_...", "custom_id": "a",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A failed request has ``"error": {"code": ..., "message": ...}``; when the server answered
with an error status the line also keeps that ``response`` (status code and error body),
so ``error`` being non-null is the one test of failure. An invalid input line recorded
with ``skip_invalid`` has ``"response": null`` and ``error.line``; when it has no usable
``custom_id`` (or repeats one an earlier line owns) its ``custom_id`` is null and it is
known by that line number.

Files are read and written with plain blocking calls, on purpose: they are local, the
reads are buffered (1 MB) and each line is one small ``write()`` (~1 us), while
``trio.open_file`` would hand every call to a worker thread (tens of microseconds each).
The long passes (scanning, rewriting) checkpoint every few thousand lines.

Durability: each line is written with one ``write()`` of the whole line, unbuffered, so a
killed process leaves at most one partial last line, which the next run repairs. The
file is also ``fsync``\\ ed at most once a second and at the end (an ``fsync`` per line
costs ~150 us here and milliseconds on many disks: more than the request itself).

A write that fails (disk full) is all or nothing too: the file is cut back to the start
of that line and then takes no more lines, so a line cannot follow a fragment even if
space comes back while other replies are waiting to be written (:class:`OutputWriteError`).

Locking and creating the file: see ``_locked``. Temporary files: ``--retry-failed``
rewrites into ``.OUT.retry.tmp`` beside OUT (one fixed name: runs that hold OUT's lock
are the only ones to use it, so whatever a killed run left there is stale, and is
removed when the next run takes the lock).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import IO, Any, Final, final

import attrs
import trio

from .. import _json
from .._errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    BatchInputError,
    LLMError,
    RetryDeadlineExceeded,
    StreamError,
)
from ._keys import FAILED, OK, AnsweredKeys
from ._lines import chunks, estimate_lines, fast_loads
from ._locked import lock, open_locked, remove_if_empty, sync_directory
from ._progress import ScanProgress

__all__ = [
    "OutputFile",
    "OutputScan",
    "OutputWriteError",
    "answer_record",
    "error_record",
    "failure_record",
]

_SYNC_INTERVAL: Final = 1.0
_LINES_PER_CHECKPOINT: Final = 2048


def _dump(record: dict[str, Any]) -> bytes:
    # Records hold decoded replies: no NaN to look for among their many nulls.
    return _json.dumps(record, exact_non_finite=False) + b"\n"


def _new_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def answer_record(
    custom_id: str, *, body: dict[str, Any], request_id: str | None, status_code: int = 200
) -> bytes:
    """Return the output line of a request that succeeded."""
    return _dump(
        {
            "id": _new_id(),
            "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": None,
        }
    )


def error_record(
    custom_id: str | None,
    *,
    code: str,
    message: str,
    line: int | None = None,
    response: dict[str, Any] | None = None,
) -> bytes:
    """Return the output line of a request that failed, or of an invalid input line."""
    error: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    return _dump({"id": _new_id(), "custom_id": custom_id, "response": response, "error": error})


def _status_response(error: APIStatusError) -> dict[str, Any]:
    return {"status_code": error.status_code, "request_id": error.request_id, "body": error.body}


def failure_record(custom_id: str, error: LLMError) -> bytes:
    """Return the output line of a request that ended in ``error``.

    ``error.code`` is the server's error code (or type) for an error status, else
    ``http_<status>``; ``timeout``, ``connection_error``, ``deadline_exceeded``,
    ``invalid_response``, ``stream_error`` or ``client_error`` otherwise.
    """
    response: dict[str, Any] | None = None
    if isinstance(error, APIStatusError):
        code = error.code or error.error_type or f"http_{error.status_code}"
        response = _status_response(error)
    elif isinstance(error, RetryDeadlineExceeded):
        code = "deadline_exceeded"
        if isinstance(error.last_error, APIStatusError):
            response = _status_response(error.last_error)
    elif isinstance(error, APITimeoutError):
        code = "timeout"
    elif isinstance(error, APIConnectionError):
        code = "connection_error"
    elif isinstance(error, APIResponseError):
        code = "invalid_response"
        response = {"status_code": error.status_code, "request_id": error.request_id, "body": None}
    elif isinstance(error, StreamError):  # pragma: no cover - a batch never streams
        code = "stream_error"
    else:  # ConfigurationError and any future LLMError
        code = "client_error"
    return error_record(custom_id, code=code, message=str(error), response=response)


_RESUME: Final = "completed lines are safe; rerun the same command to resume"
_DISK_FULL: Final = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


@final
class OutputWriteError(OSError):
    """Writing the output file failed (disk full, I/O error); it takes no more lines.

    ``str()`` is one line for people: what failed, where, and how to resume. ``errno``
    and ``strerror`` are the cause's; ``filename`` is the file.
    """

    def __init__(self, path: str, cause: OSError, *, doing: str, after: str = _RESUME) -> None:
        detail = cause.strerror or str(cause)
        super().__init__(cause.errno, detail, path)
        what = "disk full" if cause.errno in _DISK_FULL else "error"
        self.message = f"{what} {doing} {path}: {detail}; {after}"

    def __str__(self) -> str:
        return self.message


def _temporary_path(path: str) -> str:
    """Return where ``--retry-failed`` rewrites ``path`` (beside it, hidden, one name)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.retry.tmp")


def _remove_temporaries(path: str, *, earlier: bool = False) -> None:
    """Remove what a killed rewrite of ``path`` left; call it holding ``path``'s lock.

    Only a run holding the lock rewrites, so a temporary file found then is stale. With
    ``earlier``, also the ``OUT.<pid>.tmp`` files of earlier versions (regular files
    with exactly that name). Errors are ignored: this is tidying up.
    """
    with contextlib.suppress(OSError):
        os.unlink(_temporary_path(path))  # a symlink there is removed, never followed
    if not earlier:
        return
    directory, name = os.path.split(path)
    pattern = re.compile(re.escape(name) + r"\.[0-9]+\.tmp")
    with contextlib.suppress(OSError), os.scandir(directory or ".") as entries:
        for entry in entries:
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


@final
@attrs.define(kw_only=True)
class OutputScan:
    """What OUTPUT held when the run started.

    Attributes:
        answered: its ``custom_id``\\ s (answered OK, or with an error) and the line
            numbers of its keyless error lines.
        lines: complete lines.
        failed: lines whose ``error`` is set.
        end: the offset just past the last complete line.
        tail: bytes after ``end`` (a partial line left by a crash), 0 if none.
        tail_complete: whether that tail is a whole record missing only its newline.
        repeated: ``custom_id``\\ s found on more than one line (never written by a
            run, which skips answered ids; kept as they are).
    """

    answered: AnsweredKeys = attrs.Factory(AnsweredKeys)
    lines: int = 0
    failed: int = 0
    end: int = 0
    tail: int = 0
    tail_complete: bool = False
    repeated: int = 0


def _record_key(raw: bytes) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """Parse an output line: ``(custom_id, error, problem)``; ``problem`` if it is not one."""
    try:
        record = _json.loads(raw)  # orjson where it can, json's verdict where it cannot
    except ValueError as exc:
        return None, None, f"invalid JSON: {exc}"
    if not isinstance(record, dict) or "custom_id" not in record:
        return None, None, "no custom_id"
    custom_id, error = record["custom_id"], record.get("error")
    if not (custom_id is None or isinstance(custom_id, str)):
        return None, None, "custom_id is not a string"
    if not (error is None or isinstance(error, dict)):
        return None, None, "error is neither null nor an object"
    if error is None and not isinstance(record.get("response"), dict):
        return None, None, "neither a response nor an error"
    return custom_id, error, None


@final
class OutputFile:
    """A batch's output file, held (locked) by one run from open to close.

    Use :meth:`open`; then :meth:`scan`, :meth:`prepare`, :meth:`write` for each line,
    and :meth:`close` (or the ``with`` block).
    """

    def __init__(self, path: str, file: IO[bytes]) -> None:
        self.path = path
        self._file = file
        self._scan: OutputScan | None = None
        self._next_sync = time.monotonic() + _SYNC_INTERVAL
        self.lines_written = 0
        #: Set by the first failed :meth:`write`; from then on every write raises.
        self.failure: OutputWriteError | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str) -> Iterator[OutputFile]:
        """Open (create) ``path`` for appending, locked against a second run.

        If the block fails before any line was written to a file this run created, the
        empty file is removed again: bad input leaves nothing behind. A file a refused
        run created (it lost the race for the lock) belongs to the run that won it, and
        stays. Temporary files left by a killed run are removed once the lock is held.

        A symbolic link is followed to the file it names (created if missing), and that
        file is what the run locks, rewrites (``--retry-failed``) and tidies up.

        Raises:
            ConfigurationError: another process holds the file (a run still going).
        """
        if os.path.islink(path):
            path = os.path.realpath(path)
        file, created = open_locked(path)
        output = cls(path, file)
        try:
            _remove_temporaries(path)
            yield output
        except BaseException:
            if created and output.lines_written == 0:
                remove_if_empty(output._file, path)  # before close() lets go of the lock
            with contextlib.suppress(OSError):  # the error being raised says more
                output.close()
            raise
        finally:
            output.close()

    def size(self) -> int:
        """Return the file's size now, in bytes."""
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        """Flush to disk and close (which releases the lock); idempotent."""
        if not self._file.closed:
            try:
                self.sync()
            finally:
                self._file.close()

    async def scan(self, *, progress: ScanProgress | None = None) -> OutputScan:
        """Read what the file answers already (the first pass over OUTPUT).

        The table of answered ids is sized up front for the lines the file holds (see
        :func:`~._lines.estimate_lines`). Lines are read with orjson where it can (see
        :func:`_record_key`); the file's lines are read in blocks of a megabyte.

        Args:
            progress: told of each block read.

        Raises:
            BatchInputError: a complete line is not a batch output line (the wrong file?).

        Cancellation: the file is only read; :meth:`prepare` then needs a new scan.
        """
        progress = progress or ScanProgress()
        progress.phase(f"scanning {self.path}")
        with open(self.path, "rb", buffering=0) as reader:  # noqa: ASYNC230 - see top
            scan = OutputScan(answered=AnsweredKeys(estimate_lines(reader)))
            number = 0
            for chunk in chunks(reader):
                await trio.lowlevel.checkpoint()
                progress.advance(len(chunk))
                scan.end += len(chunk)
                lines = chunk.split(b"\n")
                last = lines.pop()  # b"" but after the file's last byte, if not a newline
                number = self._count_lines(scan, lines, number)
                if last:
                    scan.end -= len(last)
                    scan.tail = len(last)
                    scan.tail_complete = _record_key(last)[2] is None
                    if scan.tail_complete:  # only its newline is missing
                        self._count(scan, last, number + 1)
        self._scan = scan
        return scan

    def _count_lines(self, scan: OutputScan, lines: list[bytes], number: int) -> int:
        """Count the complete ``lines`` after line ``number`` into ``scan``; return the last's.

        The lines a run writes are read with orjson and looked at here; any other (blank,
        keyless, refused by orjson, not a batch output line) is left to :meth:`_count`.

        Raises:
            BatchInputError: one is not a batch output line.
        """
        mark, loads = scan.answered.keys.mark, fast_loads
        counted = failed = repeated = 0
        for raw in lines:
            number += 1
            try:
                record = loads(raw)
            except ValueError:
                record = None
            if type(record) is dict:
                custom_id, error = record.get("custom_id"), record.get("error")
                if type(custom_id) is str:
                    if error is None and type(record.get("response")) is dict:
                        counted += 1
                        repeated += bool(mark(custom_id, OK) & (OK | FAILED))
                        continue
                    if type(error) is dict:
                        counted += 1
                        failed += 1
                        repeated += bool(mark(custom_id, FAILED) & (OK | FAILED))
                        continue
            elif not raw or raw.isspace():
                continue
            self._count(scan, raw, number)
        scan.lines += counted
        scan.failed += failed
        scan.repeated += repeated
        return number

    def _count(self, scan: OutputScan, raw: bytes, number: int) -> None:
        """Count the output line ``raw`` (line ``number``) into ``scan``.

        Raises:
            BatchInputError: it is not a batch output line.
        """
        custom_id, error, problem = _record_key(raw)
        if problem is not None:
            # Said as of the line with its newline, as it is in the file.
            problem = _record_key(raw + b"\n")[2]
            raise BatchInputError(
                f"{self.path}:{number}: not a batch output line ({problem}); "
                "is this the right output file? Nothing was sent",
                path=self.path,
                line=number,
                reason=f"not a batch output line: {problem}",
            )
        scan.lines += 1
        if error is not None:
            scan.failed += 1
        if custom_id is None:
            line = error.get("line") if error is not None else None
            if isinstance(line, int):
                scan.answered.failed_lines.add(line)
        elif scan.answered.keys.mark(custom_id, OK if error is None else FAILED) & (OK | FAILED):
            scan.repeated += 1

    async def prepare(self, *, retry_failed: bool) -> list[str]:
        """Repair the file before the run appends to it; return what was done, for people.

        A partial last line is cut off (a whole record missing only its newline gets the
        newline). With ``retry_failed`` the file is rewritten without its error lines
        (into a temporary file, then renamed over it, so a crash leaves the old or the
        new file, never a mix): their ``custom_id``\\ s are then unanswered, and sent
        again, so each still ends up on exactly one line.
        """
        scan = self._scan
        if scan is None:
            raise RuntimeError("scan() first")
        notes: list[str] = []
        if scan.repeated:
            notes.append(
                f"{self.path} has {scan.repeated:,} custom_id(s) on more than one line "
                "(no run writes an id twice; an answer without error counts, and the lines "
                "are kept)"
            )
        if retry_failed and scan.failed:
            await self._drop_failed(scan)
            notes.append(
                f"--retry-failed: removed {scan.failed:,} error line(s) from {self.path} "
                "to send them again"
            )
        elif scan.tail and scan.tail_complete:
            self._file.write(b"\n")
            notes.append(f"repaired {self.path}: its last line had no newline")
        elif scan.tail:
            os.truncate(self._file.fileno(), scan.end)
            notes.append(
                f"repaired {self.path}: removed a partial last line ({scan.tail:,} bytes) "
                "left by an interrupted run"
            )
        return notes

    async def _drop_failed(self, scan: OutputScan) -> None:
        temporary = _temporary_path(self.path)
        # Under the lock: anything at that name is a killed run's (or not ours to follow).
        _remove_temporaries(self.path, earlier=True)
        try:
            with (
                open(self.path, "rb", buffering=1 << 20) as reader,  # noqa: ASYNC230
                open(temporary, "xb") as writer,  # noqa: ASYNC230
            ):
                for number, raw in enumerate(reader, 1):
                    if number % _LINES_PER_CHECKPOINT == 0:
                        await trio.lowlevel.checkpoint()
                    if raw.isspace():
                        continue
                    if not raw.endswith(b"\n"):
                        if not scan.tail_complete:
                            break
                        raw += b"\n"
                    if _record_key(raw)[1] is None:
                        writer.write(raw)
                writer.flush()
                os.fsync(writer.fileno())
            replacement = open(temporary, "ab", buffering=0)  # noqa: ASYNC230, SIM115
            try:
                lock(replacement, temporary)
                os.replace(temporary, self.path)
            except BaseException:
                replacement.close()
                raise
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                after = f"{self.path} is unchanged; free some space and rerun the same command"
                raise OutputWriteError(temporary, exc, doing="writing", after=after) from exc
            raise
        # The lock moves with the new file: a second run that opens the path now finds it.
        self._file.close()
        self._file = replacement
        sync_directory(self.path)

    def write(self, line: bytes) -> None:
        """Append one whole line, then ``fsync`` if a second has passed.

        All or nothing: if the write fails, the file is cut back to where the line began
        and takes no more lines (a fragment cannot end up between whole lines).

        Raises:
            OutputWriteError: this write failed, or an earlier one did.
        """
        if self.failure is not None:
            raise OutputWriteError(self.path, self.failure, doing="writing")
        descriptor = self._file.fileno()
        view = memoryview(line)
        written = 0
        try:
            while written < len(view):
                written += os.write(descriptor, view[written:])
        except OSError as exc:
            self._cut_back(written)
            self.failure = OutputWriteError(self.path, exc, doing="writing")
            raise self.failure from exc
        except BaseException:
            # E.g. KeyboardInterrupt between two parts of a long line: it was not written.
            if not self._cut_back(written):
                cause = OSError(errno.EIO, "a line cut short could not be removed")
                self.failure = OutputWriteError(self.path, cause, doing="writing")
            raise
        self.lines_written += 1
        now = time.monotonic()
        if now >= self._next_sync:
            self.sync()

    def _cut_back(self, written: int) -> bool:
        """Remove the ``written`` bytes of a line cut short; say whether that worked."""
        if not written:
            return True
        descriptor = self._file.fileno()
        try:
            # Appending, and the only writer (the lock): the line began ``written`` back.
            os.ftruncate(descriptor, os.lseek(descriptor, 0, os.SEEK_END) - written)
        except OSError:
            return False  # the fragment stays last: the next run cuts it off
        return True

    def sync(self) -> None:
        """Make every line written so far durable (``fsync``)."""
        os.fsync(self._file.fileno())
        self._next_sync = time.monotonic() + _SYNC_INTERVAL
