"""The SQLite cache's worker thread: it alone touches the connection.

Trio's side (:class:`~trio_llm._cache_sqlite.SQLiteCache`) hands it jobs through a
:class:`Mailbox`; the worker takes every job waiting at once and runs them in order:

- a lookup (:class:`Ask` with a key) is answered from the stores not yet written, else
  from the file; the batch's answers go back to Trio in one ``run_sync_soon`` (:func:`wake`);
- a store (:class:`Store`) is kept in memory and written with the next commit; a store
  does not wake the worker (when it sleeps with a deadline), so a miss costs one wake-up;
- a commit request (:class:`Ask` without a key) is answered once everything stored before
  it is committed.

Commits group the stores of up to :data:`COMMIT_DELAY` seconds (or :data:`BATCH` of them)
in one transaction, with the marks of lookups (``used_at``, the hit count: written within
:data:`MARK_INTERVAL`), the purge of expired entries and the eviction beyond
``max_bytes``. The write lock is held only while a commit runs. A crash loses the stores
of at most the last :data:`COMMIT_DELAY` seconds, and never the file's integrity (WAL).
"""

from __future__ import annotations

import logging
import math
import queue
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, final

import outcome
import trio

__all__ = ["BATCH", "COMMIT_DELAY", "MARK_INTERVAL", "STOP", "Ask", "Mailbox", "Store", "Worker"]

logger = logging.getLogger("trio_llm")

#: Seconds a store may wait for its commit (so for other processes to see it).
COMMIT_DELAY: Final = 0.05
#: Stores that make a commit at once.
BATCH: Final = 256
#: Seconds the marks of lookups may wait for a commit.
MARK_INTERVAL: Final = 1.0
_PURGE_INTERVAL: Final = 60.0  # seconds (by the cache's clock) between purges of expired

_UPSERT: Final = (
    "INSERT INTO entries (key, value, size, created_at, used_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, size = excluded.size, "
    "created_at = excluded.created_at, used_at = excluded.used_at"
)


@final
class Ask:
    """A job a task waits for: a lookup of ``key``, or (``key`` None) a commit."""

    __slots__ = ("abandoned", "key", "now", "task", "value")

    def __init__(self, key: str | None, now: float, task: trio.lowlevel.Task) -> None:
        self.key = key
        self.now = now  # by the cache's clock
        self.task = task
        self.value: bytes | None = None
        self.abandoned = False  # cancelled: nobody waits for the answer


@final
class Store:
    """A value to store; nobody waits for it."""

    __slots__ = ("key", "now", "value")

    def __init__(self, key: str, value: bytes, now: float) -> None:
        self.key = key
        self.value = value
        self.now = now


#: The last job: commit what is left, close the connection, end the thread.
STOP: Final = object()
_NOTHING: Final = object()  # wakes the worker, and is no job


def wake(jobs: list[Ask]) -> None:
    """Give each waiting task its answer (run in Trio's thread, by ``run_sync_soon``)."""
    for job in jobs:
        if not job.abandoned:
            trio.lowlevel.reschedule(job.task, outcome.Value(job.value))


