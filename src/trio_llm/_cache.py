"""The response cache: its protocol, its keys and entries, and the lifecycle's side of it.

A cache answers a call with a reply stored earlier instead of asking the server:

- :class:`ResponseCache` is what a cache is: ``get`` and ``set`` of opaque bytes under a
  string key. :class:`~trio_llm.SQLiteCache` (``open_client(cache="replies.sqlite")``) is
  the built-in one; any object with these two coroutines plugs in the same way.
- :func:`cache_key`: what identifies a reply: the provider, the kind of call and the
  request body in a canonical form (sorted keys), without ``stream`` and
  ``stream_options``. Never the API key, the base URL or a header.
- :class:`CachedReply`: what is stored: the whole payload, its request id, usage and time,
  as versioned JSON.
- :class:`CacheHook`: the lifecycle's side (:mod:`trio_llm._attempt`): the key given to
  a request as it is built (``Requester.request``), the lookup that ``Requester.call``
  makes before the retry loop (a hit is no attempt: no endpoint chosen, no reservation,
  no slot, not ``sent``), single-flight for identical calls made at once, and the store
  where ``Exchange.finish`` runs, written behind by one task of the client (or handed at
  once to a cache whose stores never block: ``set_nowait``).

With several endpoints (:mod:`trio_llm._routing`), a call's key is that of the body built
for the endpoint the call most likely goes to (``Router.firsts``: the first of the lowest
priority that can make it), with that endpoint's provider; the endpoint's name and URL
are never part of it. A reply is stored only if the endpoint that answered takes that
same body (same provider and model): a fallback of another model or provider answers
the call, but its reply is not what the key asks for, and a later hit must never give
one model's reply to a request for another.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, final

import attrs
import trio

from . import _json
from ._cache_redis import is_redis_url, open_redis_cache
from ._errors import ConfigurationError
from ._fanout import open_owning_nursery
from ._routing import CHAT, EMBEDDINGS, STREAM
from ._types import ChatResponse, EmbeddingResponse, JSONObject, Usage

if TYPE_CHECKING:
    from ._attempt import Requester
    from ._request import Request
    from .providers._base import Provider

__all__ = [
    "CacheHook",
    "CacheSetting",
    "CachedReply",
    "ResponseCache",
    "cache_key",
    "open_cache_hook",
]

T = TypeVar("T")

logger = logging.getLogger("trio_llm")

#: The version of the key's material and of the stored entries. A change of either makes
#: every old entry a miss (never a wrong hit).
FORMAT: Final = 1

# The kind of call in a key, per kind of request: a stream shares the key of a chat call.
_KIND_NAMES: Final = {CHAT: "chat", STREAM: "chat", EMBEDDINGS: "embeddings"}

# Body fields that choose how a reply is delivered, not what it says.
_DELIVERY_FIELDS: Final = frozenset({"stream", "stream_options"})

# Replies waiting to be written behind; past this the newest are not stored (a cache
# slower than the server must not hold replies in memory without bound).
_WRITE_BEHIND: Final = 1024

# How long closing the client waits for the replies still to be written.
_CLOSE_GRACE: Final = 5.0


class ResponseCache(Protocol):
    """What a response cache is: two coroutines over opaque bytes.

    Keys are 64 hexadecimal characters (:func:`cache_key`); values are bytes trio-llm
    made and reads back (versioned JSON). A cache may forget any entry at any time (size
    bounds, ``ttl``).

    ``get`` returns ``None`` for a miss. An exception it raises fails the call, so a
    cache that would rather let calls go to the server when it fails returns ``None``
    (the SQLite cache does, and logs a warning). ``set`` may return before the value is
    durable; an exception it raises is logged, and the call is not affected. The client
    calls ``set`` from a task of its own, never in a call's path; a cache whose stores
    never block may also have a plain method ``set_nowait(key, value)``, which the client
    then calls instead, at once (the SQLite cache does).
    """

    async def get(self, key: str) -> bytes | None:
        """Return the value stored under ``key``, or ``None``."""
        ...

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing any value stored there."""
        ...


#: What ``open_client(cache=...)`` accepts: a path to an SQLite file, a Redis URL, or a
#: cache object.
CacheSetting = str | os.PathLike[str] | ResponseCache


def cache_key(provider: str, kind: str, body: Mapping[str, Any]) -> str | None:
    """Return the cache key of a request: a SHA-256 over what determines its reply.

    The material is the provider's name, ``kind`` (``"chat"`` or ``"embeddings"``) and
    ``body`` without ``stream`` and ``stream_options``, as JSON with sorted keys; so
    ``temperature``, ``seed``, ``max_tokens``, the model and every message are part of the
    key, and a streamed and a plain call of the same request share it. ``None`` if the
    body holds values JSON cannot (such a call is not cached).
    """
    material = {
        "body": {name: value for name, value in body.items() if name not in _DELIVERY_FIELDS},
        "format": FORMAT,
        "kind": kind,
        "provider": provider,
    }
    try:
        return hashlib.sha256(_json.canonical(material)).hexdigest()
    except (TypeError, ValueError):
        return None


