"""The built-in response cache: one SQLite file, shared safely by several processes.

Under Trio, without a thread per request: :func:`open_sqlite_cache` starts ONE worker
thread (``trio.to_thread.run_sync``, a limiter of its own) in its nursery, which owns the
connection for as long as the block lasts (:mod:`trio_llm._cache_worker`). Tasks hand it
jobs through a mailbox; it takes every job waiting at once and answers the lookups of a
batch with one ``run_sync_soon`` into Trio. A lookup costs one wake-up each way
(``benchmarks/cache.py``); a store does not wait, nor wake the worker: stores are
committed together, within 50 ms, or at once by :meth:`SQLiteCache.commit`.

The file (format 1, ``PRAGMA user_version``; ``PRAGMA application_id`` marks it as
trio-llm's)::

    entries(key TEXT PRIMARY KEY, value BLOB, size, created_at, used_at)
    meta(name, value)       created_at, hits (since creation), bytes (sum of entry sizes)

WAL mode, ``synchronous=NORMAL``: readers never wait for a writer, several processes share
the file (on one machine: WAL needs shared memory, so not over a network file system),
and a crash loses at most the stores of its last 50 ms, never the file's integrity.
Writers queue on SQLite's lock (``busy_timeout``), held only while a commit runs.
Triggers keep ``bytes`` exact whoever writes. Lookups mark entries used (``used_at``, the
hit count), written with the next commit or within a second; eviction removes the least
recently used entries beyond ``max_bytes``; entries older than ``ttl`` are misses.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Final, final

import trio

from ._cache_worker import STOP, Ask, Mailbox, Store, Worker, wake
from ._errors import CacheError, ConfigurationError
from ._fanout import open_owning_nursery

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FILE_FORMAT",
    "SQLiteCache",
    "connect",
    "open_sqlite_cache",
]

#: The version of the file's layout (``PRAGMA user_version``).
FILE_FORMAT: Final = 1
#: ``max_bytes`` unless given: 1 GiB of stored replies.
DEFAULT_MAX_BYTES: Final = 1 << 30

_APPLICATION_ID: Final = 0x74726C63  # "trlc": a trio-llm cache
_BUSY_TIMEOUT: Final = 10.0  # seconds a write waits for another process's

_SCHEMA: Final = (
    "CREATE TABLE entries (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL, "
    "size INTEGER NOT NULL, created_at REAL NOT NULL, used_at REAL NOT NULL)",
    "CREATE INDEX entries_by_use ON entries (used_at)",
    "CREATE INDEX entries_by_age ON entries (created_at)",
    "CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value NOT NULL)",
    # `bytes` stays exact whoever writes (this client, another process, `cache clear`).
    "CREATE TRIGGER entry_added AFTER INSERT ON entries BEGIN "
    "UPDATE meta SET value = value + NEW.size WHERE name = 'bytes'; END",
    "CREATE TRIGGER entry_removed AFTER DELETE ON entries BEGIN "
    "UPDATE meta SET value = value - OLD.size WHERE name = 'bytes'; END",
    "CREATE TRIGGER entry_replaced AFTER UPDATE OF size ON entries BEGIN "
    "UPDATE meta SET value = value - OLD.size + NEW.size WHERE name = 'bytes'; END",
)


def _uri(path: str, *, create: bool) -> str:
    return Path(path).absolute().as_uri() + ("?mode=rwc" if create else "?mode=rw")


def connect(
    path: str | os.PathLike[str], *, create: bool, check: bool = True
) -> sqlite3.Connection:
    """Open the cache file ``path`` (blocking), in WAL mode; create it if ``create``.

    ``check`` runs SQLite's ``quick_check`` over the whole file (about 0.5 ms per MB),
    so that a damaged file is refused here rather than found in the middle of a job.
    The connection may be used from another thread than this one (one at a time).

    Raises:
        CacheError: the file cannot be opened or created, is not a trio-llm cache, is
            corrupt, or was written by a newer trio-llm.
    """
    shown = os.fspath(path)
    try:
        connection = sqlite3.connect(
            _uri(shown, create=create),
            uri=True,
            timeout=_BUSY_TIMEOUT,
            isolation_level=None,  # transactions are ours: BEGIN IMMEDIATE ... COMMIT
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise CacheError(f"cannot open the cache file {shown}: {exc}", path=shown) from exc
    try:
        _prepare(connection, shown, check=check)
    except sqlite3.Error as exc:
        connection.close()
        raise CacheError(
            f"{shown} cannot be used as a cache ({exc}): it is corrupt or not a cache; "
            "delete it (or name another file) to start an empty cache",
            path=shown,
        ) from exc
    except BaseException:
        connection.close()
        raise
    return connection


def _prepare(connection: sqlite3.Connection, shown: str, *, check: bool) -> None:
    """Check what the file is, create its tables if it is new, and set the connection up."""
    execute = connection.execute
    execute("BEGIN")  # one snapshot: another process may be creating the file right now
    try:
        _check_kind(connection, shown)  # before WAL mode: never change another kind of file
    finally:
        execute("ROLLBACK")
    if _wal_mode(connection) != "wal":
        raise CacheError(f"{shown}: SQLite refused WAL mode for this file", path=shown)
    execute("PRAGMA synchronous = NORMAL")
    execute("BEGIN IMMEDIATE")  # a second process creating the file waits here
    try:
        if _check_kind(connection, shown) == 0:
            for statement in _SCHEMA:
                execute(statement)
            execute(
                "INSERT INTO meta (name, value) VALUES ('created_at', ?), ('hits', 0), "
                "('bytes', 0)",
                (time.time(),),
            )
            execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            execute(f"PRAGMA user_version = {FILE_FORMAT}")
        execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            execute("ROLLBACK")
        raise
    if check:
        problems = [row[0] for row in execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems[:3]))


def _wal_mode(connection: sqlite3.Connection) -> str:
    """Put the file in WAL mode (it stays so); return the mode it is in.

    Switching fails at once, without SQLite's busy wait, while another connection has the
    file open: that happens only while several openers create a new file at once, so the
    switch is retried for as long as a write would wait.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT
    while True:
        mode = str(connection.execute("PRAGMA journal_mode").fetchone()[0])
        if mode == "wal":
            return mode
        try:
            return str(connection.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.005)


