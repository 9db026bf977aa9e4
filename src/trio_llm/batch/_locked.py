"""Open a file that one run at a time may write: created or opened, then locked, then checked.

Two runs on one output file must never both write it, and no run may write a file that
no path leads to any more. Each run therefore:

1. creates the path with ``O_EXCL`` (so it knows it created the file), or opens it;
2. takes an exclusive advisory lock (``flock``) without waiting: held, it is refused;
3. checks that the path still names the file it locked. A run that opened the path just
   before the holder removed it (the holder created it, then failed before writing) or
   replaced it (``--retry-failed`` renames its rewrite over it) locks a file no path leads
   to; it lets go and starts again, and then finds the new file (or creates one).

A file is removed only by the run that created it *and* holds its lock, while still
holding it (:func:`remove_if_empty`). A run refused at step 2 removes nothing, even a file
it created an instant before: the run that locked it first is writing it. (If that run
then fails before its first line, the empty file stays: it did not create it. An empty
output is a valid one; the next run uses it.)
"""

from __future__ import annotations

import os
from typing import IO, Final

from .._errors import ConfigurationError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, no second-run guard
    fcntl = None  # type: ignore[assignment]

__all__ = ["lock", "names", "open_locked", "remove_if_empty", "sync_directory"]

_APPEND: Final = os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0)
# Each new attempt needs another process to have removed or replaced the file since the
# last one: a few attempts only fail if the path keeps changing under us.
_ATTEMPTS: Final = 16


def lock(file: IO[bytes], path: str) -> None:
    """Take ``file``'s exclusive lock without waiting (released when it is closed).

    Raises:
        ConfigurationError: another process holds it.
    """
    if fcntl is None:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigurationError(
            f"{path} is being written by another 'trio-llm batch' run; "
            "wait for it to end, or choose another output file"
        ) from None


def names(path: str, file: IO[bytes]) -> bool:
    """Say whether ``path`` (still) leads to the open ``file``."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(file.fileno())
    return (status.st_dev, status.st_ino) == (mine.st_dev, mine.st_ino)


def open_locked(path: str) -> tuple[IO[bytes], bool]:
    """Open ``path`` for appending (creating it if missing), locked; see the module notes.

    Returns:
        The file (unbuffered, locked), and whether this call created it.

    Raises:
        ConfigurationError: another process holds the file, or keeps replacing it.
        OSError: the path cannot be opened or created.
    """
    for _ in range(_ATTEMPTS):
        try:
            descriptor = os.open(path, _APPEND | os.O_CREAT | os.O_EXCL, 0o666)
            created = True
        except FileExistsError:
            try:
                descriptor = os.open(path, _APPEND)
            except FileNotFoundError:
                continue  # removed in between: create it
            created = False
        file = open(descriptor, "ab", buffering=0)  # noqa: SIM115 - returned, or closed here
        try:
            lock(file, path)
            if names(path, file):
                return file, created
        except BaseException:
            # Never removed here, created or not: the run that holds the lock writes it.
            file.close()
            raise
        file.close()  # removed or replaced since we opened it: start again
    raise ConfigurationError(f"{path} keeps being removed or replaced by another process")


def remove_if_empty(file: IO[bytes], path: str) -> None:
    """Remove ``path`` if it still leads to ``file`` and that file is empty.

    Call it while holding ``file``'s lock, on a file this run created: a run that opened
    the path meanwhile finds (once it gets the lock) that no path leads to its file, and
    starts again. Errors are ignored: this is tidying up after another failure.
    """
    try:
        if os.fstat(file.fileno()).st_size == 0 and names(path, file):
            os.unlink(path)
    except OSError:
        pass


def sync_directory(path: str) -> None:
    """Make a rename in ``path``'s directory durable (POSIX; a no-op where unsupported)."""
    try:
        descriptor = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(descriptor)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(descriptor)