@final
@attrs.frozen(kw_only=True)
class CachedReply:
    """One stored reply.

    Attributes:
        payload: the reply as the server sent it (``native``), or, for a streamed reply,
            its aggregation: a ``chat.completion`` object, whatever the provider.
        native: whether ``payload`` is in the provider's own format.
        request_id: the server's id of the request that got the reply.
        usage: the reply's token counts.
        stored_at: when it was stored (seconds since the epoch).
        endpoint: the name of the endpoint that answered (a replay's ``reply.endpoint``).
    """

    payload: JSONObject
    native: bool
    request_id: str | None
    usage: Usage
    stored_at: float
    endpoint: str | None = None

    def to_bytes(self) -> bytes:
        """Encode as the value a cache stores (JSON)."""
        usage = self.usage
        return _json.dumps(
            {
                "format": FORMAT,
                "native": self.native,
                "request_id": self.request_id,
                "stored_at": self.stored_at,
                "endpoint": self.endpoint,
                "usage": {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.total_tokens,
                },
                "payload": self.payload,
            },
            exact_non_finite=False,
        )

    @classmethod
    def from_bytes(cls, value: bytes) -> CachedReply | None:
        """Decode a stored value; ``None`` if it is not an entry this version reads."""
        try:
            entry = _json.loads(value)
        except ValueError:
            return None
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            return None
        payload = entry.get("payload")
        request_id = entry.get("request_id")
        stored_at = entry.get("stored_at")
        endpoint = entry.get("endpoint")
        if not isinstance(payload, dict) or not isinstance(stored_at, (int, float)):
            return None
        return cls(
            payload=payload,
            native=entry.get("native") is True,
            request_id=request_id if isinstance(request_id, str) else None,
            usage=Usage.from_json(entry.get("usage")),
            stored_at=float(stored_at),
            endpoint=endpoint if isinstance(endpoint, str) else None,
        )

    def chat_response(self, provider: Provider) -> ChatResponse:
        """Return the stored chat reply, marked ``cached``, with the endpoint that answered.

        Its ``cost`` is ``0.0``: a reply from the cache spends nothing.
        """
        if self.native:
            reply = provider.parse_chat(self.payload, self.request_id)
        else:
            reply = ChatResponse.from_json(self.payload, request_id=self.request_id)
        return attrs.evolve(reply, cached=True, endpoint=self.endpoint, cost=0.0)

    def embedding_response(self, provider: Provider) -> EmbeddingResponse:
        """Return the stored embeddings, marked ``cached``, as :meth:`chat_response`."""
        reply = provider.parse_embeddings(self.payload, self.request_id)
        return attrs.evolve(reply, cached=True, endpoint=self.endpoint, cost=0.0)


@final
class _Flight:
    """A call the cache missed, being sent; identical calls wait for its reply."""

    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: bytes | None = None  # the reply, once stored


