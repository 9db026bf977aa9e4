"""The client: its endpoints' connection pools and one concurrency limit, shared by every task."""

from __future__ import annotations

import enum
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, TypeVar, final

import attrs
import httpx2
import trio

from ._attempt import Exchange, Requester
from ._cache import CachedReply, CacheSetting, open_cache_hook
from ._config import RetryPolicy, Timeouts
from ._cost import Prices
from ._endpoints import Endpoint, open_router, resolve_base_url
from ._errors import ConfigurationError, redact_url
from ._fanout import as_completed, capture_errors, map_concurrently
from ._ratelimit import RateLimit, RateLimiter
from ._request import Request
from ._routing import (
    CHAT,
    EMBEDDINGS,
    STREAM,
    EndpointStatistics,
    set_chat_endpoint,
    set_embeddings_endpoint,
)
from ._streaming import ChatStream, MultiChatStream, open_chat_stream, open_stream_many
from ._types import ChatResponse, EmbeddingResponse, Result
from .providers._base import Messages
from .providers._registry import provider_named

__all__ = ["Client", "ClientStatistics", "open_client"]

T = TypeVar("T")


class _ClientDefault(enum.Enum):
    """The type of :data:`CLIENT_DEFAULT`."""

    CLIENT_DEFAULT = "CLIENT_DEFAULT"


#: A per-call setting left at this value takes the client's setting.
CLIENT_DEFAULT: Final = _ClientDefault.CLIENT_DEFAULT

#: The largest reply body a client accepts by default (``open_client(max_response_bytes=)``).
DEFAULT_MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024

# No limit of its own: adopts the server's limits from its rate-limit headers.
_ADAPTIVE: Final = RateLimit()

#: What ``chat_many`` accepts per item: a prompt, a message list, or a request mapping
#: (``{"messages": [...], **body_fields}``, or ``{"prompt": "...", ...}``).
ChatItem = str | Sequence[Mapping[str, Any]] | Mapping[str, Any]


@final
@attrs.frozen(kw_only=True)
class ClientStatistics:
    """A snapshot of a client's activity since it was opened.

    Attributes:
        in_flight: requests holding a concurrency slot now.
        waiting: requests waiting for a concurrency slot or for rate-limit capacity now.
        max_concurrency: the concurrency limit.
        sent: HTTP attempts started.
        succeeded: calls the server answered (replies from the cache are ``cache_hits``).
        failed: calls that raised an error (cancelled calls count in neither).
        retried: retry attempts made (attempts after the first of a call).
        rate_limited: 429 responses received.
        prompt_tokens: prompt tokens reported by the server's ``usage``.
        completion_tokens: completion tokens reported by the server's ``usage``.
        cost: what the calls that returned a result cost, in USD (streams included), by
            the models' list prices or the client's ``prices``; ``None`` when some had no
            known price (see ``unpriced``): a total is never guessed. Replies from the
            response cache cost nothing (``reply.cost == 0.0``).
        unpriced: calls that returned a result whose cost is unknown (their model has no
            price, or the reply reported no usage).
        cache_hits: calls answered from the client's response cache: no request sent,
            no capacity taken, no tokens counted.
        endpoints: one :class:`EndpointStatistics` per endpoint, in the order given
            (one for a client opened with ``base_url=``).
    """

    in_flight: int
    waiting: int
    max_concurrency: int
    sent: int
    succeeded: int
    failed: int
    retried: int
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int
    cache_hits: int = 0
    endpoints: tuple[EndpointStatistics, ...] = ()
    cost: float | None = 0.0
    unpriced: int = 0


