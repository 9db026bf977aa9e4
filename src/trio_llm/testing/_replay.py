"""Record once, replay after: a test suite against a real model, offline after its first run.

:func:`open_replay_client` opens a client over a response cache file kept with the tests.
Recording, it is an ordinary client whose replies are stored in the file; replaying, every
call must be answered from the file, and a call that is not raises
:class:`~trio_llm.testing.CacheMissError` at once, with nothing sent.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn, final

import httpx2
import trio

from .._cache_sqlite import SQLiteCache, open_sqlite_cache
from .._client import Client, open_client
from .._errors import CacheMissError, ConfigurationError

__all__ = ["RECORD_VARIABLE", "open_replay_client"]

#: The environment variable that turns recording on (``1``, ``true`` or ``yes``).
RECORD_VARIABLE: Final = "TRIO_LLM_RECORD"

_HOW_TO_RECORD: Final = f"run the test once with {RECORD_VARIABLE}=1 (and the API key) to record it"


@final
class _ReplayOnly:
    """A cache that answers only from what was recorded: a miss is an error."""

    def __init__(self, cache: SQLiteCache) -> None:
        self._cache = cache

    async def get(self, key: str) -> bytes | None:
        value = await self._cache.get(key)
        if value is None:
            raise CacheMissError(
                f"no recorded reply for this request in {self._cache.path} (cache key "
                f"{key[:12]}...): {_HOW_TO_RECORD}; nothing was sent",
                key=key,
                path=self._cache.path,
            )
        return value

    async def set(self, key: str, value: bytes) -> None:
        """Never called: replaying, nothing is sent, so nothing new is stored."""


def _refuse(request: httpx2.Request) -> NoReturn:
    raise CacheMissError(
        f"replaying: {request.method} {request.url.path} would go to the server "
        f"(a call made with cache=False?); {_HOW_TO_RECORD}",
        key="",
    )


def _recording() -> bool:
    return os.environ.get(RECORD_VARIABLE, "").strip().lower() in ("1", "true", "yes")


@asynccontextmanager
async def open_replay_client(
    path: str | os.PathLike[str], *, record: bool | None = None, **options: Any
) -> AsyncIterator[Client]:
    """Open a client that replays the replies recorded in ``path`` (an SQLite cache file).

    Record once, against the real model, then commit the file: later runs are fast,
    free, deterministic and offline. A reply is found again only for the same request
    (provider, model and body: see ``docs/howto-cache.md``), so a test that changes its
    prompt needs recording again.

    Args:
        path: the cache file; recording creates it.
        record: ``True``: calls the file cannot answer go to the server, and their replies
            are recorded. ``False``: every call must be answered from the file; one that
            is not raises :class:`CacheMissError` and nothing is sent (no network, no API
            key needed). ``None`` (default): ``True`` when ``$TRIO_LLM_RECORD`` is
            ``1``, ``true`` or ``yes``.
        **options: as for :func:`trio_llm.open_client` (``base_url``, ``model``,
            ``provider``, ...), except ``cache`` and, when replaying, ``transport``.

    Raises:
        CacheError: the file cannot be used (corrupt, of a newer version); replaying,
            also when it does not exist.
        ConfigurationError: ``cache`` or (replaying) ``transport`` was given.

    Leaving the block closes the client and the file (recording, the replies are
    committed).
    """
    if record is None:
        record = _recording()
    for name in ("cache",) if record else ("cache", "transport"):
        if name in options:
            raise ConfigurationError(f"open_replay_client sets {name}= itself")
    if not record:
        shown = os.fspath(path)
        if not await trio.Path(shown).is_file():
            raise CacheMissError(f"no recordings at {shown}: {_HOW_TO_RECORD}", key="", path=shown)
        # Nothing is sent: any placeholder satisfies the key check of a remote base URL.
        options.setdefault("api_key", "replaying")
        options["transport"] = httpx2.MockTransport(_refuse)
    async with (
        open_sqlite_cache(path, max_bytes=None) as cache,
        open_client(cache=cache if record else _ReplayOnly(cache), **options) as client,
    ):
        yield client