@final
class CacheHook:
    """A client's side of its cache: lookups, single-flight, and writes behind.

    One per client (:func:`open_cache_hook`), shared by all its tasks.
    """

    __slots__ = (
        "_cache",
        "_flights",
        "_pending",
        "_send",
        "_set_nowait",
        "_warned",
    )

    def __init__(
        self,
        cache: ResponseCache,
        send: trio.MemorySendChannel[tuple[str, bytes]],
    ) -> None:
        self._cache = cache
        self._send = send
        # Replies stored but not yet handed to the cache: read before it.
        self._pending: dict[str, bytes] = {}
        self._flights: dict[str, _Flight] = {}
        self._warned = False
        # A cache whose stores never block takes them at once, with no task in between.
        set_nowait = getattr(cache, "set_nowait", None)
        self._set_nowait: Callable[[str, bytes], None] | None = (
            set_nowait if callable(set_nowait) else None
        )

    @staticmethod
    def address(request: Request, body: Mapping[str, Any]) -> None:
        """Give ``request``, just built with ``body``, its cache key (:func:`cache_key`).

        ``body`` is built for ``request.route``, the endpoint the call most likely goes
        to (see the module's docstring); ``request.cache_for`` remembers which body that
        is, so that only a reply to that same body is stored.
        """
        route = request.route
        request.cache_key = cache_key(route.provider.name, _KIND_NAMES[request.kind], body)
        request.cache_for = route.body_key

    async def call(
        self,
        requester: Requester,
        request: Request,
        send: Callable[[], Awaitable[T]],
        replay: Callable[[CachedReply, Provider], T],
    ) -> T:
        """Answer ``request`` from the cache, or ``send`` it.

        A hit is counted (``cache_hits``) and returned by ``replay``; nothing else of the
        lifecycle runs. Identical calls (same key) made while one is being sent wait for
        its reply and replay it (single-flight) instead of sending it again; streamed
        calls wait for such a call but are not waited for themselves. If the call they
        wait for fails (or its reply is not stored), they go on as if it had not been made.
        ``replay`` gets the entry and the provider of the key's endpoint.

        Cancellation: as for ``send``; a cancelled wait leaves nothing behind.
        """
        key = request.cache_key
        assert key is not None
        flights = self._flights
        while (waited := flights.get(key)) is not None:
            await waited.done.wait()
            if waited.value is not None:
                reply = self._replay(requester, request, waited.value, replay)
                if reply is not None:
                    return reply
        flight = None if request.stream else _Flight()
        if flight is not None:
            flights[key] = flight
        try:
            value = self._pending.get(key)
            if value is None:
                value = await self._cache.get(key)
            else:
                await trio.lowlevel.checkpoint()
            if value is not None:
                reply = self._replay(requester, request, value, replay)
                if reply is not None:
                    if flight is not None:
                        flight.value = value
                    return reply
            return await send()
        finally:
            if flight is not None:
                del flights[key]
                flight.done.set()

    @staticmethod
    def _replay(
        requester: Requester,
        request: Request,
        value: bytes,
        replay: Callable[[CachedReply, Provider], T],
    ) -> T | None:
        """Return the reply ``value`` holds, counted as a hit; ``None`` if unreadable."""
        entry = CachedReply.from_bytes(value)
        if entry is None:
            return None
        try:
            # Not routed yet: the request is still addressed to the key's endpoint.
            reply = replay(entry, request.route.provider)
        except (TypeError, ValueError, KeyError, AttributeError):
            return None  # a payload edited by hand, or of another kind: a miss
        requester.count_cache_hit()
        return reply

    def store(
        self, request: Request, request_id: str | None, payload: JSONObject, usage: Usage
    ) -> None:
        """Store the reply to ``request`` the server sent, if the request uses the cache.

        ``payload`` is the reply, or for a stream its aggregation. A reply from an
        endpoint that was sent another body than the key's (a fallback of another
        provider or model) is not stored. Never blocks: the reply is written behind;
        this client reads it at once, others once the cache has it.
        """
        key = request.cache_key
        if key is None or request.body_key != request.cache_for:
            return
        value = CachedReply(
            payload=payload,
            native=not request.stream,
            request_id=request_id,
            usage=usage,
            stored_at=time.time(),
            endpoint=request.route.name,
        ).to_bytes()
        flight = self._flights.get(key)
        if flight is not None:
            flight.value = value
        if self._set_nowait is not None:
            try:
                self._set_nowait(key, value)
            except Exception as exc:
                self._warn(exc)
            return
        try:
            self._send.send_nowait((key, value))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return  # the cache is behind, or closing: this reply is not stored
        self._pending[key] = value

    async def write_behind(self, receive: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
        """Hand each stored reply to the cache, in order, until the channel is closed."""
        async with receive:
            async for key, value in receive:
                try:
                    await self._cache.set(key, value)
                except Exception as exc:
                    self._warn(exc)
                finally:
                    if self._pending.get(key) is value:
                        del self._pending[key]

    def _warn(self, exc: Exception) -> None:
        if not self._warned:  # once: a cache that fails to store fails every time
            self._warned = True
            logger.warning("response cache: a reply was not stored: %r", exc)


def _is_cache(value: object) -> bool:
    return callable(getattr(value, "get", None)) and callable(getattr(value, "set", None))


@asynccontextmanager
async def open_cache_hook(cache: CacheSetting | None) -> AsyncIterator[CacheHook | None]:
    """Open a client's side of ``cache`` (``None``: no cache).

    A ``redis://`` (``rediss://``, ``unix://``) URL opens a Redis cache; a path, an SQLite one.

    The replies stored are written behind by a task of the block; leaving it writes those
    still pending (for up to a few seconds, cancelled or not) and closes a cache it opened.

    Raises:
        ConfigurationError: ``cache`` is neither a path nor a cache object.
        CacheError: the SQLite file cannot be used (see :func:`open_sqlite_cache`), or
            the Redis does not answer (see :func:`open_redis_cache`).
    """
    if cache is None:
        yield None
        return
    async with AsyncExitStack() as stack:
        if is_redis_url(cache):
            assert isinstance(cache, str)
            cache = await stack.enter_async_context(open_redis_cache(cache))
        elif isinstance(cache, (str, os.PathLike)):
            from ._cache_sqlite import open_sqlite_cache

            cache = await stack.enter_async_context(open_sqlite_cache(cache))
        elif not _is_cache(cache):
            raise ConfigurationError(
                "cache must be a path (an SQLite file), a redis:// URL or an object with async "
                f"get(key) and set(key, value), not {type(cache).__name__}"
            )
        send, receive = trio.open_memory_channel[tuple[str, bytes]](_WRITE_BEHIND)
        hook = CacheHook(cache, send)
        async with open_owning_nursery() as nursery:
            # Shielded so that a cancelled client still writes what it has (bounded below).
            writer = trio.CancelScope(shield=True)

            async def write() -> None:
                with writer:
                    await hook.write_behind(receive)

            nursery.start_soon(write)
            try:
                yield hook
            finally:
                send.close()
                writer.deadline = trio.current_time() + _CLOSE_GRACE