@final
class Client:
    """A connection pool and the limits shared by every task that uses it.

    Create one with :func:`open_client`; it is safe to share between any number of tasks.
    """

    def __init__(
        self, *, requester: Requester, model: str | None, retry: RetryPolicy | None
    ) -> None:
        self._requester = requester
        self._router = router = requester.router
        primary = router.primary
        # The first endpoint's transport, when its requests skip httpx2's client layer.
        self._direct = primary.direct
        self._retry = retry
        self._base_url = primary.endpoint.base_url
        self._model = model
        self._provider = primary.provider

    def __repr__(self) -> str:
        routes = self._router.routes
        where = (
            f"base_url={redact_url(self._base_url)!r}"
            if len(routes) == 1
            else f"endpoints={[route.name for route in routes]!r}"
        )
        return (
            f"<trio_llm.Client provider={self._provider.name!r} {where} "
            f"model={self._model!r} max_concurrency={self.max_concurrency}>"
        )

    @property
    def base_url(self) -> str:
        """The API's base URL, e.g. ``https://api.openai.com/v1``.

        With several endpoints: the first one's of the lowest priority.
        """
        return self._base_url

    @property
    def model(self) -> str | None:
        """The model used by calls that name none."""
        return self._model

    @property
    def max_concurrency(self) -> int:
        """How many requests may be in flight at once, across all tasks."""
        return int(self._requester.limiter.total_tokens)

    @property
    def _rate(self) -> RateLimiter | None:
        return self._router.primary.rate

    def statistics(self) -> ClientStatistics:
        """Return a snapshot of the client's counters, and of each endpoint's."""
        requester = self._requester
        limiter = requester.limiter.statistics()
        routes = self._router.routes
        rate_waiting = sum(r.rate.statistics().waiting for r in routes if r.rate is not None)
        return ClientStatistics(
            in_flight=limiter.borrowed_tokens,
            waiting=limiter.tasks_waiting + rate_waiting,
            max_concurrency=int(limiter.total_tokens),
            sent=requester.sent,
            succeeded=requester.succeeded,
            failed=requester.failed,
            retried=requester.retried,
            rate_limited=requester.rate_limited,
            prompt_tokens=requester.prompt_tokens,
            completion_tokens=requester.completion_tokens,
            cache_hits=requester.cache_hits,
            endpoints=self._router.statistics(),
            cost=None if requester.unpriced else requester.cost,
            unpriced=requester.unpriced,
        )

    def _policy(self, retry: RetryPolicy | _ClientDefault | None) -> RetryPolicy | None:
        return self._retry if retry is CLIENT_DEFAULT else retry

    def _api_call(
        self,
        method: str,
        url: str,
        read: Callable[[Exchange], Awaitable[T]],
        *,
        content: bytes = b"",
        content_type: str | None = None,
        download: bool = False,
        no_deadline: bool = False,
        once: bool = False,
    ) -> Awaitable[T]:
        """Call another API of the provider (files, batches) through the same lifecycle.

        The client's connections, headers, concurrency slot, retry policy and error
        mapping apply, as to a chat call; no token estimate is reserved. ``read`` gets the
        open exchange of a success status (see :meth:`Requester.attempt`). With
        ``no_deadline`` (a transfer of many megabytes) the policy's deadline is left out;
        the per-phase timeouts still apply; ``once`` makes one attempt (a request that must
        not be repeated blindly). Used by ``run_batch(..., via="provider")``.

        Raises:
            ConfigurationError: the client has several endpoints (:meth:`Request.for_api`).
        """
        request = Request.for_api(
            self._router, method, url, content, content_type=content_type, download=download
        )
        policy = None if once else self._retry
        if no_deadline and policy is not None:
            policy = attrs.evolve(policy, deadline=None)
        return self._requester.call(request, read, policy)

    def _resolve_model(self, model: str | None) -> str | None:
        """The call's model, else the client's (``None`` if every endpoint names its own)."""
        resolved = model or self._model
        if not resolved and self._router.needs_model:
            raise ConfigurationError("no model given: pass model= to this call or to open_client()")
        return resolved

    async def chat(
        self,
        prompt_or_messages: Messages,
        *,
        model: str | None = None,
        retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
        cache: bool = True,
        **params: Any,
    ) -> ChatResponse:
        """Send one chat request and return the reply.

        Args:
            prompt_or_messages: a string (sent as one user message) or a list of
                message objects (``{"role": ..., "content": ...}``).
            model: the model; defaults to the client's.
            retry: this call's :class:`RetryPolicy` (default: the client's); ``None``
                makes one attempt with no deadline.
            cache: ``False``: this call neither reads nor fills the client's response
                cache (``open_client(cache=...)``).
            **params: any other field of the request body (``temperature``,
                ``max_tokens``, ``tools``, ``response_format``, ...), passed unchanged.

        Raises:
            APIStatusError: the server answered with an error status (a subclass names
                it), and it was not retried or the attempts ran out.
            APIConnectionError: no response arrived (``APITimeoutError`` on a timeout).
            RetryDeadlineExceeded: the retry policy's deadline passed.
            ConfigurationError: no model was given here or to the client.

        Cancellation: the attempt in flight is abandoned at once (its connection is
        closed, never returned to the pool half-read; its concurrency slot released),
        or the wait for the next attempt ends; nothing is retried after it.
        """
        requester = self._requester
        # Encoded at once: a request in flight holds only bytes (and, when its endpoints
        # differ in provider or model, what to build another endpoint's body from).
        request = requester.request(
            CHAT, prompt_or_messages, self._resolve_model(model), params, cache=cache
        )
        return await requester.call(
            request, self._read_chat, self._policy(retry), CachedReply.chat_response
        )

    @staticmethod
    async def _read_chat(exchange: Exchange) -> ChatResponse:
        payload = await exchange.read_json()
        route = exchange.route
        try:
            reply = route.provider.parse_chat(payload, exchange.request_id)
        except (TypeError, ValueError, AttributeError) as exc:  # pragma: no cover - defensive
            raise exchange.bad_reply(f"has an unexpected shape: {exc}") from exc
        set_chat_endpoint(reply, route.name)
        exchange.finish(reply, payload)
        return reply

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str | None = None,
        retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
        cache: bool = True,
        **params: Any,
    ) -> EmbeddingResponse:
        """Embed one text or a list of texts; vectors come back in input order.

        Args:
            texts: a string or a sequence of strings.
            model: the model; defaults to the client's.
            retry: this call's :class:`RetryPolicy`, as for :meth:`chat`.
            cache: ``False``: skip the client's response cache, as for :meth:`chat`.
            **params: other request fields (``dimensions``, ``encoding_format``, ...).
                ``encoding_format="base64"`` is decoded transparently.

        Raises:
            The same errors as :meth:`chat`.

        Cancellation: as for :meth:`chat`.
        """
        requester = self._requester
        request = requester.request(
            EMBEDDINGS, texts, self._resolve_model(model), params, cache=cache
        )
        return await requester.call(
            request, self._read_embeddings, self._policy(retry), CachedReply.embedding_response
        )

    @staticmethod
    async def _read_embeddings(exchange: Exchange) -> EmbeddingResponse:
        payload = await exchange.read_json()
        route = exchange.route
        try:
            reply = route.provider.parse_embeddings(payload, exchange.request_id)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise exchange.bad_reply(f"has an unexpected shape: {exc!r}") from exc
        set_embeddings_endpoint(reply, route.name)
        exchange.finish(reply, payload)
        return reply

    def _chat_item(
        self,
        model: str | None,
        retry: RetryPolicy | _ClientDefault | None,
        params: Mapping[str, Any],
    ) -> Callable[[ChatItem], Awaitable[ChatResponse]]:
        """Return a function sending one ``chat_many`` item with the shared settings."""

        async def send(item: ChatItem) -> ChatResponse:
            if isinstance(item, Mapping):
                fields = {**params, **item}
                messages = fields.pop("messages", None)
                if messages is None:
                    messages = fields.pop("prompt", None)
                if messages is None:
                    raise TypeError(
                        f"a request mapping needs 'messages' or 'prompt': {dict(item)!r:.100}"
                    )
                item_model = fields.pop("model", model)
                return await self.chat(messages, model=item_model, retry=retry, **fields)
            return await self.chat(item, model=model, retry=retry, **params)

        return send

    async def chat_many(
        self,
        items: Iterable[ChatItem] | AsyncIterable[ChatItem],
        *,
        limit: int | None = None,
        model: str | None = None,
        retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
        **params: Any,
    ) -> list[Result[ChatResponse]]:
        """Send many chat requests concurrently; return one :class:`Result` each, in order.

        One item's failure is captured in its ``Result`` (``ok=False``, ``error``) and
        never cancels the others. Items are pulled lazily by a fixed set of ``limit``
        worker tasks, so any iterable (a generator over a huge file, an async iterable)
        works in O(limit) memory besides the results.

        Args:
            items: prompts, message lists, or request mappings
                (``{"messages": [...], "temperature": 0}``; their fields override
                ``params``).
            limit: the most items in progress at once (default: the client's
                ``max_concurrency``, which bounds requests in flight in any case).
            model: the model (default: the client's).
            retry: the retry policy for each item (default: the client's).
            **params: body fields shared by every request.

        Cancellation: every request in flight is cancelled and nothing is returned;
        items not yet pulled stay in the iterator.
        """
        send = self._chat_item(model, retry, params)
        return await map_concurrently(
            capture_errors(send), items, limit=limit or self.max_concurrency
        )

    def chat_as_completed(
        self,
        items: Iterable[ChatItem] | AsyncIterable[ChatItem],
        *,
        limit: int | None = None,
        model: str | None = None,
        retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
        **params: Any,
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[tuple[int, Result[ChatResponse]]]]:
        """Send many chat requests concurrently; yield ``(index, Result)`` as each finishes.

        Use ``async with client.chat_as_completed(prompts) as results:`` then
        ``async for index, result in results:``. Arguments are as for :meth:`chat_many`.

        Cancellation: leaving the block early (``break``, an exception, a cancel scope)
        cancels every request still running at once; none keeps running or billing.
        """
        send = self._chat_item(model, retry, params)
        return as_completed(capture_errors(send), items, limit=limit or self.max_concurrency)

    def stream(
        self,
        prompt_or_messages: Messages,
        *,
        model: str | None = None,
        retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
        cache: bool = True,
        **params: Any,
    ) -> AbstractAsyncContextManager[ChatStream]:
        """Stream one chat reply: ``async with client.stream(prompt) as stream:``.

        ``async for chunk in stream`` yields :class:`ChatChunk`; after the loop
        ``stream.response`` is the aggregated :class:`ChatResponse`. Failures before the
        first event are retried under ``retry`` (default: the client's) and raised from
        ``async with``; later ones raise :class:`StreamError` from the loop. Other
        arguments as for :meth:`chat`; ``stream_options.include_usage`` is set unless
        given. With the client's cache, a reply stored before (streamed or not) is
        replayed as a stream, and a reply streamed to its end is stored.

        Cancellation: leaving the block early (break, an exception, a cancel scope)
        closes the response and its connection at once and releases the slot.
        """
        requester = self._requester
        resolved = self._resolve_model(model)
        request = requester.request(STREAM, prompt_or_messages, resolved, params, cache=cache)
        return open_chat_stream(requester, request, self._policy(retry))

    def stream_many(
        self,
        prompts: Iterable[Messages],
        *,
        model: str | None = None,
        retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
        cache: bool = True,
        **params: Any,
    ) -> AbstractAsyncContextManager[MultiChatStream]:
        """Stream several replies at once: ``async for index, item in streams``.

        ``item`` is a :class:`ChatChunk`, then exactly one :class:`Result` per prompt
        (its aggregated reply or its error); ``streams.results`` after the loop, in input
        order. At most ``max_concurrency`` streams are open at once.

        Cancellation: leaving the block early closes every open stream and starts no more.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, not one string")
        resolved = self._resolve_model(model)
        requester = self._requester
        requests = [
            requester.request(STREAM, prompt, resolved, params, cache=cache) for prompt in prompts
        ]
        return open_stream_many(requester, requests, self._policy(retry))


def _check_size(name: str, value: object, *, optional: bool = False) -> None:
    """Refuse a size setting that is not a whole number >= 1 (or None, if ``optional``).

    Raises:
        ConfigurationError: naming the setting.
    """
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, not {value!r}")


def _endpoints_of(
    endpoints: Sequence[Endpoint] | None, base_url: str | None, api_key: str | None, provider: str
) -> Sequence[Endpoint]:
    """The client's endpoints: those given, or the one ``base_url`` (or the default) names.

    Raises:
        ConfigurationError: ``endpoints`` with ``base_url`` or ``api_key``; a bad URL.
    """
    if endpoints is None:
        url = resolve_base_url(base_url, provider_named(provider))
        return [Endpoint(url, api_key=api_key, provider=provider)]
    if base_url is not None:
        raise ConfigurationError("open_client: pass base_url= or endpoints=, not both")
    if api_key is not None:
        raise ConfigurationError(
            "open_client: with endpoints=, give each Endpoint its api_key or api_key_env"
        )
    return list(endpoints)


@asynccontextmanager
async def open_client(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    provider: str = "openai",
    endpoints: Sequence[Endpoint] | None = None,
    max_concurrency: int = 64,
    rate_limit: RateLimit | None = _ADAPTIVE,
    retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
    timeouts: Timeouts | None = None,
    transport: httpx2.AsyncBaseTransport | None = None,
    headers: Mapping[str, str] | None = None,
    max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
    prices: Prices | None = None,
    cache: CacheSetting | None = None,
) -> AsyncIterator[Client]:
    """Open a client: connection pools and the limits every task using it shares.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``. Default:
            ``$OPENAI_BASE_URL``, else ``https://api.openai.com/v1``; for Anthropic
            ``$ANTHROPIC_BASE_URL``, else ``https://api.anthropic.com`` (no ``/v1``).
        api_key: the API key. Default: ``$OPENAI_API_KEY`` (``$ANTHROPIC_API_KEY`` for
            Anthropic); required unless the server is on a loopback address.
        model: the model of calls that name none (for endpoints that name none).
        provider: the wire format; ``"openai"`` (any OpenAI-compatible server) or
            ``"anthropic"`` (the Messages API: same calls and result types, requests and
            replies translated; ``embed`` raises :class:`ConfigurationError`).
        endpoints: several :class:`Endpoint` instead of one ``base_url`` (replicas,
            fallbacks): each attempt goes to one by priority, load per weight and
            health; a failed one fails over at once. Exclusive with ``base_url`` and
            ``api_key``; ``provider`` then applies to none (each has its own).
        max_concurrency: requests in flight at once, across all tasks and endpoints
            (and each endpoint's pool size, unless it sets its own).
        rate_limit: per-minute limits of all the calls (:class:`RateLimit`; ``shared=URL``:
            through Redis); with several endpoints, each one's that sets none. Default:
            the server's, from its ``x-ratelimit-*`` headers; ``None``: no limits. A 429
            with ``retry-after`` pauses every task sent there.
        retry: the :class:`RetryPolicy` of every call, which may override it (default:
            ``RetryPolicy()``: 6 attempts within 120 s); ``None``: no retries, no failover.
        timeouts: per-phase I/O limits (:class:`Timeouts`).
        transport: the HTTP transport of every endpoint (default: a :class:`TrioTransport`
            each, a connection per concurrency slot); any ``httpx2.AsyncBaseTransport``.
        headers: extra headers sent with every request (e.g. ``OpenAI-Organization``).
        max_response_bytes: the largest reply body (default 64 MiB) and stream event (at
            most 16 MiB); larger fails the call (:class:`APIResponseError`); ``None``: no limit.
        prices: a :class:`Price` for every model, or by model name; the others cost the
            list price of the answering endpoint's provider and model (``reply.cost``).
        cache: a response cache: an SQLite file's path (created if missing; a bad one
            raises :class:`CacheError`), a ``redis://`` URL, or a :class:`ResponseCache`.

    Raises:
        ConfigurationError: a bad setting, or no API key for a non-loopback server.
        SharedLimitError: the Redis of a shared rate limit does not answer.

    Leaving the block closes every connection: open it outside the nursery of its tasks.
    """
    _check_size("max_concurrency", max_concurrency)
    _check_size("max_response_bytes", max_response_bytes, optional=True)
    chosen = _endpoints_of(endpoints, base_url, api_key, provider)
    timeouts = timeouts or Timeouts()
    policy = RetryPolicy() if retry is CLIENT_DEFAULT else retry
    async with open_router(
        chosen,
        max_concurrency=max_concurrency,
        timeouts=timeouts,
        rate_limit=rate_limit,
        transport=transport,
        headers=headers,
    ) as router:
        requester = Requester(
            router=router,
            max_concurrency=max_concurrency,
            timeouts=timeouts,
            max_response_bytes=max_response_bytes,
            prices=prices,
        )
        async with open_cache_hook(cache) as requester.cache:
            yield Client(requester=requester, model=model, retry=policy)
