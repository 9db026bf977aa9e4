"""The ``trio-llm cache`` command (``info``, ``clear``) and the ``--cache`` flag.

``info`` and ``clear`` work on a cache file directly with blocking SQLite calls: each is
one short transaction, safe while clients in other processes use the file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sqlite3
import time
from typing import Any, Final, final

import attrs

from ._cache_sqlite import connect
from ._cli_options import EXIT_OK, EXIT_USAGE, CommandError
from ._errors import CacheError

__all__ = [
    "CacheInfo",
    "add_cache_option",
    "add_cache_parser",
    "clear_entries",
    "duration",
    "read_info",
    "run_cache_command",
]

_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*", re.IGNORECASE)


def duration(text: str) -> float:
    """Parse a duration: seconds, or a number and a unit (``90s``, ``30m``, ``12h``, ``7d``,
    ``2w``) (an argparse ``type=``)."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90s, 30m, 12h, 7d or 2w, got {text!r}"
        )
    return float(match[1]) * _UNITS[match[2].lower()]


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--cache PATH`` (read by ``open_cli_client``)."""
    parser.add_argument(
        "--cache",
        metavar="PATH",
        help="answer a request made before from this response cache (an SQLite file, "
        "created if missing; shared safely by several runs at once) and store new replies "
        "in it; see 'trio-llm cache --help'",
    )


def add_cache_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``cache`` command (``info``, ``clear``) to the ``trio-llm`` parser."""
    cache = subparsers.add_parser(
        "cache",
        help="describe or clear a response cache file (--cache)",
        description="Describe or clear a response cache: the SQLite file that --cache "
        "and open_client(cache=...) fill. Example: trio-llm cache clear replies.sqlite "
        "--older-than 7d",
    )
    actions = cache.add_subparsers(dest="action", metavar="ACTION", parser_class=type(cache))
    actions.required = True
    info = actions.add_parser(
        "info", help="show the entries, their size and the hits since the file was created"
    )
    info.add_argument("path", metavar="PATH", help="the cache file")
    clear = actions.add_parser(
        "clear", help="remove every stored reply, or only those older than --older-than"
    )
    clear.add_argument("path", metavar="PATH", help="the cache file")
    clear.add_argument(
        "--older-than",
        metavar="AGE",
        type=duration,
        help="remove only replies stored more than AGE ago (90s, 30m, 12h, 7d, 2w)",
    )


@final
@attrs.frozen(kw_only=True)
class CacheInfo:
    """What ``trio-llm cache info`` shows about a cache file.

    Attributes:
        path: the file.
        entries: replies stored.
        stored_bytes: bytes of the stored replies (what ``max_bytes`` bounds).
        file_bytes: bytes of the file on disk, its write-ahead log included.
        hits: lookups answered from the file since it was created.
        created_at: when the file was created (seconds since the epoch).
        oldest: when the oldest reply was stored (``None`` if empty).
        newest: when the newest reply was stored (``None`` if empty).
    """

    path: str
    entries: int
    stored_bytes: int
    file_bytes: int
    hits: int
    created_at: float
    oldest: float | None
    newest: float | None


def _existing(path: str | os.PathLike[str]) -> str:
    shown = os.fspath(path)
    if not os.path.isfile(shown):
        raise FileNotFoundError(2, "no cache file", shown)
    return shown


def read_info(path: str | os.PathLike[str]) -> CacheInfo:
    """Describe the cache file ``path`` (blocking; checks the whole file).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CacheError: the file is not a usable cache (see :func:`connect`).
    """
    shown = _existing(path)
    connection = connect(shown, create=False)
    try:
        meta = dict(connection.execute("SELECT name, value FROM meta").fetchall())
        entries, oldest, newest = connection.execute(
            "SELECT count(*), min(created_at), max(created_at) FROM entries"
        ).fetchone()
    finally:
        connection.close()
    return CacheInfo(
        path=shown,
        entries=entries,
        stored_bytes=int(meta.get("bytes", 0)),
        file_bytes=sum(
            os.path.getsize(shown + suffix)
            for suffix in ("", "-wal")
            if os.path.exists(shown + suffix)
        ),
        hits=int(meta.get("hits", 0)),
        created_at=float(meta.get("created_at", 0.0)),
        oldest=oldest,
        newest=newest,
    )


def clear_entries(
    path: str | os.PathLike[str], *, older_than: float | None = None, now: float | None = None
) -> tuple[int, int]:
    """Remove the replies of the cache file ``path`` (blocking); return (entries, bytes).

    ``older_than``: only those stored more than this many seconds before ``now`` (default:
    the time now). Removing every reply also shrinks the file, unless another process has
    it open (its free pages are then reused). Safe while other processes use the file.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CacheError: the file is not a usable cache, or cannot be written.
    """
    shown = _existing(path)
    connection = connect(shown, create=False, check=False)
    limit: tuple[float, ...]
    where, limit = "1", ()
    if older_than is not None:
        where, limit = "created_at <= ?", ((time.time() if now is None else now) - older_than,)
    try:
        execute = connection.execute
        execute("BEGIN IMMEDIATE")
        removed, size = execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM entries WHERE {where}", limit
        ).fetchone()
        execute(f"DELETE FROM entries WHERE {where}", limit)
        execute("COMMIT")
        if older_than is None:
            try:
                execute("VACUUM")
            except sqlite3.OperationalError:
                pass  # another process has the file open: its free pages are reused
    except sqlite3.Error as exc:
        raise CacheError(f"cannot clear {shown}: {exc}", path=shown) from exc
    finally:
        connection.close()
    return removed, size


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _age(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def run_cache_command(args: argparse.Namespace) -> int:
    """Run ``trio-llm cache ACTION`` as parsed into ``args``; return the exit status.

    Raises:
        CommandError: there is no file at the path (exit status 2).
        CacheError: the file is not a usable cache.
    """
    try:
        if args.action == "info":
            info = read_info(args.path)
            print(f"cache:    {info.path} (created {_when(info.created_at)})")
            print(f"entries:  {info.entries:,}")
            print(f"size:     {_size(info.stored_bytes)} of replies; file {_size(info.file_bytes)}")
            print(f"hits:     {info.hits:,} since the file was created")
            print(f"stored:   oldest {_when(info.oldest)}, newest {_when(info.newest)}")
            return EXIT_OK
        removed, size = clear_entries(args.path, older_than=args.older_than)
    except FileNotFoundError as exc:
        raise CommandError(f"no cache file at {exc.filename}", status=EXIT_USAGE) from None
    which = "" if args.older_than is None else f" stored more than {_age(args.older_than)} ago"
    replies = "reply" if removed == 1 else "replies"
    print(f"trio-llm cache: removed {removed:,} {replies}{which} ({_size(size)}) from {args.path}")
    return EXIT_OK
