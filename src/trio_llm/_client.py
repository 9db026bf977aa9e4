"""The client: one pooled HTTP client, one concurrency limit, shared by every task."""

from __future__ import annotations

import enum
import ipaddress
import os
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
from typing import Any, Final, final
from urllib.parse import urlsplit

import attrs
import httpx2
import trio

from ._attempt import Exchange, Requester
from ._config import RetryPolicy, Timeouts
from ._cost import Pricer, Prices
from ._errors import ConfigurationError, redact_url
from ._fanout import as_completed, capture_errors, map_concurrently
from ._http import TrioTransport
from ._ratelimit import RateLimit, RateLimiter
from ._sending import direct_transport_for, environment_proxy_for
from ._streaming import ChatStream, MultiChatStream, open_chat_stream, open_stream_many
from ._types import ChatResponse, EmbeddingResponse, Result
from ._version import __version__
from .providers._base import Messages, Provider
from .providers._registry import provider_named

__all__ = ["Client", "ClientStatistics", "open_client"]


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

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@final
@attrs.frozen(kw_only=True)
class ClientStatistics:
    """A snapshot of a client's activity since it was opened.

    Attributes:
        in_flight: requests holding a concurrency slot now.
        waiting: requests waiting for a concurrency slot or for rate-limit capacity now.
        max_concurrency: the concurrency limit.
        sent: HTTP attempts started.
        succeeded: calls that returned a result.
        failed: calls that raised an error (cancelled calls count in neither).
        retried: retry attempts made (attempts after the first of a call).
        rate_limited: 429 responses received.
        prompt_tokens: prompt tokens reported by the server's ``usage``.
        completion_tokens: completion tokens reported by the server's ``usage``.
        cost: what the calls that returned a result cost, in USD (streams included), by
            the models' list prices or the client's ``prices``; ``None`` when some had no
            known price (see ``unpriced``): a total is never guessed.
        unpriced: calls that returned a result whose cost is unknown (their model has no
            price, or the reply reported no usage).
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
    cost: float | None = 0.0
    unpriced: int = 0


@final
class Client:
    """A connection pool and the limits shared by every task that uses it.

    Create one with :func:`open_client`; it is safe to share between any number of tasks.
    """

    def __init__(
        self,
        *,
        requester: Requester,
        base_url: str,
        model: str | None,
        retry: RetryPolicy | None,
    ) -> None:
        self._requester = requester
        # The transport, when requests skip httpx2's client layer.
        self._direct = requester.direct
        self._retry = retry
        self._base_url = base_url
        self._model = model
        self._provider = provider = requester.provider
        self._chat_url = base_url + provider.chat_path
        self._embeddings_url = base_url + provider.embeddings_path

    def __repr__(self) -> str:
        return (
            f"<trio_llm.Client provider={self._provider.name!r} "
            f"base_url={redact_url(self._base_url)!r} "
            f"model={self._model!r} max_concurrency={self.max_concurrency}>"
        )

    @property
    def base_url(self) -> str:
        """The API's base URL, e.g. ``https://api.openai.com/v1``."""
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
        return self._requester.rate

    def statistics(self) -> ClientStatistics:
        """Return a snapshot of the client's counters."""
        requester = self._requester
        limiter = requester.limiter.statistics()
        rate_waiting = requester.rate.statistics().waiting if requester.rate is not None else 0
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
            cost=None if requester.unpriced else requester.cost,
            unpriced=requester.unpriced,
        )

    def _policy(self, retry: RetryPolicy | _ClientDefault | None) -> RetryPolicy | None:
        return self._retry if retry is CLIENT_DEFAULT else retry

    def _resolve_model(self, model: str | None) -> str:
        resolved = model or self._model
        if not resolved:
            raise ConfigurationError("no model given: pass model= to this call or to open_client()")
        return resolved

    async def chat(
        self,
        prompt_or_messages: Messages,
        *,
        model: str | None = None,
        retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
        **params: Any,
    ) -> ChatResponse:
        """Send one chat request and return the reply.

        Args:
            prompt_or_messages: a string (sent as one user message) or a list of
                message objects (``{"role": ..., "content": ...}``).
            model: the model; defaults to the client's.
            retry: this call's :class:`RetryPolicy` (default: the client's); ``None``
                makes one attempt with no deadline.
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
        # Encoded at once: a request in flight holds only bytes.
        request = requester.request(
            self._chat_url,
            self._provider.chat_body(prompt_or_messages, self._resolve_model(model), params),
        )
        return await requester.call(request, self._read_chat, self._policy(retry))

    async def _read_chat(self, exchange: Exchange) -> ChatResponse:
        payload = await exchange.read_json()
        try:
            reply = self._provider.parse_chat(payload, exchange.request_id)
        except (TypeError, ValueError, AttributeError) as exc:  # pragma: no cover - defensive
            raise exchange.bad_reply(f"has an unexpected shape: {exc}") from exc
        exchange.finish_reply(reply)
        return reply

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        model: str | None = None,
        retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
        **params: Any,
    ) -> EmbeddingResponse:
        """Embed one text or a list of texts; vectors come back in input order.

        Args:
            texts: a string or a sequence of strings.
            model: the model; defaults to the client's.
            retry: this call's :class:`RetryPolicy`, as for :meth:`chat`.
            **params: other request fields (``dimensions``, ``encoding_format``, ...).
                ``encoding_format="base64"`` is decoded transparently.

        Raises:
            The same errors as :meth:`chat`.

        Cancellation: as for :meth:`chat`.
        """
        requester = self._requester
        request = requester.request(
            self._embeddings_url,
            self._provider.embeddings_body(texts, self._resolve_model(model), params),
        )
        return await requester.call(request, self._read_embeddings, self._policy(retry))

    async def _read_embeddings(self, exchange: Exchange) -> EmbeddingResponse:
        payload = await exchange.read_json()
        try:
            reply = self._provider.parse_embeddings(payload, exchange.request_id)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise exchange.bad_reply(f"has an unexpected shape: {exc!r}") from exc
        exchange.finish_reply(reply)
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
        **params: Any,
    ) -> AbstractAsyncContextManager[ChatStream]:
        """Stream one chat reply: ``async with client.stream(prompt) as stream:``.

        ``async for chunk in stream`` yields :class:`ChatChunk`; after the loop
        ``stream.response`` is the aggregated :class:`ChatResponse`. Failures before the
        first event are retried under ``retry`` (default: the client's) and raised from
        ``async with``; later ones raise :class:`StreamError` from the loop. Other
        arguments as for :meth:`chat`; ``stream_options.include_usage`` is set unless
        given.

        Cancellation: leaving the block early (break, an exception, a cancel scope)
        closes the response and its connection at once and releases the slot.
        """
        body = self._provider.stream_body(prompt_or_messages, self._resolve_model(model), params)
        return open_chat_stream(self._requester, self._chat_url, body, self._policy(retry))

    def stream_many(
        self,
        prompts: Iterable[Messages],
        *,
        model: str | None = None,
        retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
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
        stream_body = self._provider.stream_body
        bodies = [stream_body(prompt, resolved, params) for prompt in prompts]
        return open_stream_many(self._requester, self._chat_url, bodies, self._policy(retry))


def _resolve_base_url(base_url: str | None, provider: Provider) -> str:
    url = base_url or os.environ.get(provider.base_url_env) or provider.default_base_url
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 address
        shown = redact_url(url)
        raise ConfigurationError(f"base_url {shown!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigurationError(
            f"base_url must be an http:// or https:// URL, not {redact_url(url)!r}"
        )
    return url.rstrip("/")


def _check_size(name: str, value: object, *, optional: bool = False) -> None:
    """Refuse a size setting that is not a whole number >= 1 (or None, if ``optional``).

    Raises:
        ConfigurationError: naming the setting.
    """
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, not {value!r}")


def _default_headers(
    adapter: Provider, url: str, api_key: str | None, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """Return the headers of every request: ours, the provider's key, the caller's.

    Raises:
        ConfigurationError: no API key for a server that is not on a loopback address.
    """
    key = api_key if api_key is not None else os.environ.get(adapter.api_key_env)
    if not key and not _is_loopback(urlsplit(url).hostname or ""):
        raise ConfigurationError(
            f"no API key for {redact_url(url)}: pass api_key= or set ${adapter.api_key_env}"
        )
    headers = {
        "user-agent": f"trio-llm/{__version__}",
        "content-type": "application/json",
        "accept": "application/json",
    }
    headers.update(adapter.auth_headers(key))
    if extra:
        headers.update(extra)
    return headers


def _transport(
    transport: httpx2.AsyncBaseTransport | None, url: str, max_concurrency: int
) -> tuple[httpx2.AsyncBaseTransport | None, httpx2.Limits]:
    """Return the client's transport (the caller's, else ours) and its pool limits.

    Ours unless a proxy from the environment applies to ``url`` (then httpx2's, through
    it): its cost per request stays flat however many are in flight (docs/performance.md).
    """
    limits = httpx2.Limits(
        max_connections=max_concurrency, max_keepalive_connections=max_concurrency
    )
    if transport is None and not environment_proxy_for(url):
        transport = TrioTransport(limits=limits)
    return transport, limits


@asynccontextmanager
async def open_client(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    provider: str = "openai",
    max_concurrency: int = 64,
    rate_limit: RateLimit | None = _ADAPTIVE,
    retry: RetryPolicy | _ClientDefault | None = CLIENT_DEFAULT,
    timeouts: Timeouts | None = None,
    transport: httpx2.AsyncBaseTransport | None = None,
    headers: Mapping[str, str] | None = None,
    max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
    prices: Prices | None = None,
) -> AsyncIterator[Client]:
    """Open a client: a connection pool and the limits every task using it shares.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``. Default:
            ``$OPENAI_BASE_URL``, else ``https://api.openai.com/v1``; for Anthropic
            ``$ANTHROPIC_BASE_URL``, else ``https://api.anthropic.com`` (no ``/v1``).
        api_key: the API key. Default: ``$OPENAI_API_KEY`` (``$ANTHROPIC_API_KEY`` for
            Anthropic). Required unless the server is on a loopback address (local
            servers often need none).
        model: the model used by calls that name none.
        provider: the wire format; ``"openai"`` (any OpenAI-compatible server) or
            ``"anthropic"`` (the Messages API: same calls and result types, requests and
            replies translated; ``embed`` raises :class:`ConfigurationError`).
        max_concurrency: requests in flight at once, across all tasks (and pool size).
        rate_limit: requests and tokens per minute for all the client's calls together
            (:class:`RateLimit`). The default, ``RateLimit()``, sets no limit of its own
            but adopts the server's from its ``x-ratelimit-*`` headers; ``None`` turns
            rate limiting off entirely. A 429 with ``retry-after`` pauses every task.
        retry: the :class:`RetryPolicy` of every call (default: ``RetryPolicy()``: 6
            attempts within 120 s); ``None`` disables retries. Calls may override it.
        timeouts: per-phase I/O limits (:class:`Timeouts`).
        transport: the HTTP transport. Default: a :class:`TrioTransport` with one
            connection per concurrency slot. Any ``httpx2.AsyncBaseTransport`` works:
            ``httpx2.AsyncHTTPTransport(...)`` (HTTP/2, proxies), ``MockTransport``.
        headers: extra headers sent with every request (e.g. ``OpenAI-Organization``).
        max_response_bytes: the largest reply body (default 64 MiB) and stream event
            (at most 16 MiB) accepted; a larger one fails the call at once with
            :class:`APIResponseError`. ``None``: no limit.
        prices: a :class:`Price` for every model, or prices by model name; the others
            cost genai-prices' list price for the provider and model (``reply.cost``).

    Raises:
        ConfigurationError: a bad setting, or no API key for a non-loopback server.

    Leaving the block closes every connection: open the client outside the nursery
    whose tasks use it, so that their calls have finished by then.
    """
    adapter = provider_named(provider)
    _check_size("max_concurrency", max_concurrency)
    _check_size("max_response_bytes", max_response_bytes, optional=True)
    url = _resolve_base_url(base_url, adapter)
    timeouts = timeouts or Timeouts()
    transport, limits = _transport(transport, url, max_concurrency)
    headers = _default_headers(adapter, url, api_key, headers)
    http = httpx2.AsyncClient(
        headers=headers, timeout=timeouts.to_httpx(), limits=limits, transport=transport
    )
    requester = Requester(
        http=http,
        direct=direct_transport_for(transport, url),
        provider=adapter,
        rate=RateLimiter(rate_limit) if rate_limit is not None else None,
        max_concurrency=max_concurrency,
        timeouts=timeouts,
        max_response_bytes=max_response_bytes,
        pricer=Pricer(adapter.name, prices),
    )
    async with http:
        yield Client(
            requester=requester,
            base_url=url,
            model=model,
            retry=RetryPolicy() if retry is CLIENT_DEFAULT else retry,
        )