@final
class Mailbox:
    """Jobs from Trio's thread to the worker's: wakes the worker only when needed.

    Lookups, commit requests and :data:`STOP` go through a queue and wake the worker;
    stores go to a list beside it and wake the worker only if it sleeps with no deadline
    (else its deadline, or the next lookup, picks them up). Both sides set their own flag
    or list, then read the other's, so one of them always sees the other: a store is
    never left behind a sleeping worker.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stores: deque[Any] = deque()
        self._idle = False  # the worker sleeps with no deadline: only the queue wakes it

    def put(self, job: object, *, wake: bool) -> None:
        """Add ``job``; wake the worker if ``wake``, or if nothing else would."""
        if wake:
            self._queue.put(job)
            return
        self._stores.append(job)
        if self._idle:
            self._queue.put(_NOTHING)

    def take(self, timeout: float | None) -> list[Any]:
        """Return the jobs waiting (stores first), waiting up to ``timeout`` s for one."""
        stores = self._stores
        if timeout is None:
            self._idle = True
            if stores:  # a store came before the flag was seen: do not sleep
                timeout = 0.0
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            first = _NOTHING
        self._idle = False
        jobs = []
        while stores:
            jobs.append(stores.popleft())
        if first is not _NOTHING:
            jobs.append(first)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not _NOTHING:
                jobs.append(job)


@final
class Worker:
    """The thread's side of a cache: owns the connection; runs jobs until :data:`STOP`."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        shown: str,
        max_bytes: int | None,
        ttl: float | None,
        answer: Callable[[list[Ask]], None],
    ) -> None:
        self._db = connection
        self._shown = shown
        self._max_bytes = max_bytes
        self._ttl = ttl
        self._answer = answer
        self._unwritten: dict[str, Store] = {}
        self._unwritten_since = math.inf  # monotonic time of the oldest unwritten store
        self._used: dict[str, float] = {}  # lookups answered, not yet marked: key -> time
        self._hits = 0
        self._marked_at = time.monotonic()
        self._purged_at = -math.inf
        self._now = 0.0  # the latest job's time, by the cache's clock
        self._warned: set[str] = set()

    def run(self, mailbox: Mailbox) -> None:
        """Serve ``mailbox`` until :data:`STOP`; then commit what is left and close."""
        try:
            while not self._serve(mailbox.take(self._timeout())):
                pass
        finally:
            self._db.close()

    def _timeout(self) -> float | None:
        """Seconds until something must be committed; ``None``: nothing is waiting."""
        due = self._unwritten_since + COMMIT_DELAY
        if self._used:
            due = min(due, self._marked_at + MARK_INTERVAL)
        return None if due == math.inf else max(0.0, due - time.monotonic())

    def _serve(self, jobs: list[Any]) -> bool:
        """Run ``jobs`` in order, commit if due, answer; return whether to stop."""
        stop = commit = False
        answered: list[Ask] = []
        for job in jobs:
            if job is STOP:
                stop = True
            elif type(job) is Store:
                self._now = job.now
                if not self._unwritten:
                    self._unwritten_since = time.monotonic()
                self._unwritten[job.key] = job
            else:
                self._now = job.now
                if job.key is None:
                    commit = True
                else:
                    job.value = self._read(job)
                answered.append(job)
        now = time.monotonic()
        due = (
            stop
            or len(self._unwritten) >= BATCH
            or now >= self._unwritten_since + COMMIT_DELAY
            or (bool(self._used) and now >= self._marked_at + MARK_INTERVAL)
        )
        if commit:
            self._commit()  # before answering: the answer says it is done
        if answered:
            self._answer(answered)
        if due and not commit:
            self._commit()
        return stop

    def _read(self, job: Ask) -> bytes | None:
        key = job.key
        assert key is not None
        stored = self._unwritten.get(key)
        if stored is not None:
            value, created_at = stored.value, stored.now
        else:
            try:
                row = self._db.execute(
                    "SELECT value, created_at FROM entries WHERE key = ?", (key,)
                ).fetchone()
            except sqlite3.Error as exc:
                self._warn("lookups", exc)
                return None
            if row is None:
                return None
            value, created_at = bytes(row[0]), row[1]
        if self._ttl is not None and created_at <= job.now - self._ttl:
            return None  # expired; removed by the next purge
        self._used[key] = job.now
        self._hits += 1
        return value

    def _commit(self) -> None:
        """Write the stores and marks, purge, evict: one transaction."""
        stores, used, hits = self._unwritten, self._used, self._hits
        self._unwritten, self._used, self._hits = {}, {}, 0
        self._unwritten_since = math.inf
        self._marked_at = time.monotonic()
        if not (stores or used):
            return
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")  # waits (busy_timeout) for another writer
            db.executemany(
                _UPSERT,
                [
                    (key, job.value, len(key) + len(job.value), job.now, job.now)
                    for key, job in stores.items()
                ],
            )
            if used:
                db.executemany(
                    "UPDATE entries SET used_at = max(used_at, ?) WHERE key = ?",
                    [(at, key) for key, at in used.items()],
                )
                db.execute("UPDATE meta SET value = value + ? WHERE name = 'hits'", (hits,))
            if self._ttl is not None and self._now - self._purged_at >= _PURGE_INTERVAL:
                self._purged_at = self._now  # by the cache's clock, as the ttl
                db.execute("DELETE FROM entries WHERE created_at <= ?", (self._now - self._ttl,))
            if self._max_bytes is not None:
                self._evict(self._max_bytes)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            # A full disk, say: these stores are dropped (retrying would hold them in
            # memory without bound); the worker goes on.
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._warn("writes", exc)

    def _evict(self, max_bytes: int) -> None:
        """Remove the least recently used entries until they hold at most ``max_bytes``."""
        execute = self._db.execute
        total = execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0]
        while total > max_bytes:
            doomed = []
            for key, size in execute(
                "SELECT key, size FROM entries ORDER BY used_at LIMIT 64"
            ).fetchall():
                doomed.append((key,))
                total -= size
                if total <= max_bytes:
                    break
            if not doomed:
                return
            self._db.executemany("DELETE FROM entries WHERE key = ?", doomed)

    def _warn(self, what: str, exc: sqlite3.Error) -> None:
        if what not in self._warned:  # once per kind: a failing disk fails every commit
            self._warned.add(what)
            logger.warning(
                "response cache %s: %s failed (%s); calls go on without them",
                self._shown,
                what,
                exc,
            )
