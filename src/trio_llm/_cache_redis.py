"""A response cache in Redis (or Valkey): ``open_client(cache="redis://...")``, ``--cache``.

The cache of :mod:`trio_llm._cache` for clients on several machines: every client that
opens the same Redis shares its replies. Each reply is one Redis string, under
``trio-llm:cache:`` and the request's key; a ``ttl`` is each entry's Redis expiry (set
with the value, so Redis forgets it on its own). The cache's size is Redis's to bound:
give the server a ``maxmemory`` and an eviction policy that may drop these keys
(``allkeys-lru``; with ``volatile-lru``, only entries stored with a ``ttl``); with
Redis's default, ``noeviction``, a full Redis refuses new entries, which the client
then logs once and goes on without storing.

Connections go through :mod:`trio_llm._redis` (the ``redis`` extra), as the shared rate
limits' do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, final

from ._errors import CacheError, ConfigurationError, redact_url
from ._redis import RedisConnection, RedisUnavailable, open_redis

__all__ = ["KEY_PREFIX", "RedisCache", "is_redis_url", "open_redis_cache"]

logger = logging.getLogger("trio_llm.cache")

#: The prefix of the cache's Redis keys (the rate limits' is ``trio-llm:limit:``).
KEY_PREFIX: Final = "trio-llm:cache:"

_SCHEMES: Final = ("redis://", "rediss://", "unix://")


def is_redis_url(value: object) -> bool:
    """Whether ``value`` is a ``redis://``, ``rediss://`` or ``unix://`` URL (not a path)."""
    return isinstance(value, str) and value.startswith(_SCHEMES)


@final
class RedisCache:
    """A response cache in Redis, as :func:`open_redis_cache` yields it.

    ``get`` and ``set`` of :class:`~trio_llm.ResponseCache`: a Redis that stops answering
    makes each lookup a miss and each store a no-op, logged once, so calls go on (to the
    server) while it is away.

    Attributes:
        url: the server's URL, credentials hidden.
        ttl: seconds an entry lives (its Redis expiry); ``None``: until Redis evicts it.
    """

    __slots__ = ("_redis", "_warned", "ttl", "url")

    def __init__(self, redis: RedisConnection, *, ttl: float | None) -> None:
        self._redis = redis
        self._warned = False
        self.url = redis.url
        self.ttl = ttl

    async def get(self, key: str) -> bytes | None:
        """Return the value stored under ``key``; ``None`` if absent, expired or unreachable.

        Cancellation: the lookup is abandoned; nothing is changed.
        """
        try:
            value = await self._redis.command("get", KEY_PREFIX + key)
        except RedisUnavailable as exc:
            self._warn("a lookup", exc)
            return None
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, expiring after ``ttl``.

        A Redis that refuses (full with ``noeviction``) or does not answer: not stored,
        logged once.

        Cancellation: the value may or may not be stored.
        """
        expiry = None if self.ttl is None else max(1, math.ceil(self.ttl * 1000))
        try:
            await self._redis.command("set", KEY_PREFIX + key, value, px=expiry)
        except RedisUnavailable as exc:
            self._warn("a store", exc)

    def _warn(self, what: str, exc: RedisUnavailable) -> None:
        if not self._warned:  # once: a Redis that is away fails every command
            self._warned = True
            logger.warning(
                "response cache at %s: %s failed (%s); calls go to the server meanwhile",
                self.url,
                what,
                exc,
            )


@asynccontextmanager
async def open_redis_cache(url: str, *, ttl: float | None = None) -> AsyncIterator[RedisCache]:
    """Open a response cache in the Redis (or Valkey) at ``url``.

    Pass it to :func:`open_client` (``cache=``); ``open_client(cache="redis://...")``
    opens one with no ``ttl``. Needs the ``redis`` extra.

    Args:
        url: ``redis://host:6379/0``, ``rediss://...`` (TLS) or
            ``unix:///path/redis.sock``.
        ttl: seconds after which an entry expires (Redis removes it); ``None``: it stays
            until Redis's ``maxmemory`` policy evicts it.

    Raises:
        CacheError: Redis does not answer (or refuses) when the cache opens.
        ConfigurationError: ``ttl`` is not a number > 0, the ``redis`` extra is
            missing, or ``url`` is not a URL coredis accepts.

    Leaving the block closes the connections. Cancellation: the same.
    """
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0
    ):
        raise ConfigurationError(f"ttl must be a number of seconds > 0 or None, not {ttl!r}")
    failure: RedisUnavailable | None = None
    try:
        async with open_redis(url) as redis:
            yield RedisCache(redis, ttl=ttl)
    except RedisUnavailable as exc:
        failure = exc
    if failure is not None:
        shown = redact_url(url)
        raise CacheError(
            f"cannot use the response cache's Redis at {shown}: {failure}", path=shown
        ) from failure
