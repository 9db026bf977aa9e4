"""The batch output file under races, a full disk and killed rewrites (issue 15, items 1-3).

The races are reproduced, not hoped for: a hook runs one opener's whole step at the exact
point of another's (just before it takes the lock). A full disk is ``os.write`` writing
part of a line and then failing, or a real short write under a file size limit.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_llm
from trio_llm.batch._output import OutputFile, answer_record, error_record
from trio_llm.testing import FakeLLMServer

try:
    import fcntl
    import resource
except ImportError:  # pragma: no cover - Windows: no flock, no file size limit
    fcntl = None  # type: ignore[assignment]
    resource = None  # type: ignore[assignment]

posix_only = pytest.mark.skipif(fcntl is None, reason="needs flock and RLIMIT_FSIZE")


def ok_line(custom_id: str) -> bytes:
    """An output line answering ``custom_id``."""
    return answer_record(custom_id, body={"choices": []}, request_id=None)


def error_line(custom_id: str) -> bytes:
    """An output line recording that ``custom_id`` failed."""
    return error_record(custom_id, code="server_error", message="boom")


def output_ids(path: Path) -> Counter[str]:
    """Count each custom_id in an output file whose every line must be whole."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n")
    return Counter(json.loads(line)["custom_id"] for line in data.splitlines())