def _check_kind(connection: sqlite3.Connection, shown: str) -> int:
    """Return the file's format (0: an empty new file); refuse any other kind of file."""
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if application_id == 0 and version == 0:
        if connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise CacheError(f"{shown} is an SQLite database, but not a trio-llm cache", path=shown)
        return 0
    if application_id != _APPLICATION_ID:
        raise CacheError(f"{shown} is an SQLite database, but not a trio-llm cache", path=shown)
    if version > FILE_FORMAT:
        raise CacheError(
            f"{shown} was written by a newer trio-llm (cache format {version}; this "
            f"version reads format {FILE_FORMAT}): upgrade trio-llm, or name another file",
            path=shown,
        )
    if version != FILE_FORMAT:
        raise CacheError(f"{shown}: unknown cache format {version}", path=shown)
    return int(version)


@final
class SQLiteCache:
    """A response cache in an SQLite file; open it with :func:`open_sqlite_cache`.

    Satisfies :class:`~trio_llm.ResponseCache`. One worker thread serves it, whatever
    the number of tasks and clients using it.
    """

    def __init__(self, path: str, *, mailbox: Mailbox, clock: Callable[[], float]) -> None:
        self._path = path
        self._mailbox = mailbox
        self._clock = clock
        self._closed = False

    def __repr__(self) -> str:
        return f"<trio_llm.SQLiteCache {self._path!r}>"

    @property
    def path(self) -> str:
        """The cache file."""
        return self._path

    async def _ask(self, key: str | None) -> bytes | None:
        job = Ask(key, self._clock(), trio.lowlevel.current_task())
        self._mailbox.put(job, wake=True)

        def abort(_: Any) -> trio.lowlevel.Abort:
            job.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        value: bytes | None = await trio.lowlevel.wait_task_rescheduled(abort)
        return value

    async def get(self, key: str) -> bytes | None:
        """Return the value stored under ``key``; ``None`` if absent, expired or closed.

        Values stored by this cache are found at once; those of other processes once
        they are committed. A failure to read the file is a miss (logged once).

        Cancellation: the lookup is abandoned; nothing is changed.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return None
        return await self._ask(key)

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, as :meth:`set_nowait` does.

        Cancellation: never blocks; the value is stored or not, as if not cancelled.
        """
        self.set_nowait(key, value)
        await trio.lowlevel.checkpoint()

    def set_nowait(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``; committed within 50 ms (with others: batched).

        Returns at once; lookups made after it see it. A failure to write is logged
        once as a warning. Ignored once the cache is closed.
        """
        if not self._closed:
            self._mailbox.put(Store(key, value, self._clock()), wake=False)

    async def commit(self) -> None:
        """Commit every value stored so far: other processes see them once this returns.

        Leaving :func:`open_sqlite_cache`'s block commits too; stores are otherwise
        committed within 50 ms. Does nothing once the cache is closed.

        Cancellation: the commit happens anyway, soon; this returns without waiting for it.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        await self._ask(None)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._mailbox.put(STOP, wake=True)


def _check_settings(max_bytes: object, ttl: object) -> None:
    if max_bytes is not None and (
        not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1
    ):
        raise ConfigurationError(f"max_bytes must be an int >= 1 or None, not {max_bytes!r}")
    if ttl is not None and (
        not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not ttl > 0
    ):
        raise ConfigurationError(f"ttl must be a number of seconds > 0 or None, not {ttl!r}")


@asynccontextmanager
async def open_sqlite_cache(
    path: str | os.PathLike[str],
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    ttl: float | None = None,
    clock: Callable[[], float] = time.time,
    check: bool = True,
) -> AsyncIterator[SQLiteCache]:
    """Open a response cache in the SQLite file ``path`` (created if missing).

    Pass the cache to :func:`open_client` (``cache=``); ``open_client(cache=path)`` opens
    one with the defaults. Several clients, and several processes, may share a file.

    Args:
        path: the file. Its directory must exist. Not on a network file system.
        max_bytes: the most bytes of stored replies (keys and values) kept; beyond, the
            least recently used are removed. ``None``: no bound. The file is larger by
            SQLite's overhead (indexes, free pages).
        ttl: seconds after which a stored reply is a miss (and is removed); ``None``:
            replies never expire.
        clock: the time in seconds, read in Trio's thread; ``time.time`` by default
            (stored times outlive the process). Tests may pass a fake.
        check: verify the whole file when opening it (SQLite's ``quick_check``, about
            0.5 ms per MB), so that a damaged file is refused here, not found mid-job.

    Raises:
        CacheError: the file cannot be opened or created, is not a trio-llm cache, is
            corrupt, or was written by a newer trio-llm.
        ConfigurationError: ``max_bytes`` or ``ttl`` is invalid.

    Leaving the block commits what is stored and closes the file, cancelled or not (it
    waits for the worker thread to finish its batch).
    """
    _check_settings(max_bytes, ttl)
    shown = os.fspath(path)
    with trio.CancelScope(shield=True):  # an open connection must not be lost
        connection = await trio.to_thread.run_sync(
            partial(connect, shown, create=True, check=check)
        )
    mailbox = Mailbox()
    cache = SQLiteCache(shown, mailbox=mailbox, clock=clock)
    token = trio.lowlevel.current_trio_token()
    worker = Worker(
        connection,
        shown=shown,
        max_bytes=max_bytes,
        ttl=ttl,
        answer=lambda jobs: token.run_sync_soon(wake, jobs),
    )
    try:
        async with open_owning_nursery() as nursery:
            nursery.start_soon(_serve, worker, mailbox)
            try:
                yield cache
            finally:
                cache._close()
    finally:
        cache._close()


async def _serve(worker: Worker, mailbox: Mailbox) -> None:
    """Run the worker in its thread; the thread ends once the cache is closed."""
    started = False

    def run() -> None:
        nonlocal started
        started = True
        worker.run(mailbox)

    try:
        await trio.to_thread.run_sync(run, limiter=trio.CapacityLimiter(1))
    finally:
        if not started:  # cancelled before the thread began: close the file here
            stopped = Mailbox()
            stopped.put(STOP, wake=True)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(worker.run, stopped)
