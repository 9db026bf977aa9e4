"""The SQLite response cache itself: its file, its bounds, its failures, several users.

Real SQLite files under ``tmp_path``; time comes from the test's ``MockClock`` through the
cache's ``clock`` (``trio.current_time``), so ``ttl`` and least-recently-used order are
exact without real sleeps.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

import trio_llm
from trio_llm._cache_sqlite import FILE_FORMAT, connect

KEY = "k" * 64


def key(n: int) -> str:
    return f"{n:064x}"


async def test_set_then_get(tmp_path: Path) -> None:
    """A value set is read back at once; an unknown key is a miss; sets replace."""
    async with trio_llm.open_sqlite_cache(tmp_path / "c.sqlite") as cache:
        assert await cache.get(KEY) is None
        await cache.set(KEY, b"one")
        assert await cache.get(KEY) == b"one"
        await cache.set(KEY, b"two")
        assert await cache.get(KEY) == b"two"
        assert cache.path == str(tmp_path / "c.sqlite")
        assert "c.sqlite" in repr(cache)


async def test_values_survive_closing(tmp_path: Path) -> None:
    """Leaving the block commits what was set just before; the file reopens with it."""
    path = tmp_path / "c.sqlite"
    async with trio_llm.open_sqlite_cache(path) as cache:
        for n in range(100):
            await cache.set(key(n), b"v%d" % n)
    async with trio_llm.open_sqlite_cache(path) as cache:
        assert [await cache.get(key(n)) for n in range(100)] == [b"v%d" % n for n in range(100)]


async def test_closing_while_cancelled_still_commits(tmp_path: Path) -> None:
    """A block left by cancellation still commits and closes the file."""
    path = tmp_path / "c.sqlite"
    with trio.move_on_after(0.5):
        async with trio_llm.open_sqlite_cache(path) as cache:
            await cache.set(KEY, b"kept")
            await trio.sleep_forever()
    async with trio_llm.open_sqlite_cache(path) as cache:
        assert await cache.get(KEY) == b"kept"


async def test_cancelled_lookup_changes_nothing(tmp_path: Path) -> None:
    """A cancelled get is abandoned; the cache goes on answering."""
    async with trio_llm.open_sqlite_cache(tmp_path / "c.sqlite") as cache:
        await cache.set(KEY, b"v")
        with trio.CancelScope() as scope:
            scope.cancel()
            await cache.get(KEY)
        assert scope.cancelled_caught
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.get, KEY)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # while the worker thread has the lookup
        assert await cache.get(KEY) == b"v"


async def test_closed_cache_misses_and_ignores_sets(tmp_path: Path) -> None:
    """After its block, the cache answers nothing and stores nothing (no error)."""
    async with trio_llm.open_sqlite_cache(tmp_path / "c.sqlite") as cache:
        await cache.set(KEY, b"v")
    await cache.set(key(1), b"w")
    assert await cache.get(KEY) is None


async def test_many_tasks_share_one_thread(tmp_path: Path) -> None:
    """Lookups and stores from many tasks at once run on one worker thread, all answered."""
    threads_before = threading.active_count()
    async with trio_llm.open_sqlite_cache(tmp_path / "c.sqlite") as cache:
        assert threading.active_count() <= threads_before + 1

        async def user(n: int) -> None:
            await cache.set(key(n), b"%d" % n)
            assert await cache.get(key(n)) == b"%d" % n

        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(user, n)


async def test_ttl_expires_entries(tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """An entry older than ttl is a miss (by the cache's clock), and is purged later."""
    path = tmp_path / "c.sqlite"
    async with trio_llm.open_sqlite_cache(path, ttl=60, clock=trio.current_time) as cache:
        await cache.set(KEY, b"v")
        mock_clock.jump(59)
        assert await cache.get(KEY) == b"v"
        mock_clock.jump(2)
        assert await cache.get(KEY) is None
        mock_clock.jump(60)  # purges run at most once a minute (by the cache's clock)
        await cache.set(key(1), b"fresh")  # its commit purges the expired entry
        assert await cache.get(key(1)) == b"fresh"
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT key FROM entries").fetchall() == [(key(1),)]


async def test_max_bytes_evicts_least_recently_used(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Beyond max_bytes the least recently used entries go; a lookup counts as a use."""
    path = tmp_path / "c.sqlite"
    value = b"x" * 936  # with its 64-character key: 1,000 bytes an entry
    async with trio_llm.open_sqlite_cache(path, max_bytes=3000, clock=trio.current_time) as cache:
        for n in range(3):
            await cache.set(key(n), value)
            mock_clock.jump(1)
        assert await cache.get(key(0)) == value  # 0 is now the most recently used
        mock_clock.jump(1)
        await cache.set(key(3), value)  # one too many: 1, the least recently used, goes
        await cache.commit()  # the stores and the lookup's mark written, eviction done
        assert await cache.get(key(1)) is None
        for n in (0, 2, 3):
            assert await cache.get(key(n)) == value
        await cache.set(key(4), b"y" * 5000)  # larger than the bound: kept by nothing
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0] <= 3000
        assert (key(4),) not in db.execute("SELECT key FROM entries").fetchall()


async def test_hits_are_counted_in_the_file(tmp_path: Path) -> None:
    """Each lookup answered is counted in the file (trio-llm cache info shows it)."""
    from trio_llm._cli_cache import read_info

    path = tmp_path / "c.sqlite"
    async with trio_llm.open_sqlite_cache(path) as cache:
        await cache.set(KEY, b"v")
        for _ in range(5):
            await cache.get(KEY)
        await cache.get(key(9))
    info = read_info(path)
    assert (info.hits, info.entries, info.stored_bytes) == (5, 1, 65)


async def test_two_caches_on_one_file_see_each_other(tmp_path: Path) -> None:
    """Two connections (as two processes would) read each other's committed entries."""
    path = tmp_path / "c.sqlite"
    async with (
        trio_llm.open_sqlite_cache(path) as one,
        trio_llm.open_sqlite_cache(path) as two,
    ):
        await one.set(key(1), b"from one")
        await two.set(key(2), b"from two")
        await one.commit()
        await two.commit()
        assert await two.get(key(1)) == b"from one"
        assert await one.get(key(2)) == b"from two"


def test_files_created_at_once_by_several_threads(tmp_path: Path) -> None:
    """Openers creating the same new file at once: one creates it, all use it."""
    errors: list[BaseException] = []

    def open_it(path: Path) -> None:
        try:
            connect(path, create=True).close()
        except BaseException as exc:  # pragma: no cover - the failure reported below
            errors.append(exc)

    for attempt in range(10):
        path = tmp_path / f"new-{attempt}.sqlite"
        threads = [threading.Thread(target=open_it, args=(path,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == FILE_FORMAT
            assert db.execute("SELECT count(*) FROM meta").fetchone()[0] == 3


async def test_garbage_file_is_refused_at_open(fake_llm: object, tmp_path: Path) -> None:
    """A file that is not SQLite: a clear CacheError before anything is sent."""
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database, just some text" * 100)
    with pytest.raises(trio_llm.CacheError, match="corrupt or not a cache") as caught:
        async with trio_llm.open_client(base_url="http://127.0.0.1:9/v1", cache=str(path)):
            pass  # pragma: no cover
    assert caught.value.path == str(path)
    assert path.read_bytes().startswith(b"this is not")  # left as it was


async def test_damaged_file_is_refused_at_open(tmp_path: Path) -> None:
    """A cache whose pages were damaged: SQLite's check refuses it at open."""
    path = tmp_path / "c.sqlite"
    async with trio_llm.open_sqlite_cache(path) as cache:
        for n in range(300):
            await cache.set(key(n), os.urandom(300))
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page + 8 : 4 * page] = b"\xff" * (page - 8)  # a b-tree page in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(trio_llm.CacheError, match="corrupt"):
        async with trio_llm.open_sqlite_cache(path):
            pass  # pragma: no cover


async def test_newer_format_is_refused_at_open(tmp_path: Path) -> None:
    """A file from a newer trio-llm: a CacheError saying so, the file untouched."""
    path = tmp_path / "c.sqlite"
    async with trio_llm.open_sqlite_cache(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {FILE_FORMAT + 1}")
    with pytest.raises(trio_llm.CacheError, match="newer trio-llm"):
        async with trio_llm.open_sqlite_cache(path):
            pass  # pragma: no cover
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == FILE_FORMAT + 1


async def test_other_sqlite_databases_are_refused(tmp_path: Path) -> None:
    """Another program's SQLite file is not taken over."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(trio_llm.CacheError, match="not a trio-llm cache"):
        async with trio_llm.open_sqlite_cache(path):
            pass  # pragma: no cover
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA application_id = 42")
    with pytest.raises(trio_llm.CacheError, match="not a trio-llm cache"):
        async with trio_llm.open_sqlite_cache(path):
            pass  # pragma: no cover


async def test_old_unknown_format_is_refused(tmp_path: Path) -> None:
    """A trio-llm file claiming a format this version never wrote is refused."""
    path = tmp_path / "c.sqlite"
    async with trio_llm.open_sqlite_cache(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 0")
    with pytest.raises(trio_llm.CacheError, match="unknown cache format 0"):
        async with trio_llm.open_sqlite_cache(path):
            pass  # pragma: no cover


async def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    """A path in a directory that does not exist: CacheError naming the file."""
    path = tmp_path / "nowhere" / "c.sqlite"
    with pytest.raises(trio_llm.CacheError, match=r"cannot open the cache file .*nowhere"):
        async with trio_llm.open_sqlite_cache(path):
            pass  # pragma: no cover


async def test_bad_settings() -> None:
    """max_bytes and ttl are checked before the file is touched."""
    for settings in ({"max_bytes": 0}, {"max_bytes": True}, {"ttl": 0}, {"ttl": "1d"}):
        with pytest.raises(trio_llm.ConfigurationError):
            async with trio_llm.open_sqlite_cache("unused.sqlite", **settings):  # type: ignore[arg-type]
                pass  # pragma: no cover
    assert not await trio.Path("unused.sqlite").exists()


async def test_a_full_disk_mid_job_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes that fail (the disk is full) are dropped with one warning; lookups go on."""
    import trio_llm._cache_sqlite as module

    def small_disk(path: str, *, create: bool, check: bool = True) -> sqlite3.Connection:
        connection = connect(path, create=create, check=check)
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {pages + 2}")
        return connection

    monkeypatch.setattr(module, "connect", small_disk)
    with caplog.at_level(logging.WARNING, logger="trio_llm"):
        async with trio_llm.open_sqlite_cache(tmp_path / "c.sqlite") as cache:
            await cache.set(key(0), b"small")
            await cache.commit()
            for n in range(1, 20):
                await cache.set(key(n), os.urandom(4000))
            await cache.commit()  # does not fit: the whole commit is dropped
            assert await cache.get(key(0)) == b"small"
            assert [await cache.get(key(n)) for n in range(1, 20)] == [None] * 19
    warnings = [r.message for r in caplog.records if "writes failed" in r.message]
    assert len(warnings) == 1
    assert "full" in warnings[0]


async def test_a_file_broken_mid_job_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lookups on a file whose table went away are misses, with one warning; no crash."""
    path = tmp_path / "c.sqlite"
    with caplog.at_level(logging.WARNING, logger="trio_llm"):
        async with trio_llm.open_sqlite_cache(path) as cache:
            await cache.set(KEY, b"v")
            await cache.commit()
            assert await cache.get(KEY) == b"v"
            with sqlite3.connect(path) as db:  # another program breaks the file
                db.execute("DROP TABLE entries")
            assert await cache.get(KEY) is None
            assert await cache.get(KEY) is None
            await cache.set(KEY, b"w")
            await cache.commit()  # fails: dropped
            assert await cache.get(KEY) is None
    messages = [r.message for r in caplog.records]
    assert sum("lookups failed" in m for m in messages) == 1
    assert sum("writes failed" in m for m in messages) == 1


_WRITER = textwrap.dedent(
    """
    import sys, trio, trio_llm

    async def main(path):
        async with trio_llm.open_sqlite_cache(path) as cache:
            n = 0
            while True:
                await cache.set(f"{n:064x}", b"x" * 2000)
                if n == 200:
                    await cache.commit()
                    print("committed", flush=True)
                n += 1
                if n % 50 == 0:
                    await trio.sleep(0)

    trio.run(main, sys.argv[1])
    """
)


async def test_a_killed_writer_never_corrupts_the_file(tmp_path: Path) -> None:
    """A process killed mid-write (SIGKILL) leaves a sound file with what it committed."""
    path = tmp_path / "c.sqlite"
    writer = await trio.lowlevel.open_process(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE
    )
    assert writer.stdout is not None
    try:
        said = b""
        while not said.endswith(b"\n"):
            said += await writer.stdout.receive_some(100)
        assert said == b"committed\n"
        await trio.sleep(0.05)  # in the middle of later batches
    finally:
        writer.send_signal(signal.SIGKILL)
        await writer.wait()
        await writer.stdout.aclose()
    async with trio_llm.open_sqlite_cache(path) as cache:  # quick_check passes
        for n in range(201):
            assert await cache.get(key(n)) == b"x" * 2000


async def test_stores_are_committed_soon_without_being_asked(tmp_path: Path) -> None:
    """Stores reach the file for other processes by themselves, within moments."""
    path = tmp_path / "c.sqlite"

    def visible() -> bool:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT count(*) FROM entries").fetchone()[0] == 3

    async with trio_llm.open_sqlite_cache(path) as cache:
        for n in range(3):
            await cache.set(key(n), b"v")
        for _ in range(1000):  # committed within 50 ms; 10 s for a loaded machine
            if await trio.to_thread.run_sync(visible):
                break
            await trio.sleep(0.01)
        else:
            pytest.fail("the stores were not committed")  # pragma: no cover
    await cache.commit()  # closed: nothing to do


async def test_opened_in_a_cancelled_scope(tmp_path: Path) -> None:
    """Opened where everything is cancelled: the file is closed again, nothing leaks."""
    path = tmp_path / "c.sqlite"
    with trio.CancelScope() as scope:
        scope.cancel()
        async with trio_llm.open_sqlite_cache(path) as cache:
            await cache.set(KEY, b"v")  # Cancelled here: the store is dropped
    assert scope.cancelled_caught
    assert not await trio.Path(f"{path}-wal").exists()  # the last connection closed
    async with trio_llm.open_sqlite_cache(path) as cache:
        assert await cache.get(KEY) is None