def write_prompts(path: Path, count: int) -> Path:
    """Write input lines ``r0`` .. ``r<count-1>``."""
    rows = [
        {"custom_id": f"r{i}", "prompt": f"question {i}", "max_tokens": 5} for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def names_in(directory: Path) -> list[str]:
    """The names in ``directory``, sorted (hidden ones too)."""
    return sorted(path.name for path in directory.iterdir())


def open_and_close(path: Path) -> None:
    """Open ``path`` as a run's output and let go of it at once."""
    with OutputFile.open(str(path)):
        pass


def before_next_lock(monkeypatch: pytest.MonkeyPatch, step: Callable[[], object]) -> None:
    """Run ``step`` once, just before the next ``flock`` call takes its lock."""
    real = fcntl.flock
    pending = [step]

    def flock(descriptor: int, operation: int) -> None:
        if pending:
            pending.pop()()
        real(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


def throw(error: BaseException) -> None:
    """Raise ``error`` (for lambdas)."""
    raise error


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` and its nested groups (``[exc]`` for a plain one)."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple):
        return [leaf for child in inner for leaf in leaves(child)]
    return [exc]


class FillingDisk:
    """``os.write`` on one file: after ``whole`` writes, half a write, then the disk is full.

    The disk stays full for one more call; after that space is back, which is when a file
    that still took lines would get a whole line after the fragment.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path, *, whole: int) -> None:
        self.path = path
        self.whole = whole
        self.calls = 0
        self.real = os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, descriptor: int, data: Any) -> int:
        """Write like ``os.write``, except on the one file as described above."""
        if not (self.path.exists() and os.path.samestat(os.fstat(descriptor), os.stat(self.path))):
            return self.real(descriptor, data)
        self.calls += 1
        if self.calls == self.whole + 1:
            return self.real(descriptor, bytes(data)[: len(data) // 2])
        if self.calls == self.whole + 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(descriptor, data)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Let this process write files up to ``limit`` bytes only (the kernel cuts writes)."""
    assert resource is not None
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail with EFBIG, do not die
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# Item 1: two runs on one new output file.


@posix_only
def test_a_run_refused_on_a_new_file_leaves_the_winners_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run losing the lock on a file it just created removes nothing; the winner's line stays."""
    target = tmp_path / "out.jsonl"
    with contextlib.ExitStack() as stack:
        winners: list[OutputFile] = []
        before_next_lock(
            monkeypatch, lambda: winners.append(stack.enter_context(OutputFile.open(str(target))))
        )
        with pytest.raises(trio_llm.ConfigurationError, match="another 'trio-llm batch' run"):
            open_and_close(target)
        winners[0].write(ok_line("a"))
    assert output_ids(target) == {"a": 1}


@posix_only
def test_an_open_racing_the_removal_of_a_new_empty_file_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that opened a file its creator then removed ends up writing the file the path names."""
    target = tmp_path / "out.jsonl"
    creator = OutputFile.open(str(target))
    creator.__enter__()
    failure = ValueError("bad input line")
    before_next_lock(monkeypatch, lambda: creator.__exit__(ValueError, failure, None))
    with OutputFile.open(str(target)) as output:
        output.write(ok_line("a"))
    assert output_ids(target) == {"a": 1}


@posix_only
def test_an_open_racing_a_retry_failed_rewrite_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that opened the file just before --retry-failed replaced it is refused, not misled."""
    target = tmp_path / "out.jsonl"
    target.write_bytes(ok_line("a") + error_line("b"))
    with OutputFile.open(str(target)) as holder:
        trio.run(holder.scan)
        rewrite = functools.partial(holder.prepare, retry_failed=True)
        before_next_lock(monkeypatch, lambda: trio.run(rewrite))
        with pytest.raises(trio_llm.ConfigurationError, match="another 'trio-llm batch' run"):
            open_and_close(target)
        holder.write(ok_line("b"))
    assert output_ids(target) == {"a": 1, "b": 1}


# Item 2: a failed write is all or nothing, and the file then takes no more lines.


async def test_a_write_that_fills_the_disk_is_cut_back_and_the_file_takes_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_llm: FakeLLMServer
) -> None:
    """Disk full mid-line: the fragment is removed, later lines refused, and a resume completes."""
    source, target = write_prompts(tmp_path / "in.jsonl", 4), tmp_path / "out.jsonl"
    with monkeypatch.context() as patch, OutputFile.open(str(target)) as output:
        FillingDisk(patch, target, whole=2)
        output.write(ok_line("r0"))
        output.write(ok_line("r1"))
        with pytest.raises(OSError, match=r"^disk full writing ") as caught:
            output.write(ok_line("r2"))
        with pytest.raises(OSError, match=r"^disk full writing "):
            output.write(ok_line("r3"))  # space is back: still refused
    assert str(caught.value) == (
        f"disk full writing {target}: No space left on device; "
        "completed lines are safe; rerun the same command to resume"
    )
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))
    assert output_ids(target) == {"r0": 1, "r1": 1}
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        summary = await trio_llm.run_batch(source, target, client=client)
    assert (summary.skipped, summary.succeeded) == (2, 2)
    assert output_ids(target) == {f"r{i}": 1 for i in range(4)}


async def test_a_run_whose_disk_fills_stops_with_whole_lines_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_llm: FakeLLMServer
) -> None:
    """A run stops on its first failed write; the file holds whole lines; rerunning completes."""
    source, target = write_prompts(tmp_path / "in.jsonl", 20), tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with monkeypatch.context() as patch:
            FillingDisk(patch, target, whole=5)
            with pytest.raises(BaseException) as caught:  # noqa: PT011 - the leaves are checked
                await trio_llm.run_batch(source, target, client=client, concurrency=4)
        failures = leaves(caught.value)
        assert failures
        assert all(str(error).startswith(f"disk full writing {target}: ") for error in failures)
        assert output_ids(target).total() == 5
        summary = await trio_llm.run_batch(source, target, client=client)
    assert (summary.skipped, summary.succeeded) == (5, 15)
    assert output_ids(target) == {f"r{i}": 1 for i in range(20)}


@posix_only
def test_a_write_the_kernel_cuts_short_leaves_only_whole_lines(tmp_path: Path) -> None:
    """A real short write (the file size limit) is cut back, and the file takes no more lines."""
    target = tmp_path / "out.jsonl"
    with OutputFile.open(str(target)) as output:
        output.write(ok_line("r0"))
        with file_size_limit(target.stat().st_size + 10), pytest.raises(OSError, match="large"):
            output.write(ok_line("r1"))
        with pytest.raises(OSError, match=f"^error writing {target}: "):
            output.write(ok_line("r2"))  # the limit is lifted: still refused
    assert output_ids(target) == {"r0": 1}


def test_a_fragment_that_cannot_be_cut_back_stays_last_and_is_repaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If cutting the fragment fails too, it stays the last line, and the next run cuts it off."""
    target, first = tmp_path / "out.jsonl", ok_line("r0")
    with OutputFile.open(str(target)) as output:
        with monkeypatch.context() as patch:
            FillingDisk(patch, target, whole=1)
            patch.setattr(os, "ftruncate", lambda *_: throw(OSError(errno.EIO, "I/O error")))
            output.write(first)
            with pytest.raises(OSError, match=r"^disk full writing "):
                output.write(ok_line("r1"))
        with pytest.raises(OSError, match=r"^disk full writing "):
            output.write(ok_line("r2"))
    assert target.read_bytes().startswith(first)
    assert not target.read_bytes().endswith(b"\n")
    with OutputFile.open(str(target)) as output:
        trio.run(output.scan)
        notes = trio.run(functools.partial(output.prepare, retry_failed=False))
    assert "removed a partial last line" in notes[0]
    assert target.read_bytes() == first


def test_an_interrupted_write_is_cut_back_and_the_file_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C between two parts of a line removes the part written; later lines are taken."""
    target = tmp_path / "out.jsonl"
    real = os.write
    parts: list[int] = []

    def write(descriptor: int, data: Any) -> int:
        parts.append(len(data))
        if len(parts) == 1:
            return real(descriptor, bytes(data)[:7])
        raise KeyboardInterrupt

    with OutputFile.open(str(target)) as output:
        with monkeypatch.context() as patch:
            patch.setattr(os, "write", write)
            with pytest.raises(KeyboardInterrupt):
                output.write(ok_line("r0"))
        output.write(ok_line("r1"))
    assert output_ids(target) == {"r1": 1}


def test_a_rewrite_that_fills_the_disk_leaves_the_output_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full while --retry-failed rewrites: one clear error, OUT unchanged, no temporary."""
    target = tmp_path / "out.jsonl"
    before = ok_line("a") + error_line("b")
    target.write_bytes(before)
    temporary = tmp_path / ".out.jsonl.retry.tmp"
    real = os.fsync

    def fsync(descriptor: int) -> None:
        if temporary.exists() and os.path.samestat(os.fstat(descriptor), os.stat(temporary)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    with OutputFile.open(str(target)) as output:
        trio.run(output.scan)
        with pytest.raises(OSError, match=r"^disk full writing ") as caught:
            trio.run(functools.partial(output.prepare, retry_failed=True))
    assert str(caught.value).endswith(
        f"{target} is unchanged; free some space and rerun the same command"
    )
    assert target.read_bytes() == before
    assert names_in(tmp_path) == ["out.jsonl"]


# Item 3: temporary files of a killed --retry-failed rewrite.


def with_errors(tmp_path: Path) -> tuple[Path, Path]:
    """Input ``r0``..``r3`` and an output answering ``r0``, ``r1`` and failing ``r2``, ``r3``."""
    source, target = write_prompts(tmp_path / "in.jsonl", 4), tmp_path / "out.jsonl"
    target.write_bytes(ok_line("r0") + ok_line("r1") + error_line("r2") + error_line("r3"))
    return source, target


@pytest.mark.parametrize(
    "leftover",
    [f"out.jsonl.{os.getpid()}.tmp", "out.jsonl.1.tmp", ".out.jsonl.retry.tmp"],
    ids=["earlier-same-pid", "earlier-other-pid", "current"],
)
async def test_a_killed_rewrites_temporary_file_is_no_obstacle_and_is_removed(
    tmp_path: Path, fake_llm: FakeLLMServer, leftover: str
) -> None:
    """A temporary file of a killed --retry-failed (any pid) neither stops the next nor stays."""
    source, target = with_errors(tmp_path)
    (tmp_path / leftover).write_bytes(ok_line("r0") + b'{"custom_id": "r1", "respo')
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        summary = await trio_llm.run_batch(source, target, client=client, retry_failed=True)
    assert (summary.skipped, summary.succeeded) == (2, 2)
    assert output_ids(target) == {f"r{i}": 1 for i in range(4)}
    assert names_in(tmp_path) == ["in.jsonl", "out.jsonl"]


async def test_a_stale_rewrite_is_removed_by_a_plain_resume(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """A run without --retry-failed also removes the rewrite a killed run left (under the lock)."""
    source, target = with_errors(tmp_path)
    (tmp_path / ".out.jsonl.retry.tmp").write_bytes(ok_line("r0"))
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        await trio_llm.run_batch(source, target, client=client)
    assert names_in(tmp_path) == ["in.jsonl", "out.jsonl"]


@posix_only
async def test_a_symlink_at_the_temporary_name_is_not_followed(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """--retry-failed removes a symlink at its temporary name; the file it names is untouched."""
    source, target = with_errors(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / ".out.jsonl.retry.tmp").symlink_to(victim)
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        await trio_llm.run_batch(source, target, client=client, retry_failed=True)
    assert victim.read_text() == "keep me\n"
    assert output_ids(target) == {f"r{i}": 1 for i in range(4)}
    assert names_in(tmp_path) == ["in.jsonl", "out.jsonl", "victim.txt"]
