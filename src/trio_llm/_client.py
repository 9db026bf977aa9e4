"""The client: one pooled HTTP client, one concurrency limit, shared by every task."""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import time
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
from functools import partial
from typing import Any, Final, final
from urllib.parse import urlsplit

import attrs
import httpx2
import trio

from . import _json
from ._config import RetryPolicy, Timeouts
from ._errors import (
    APIResponseError,
    APITimeoutError,
    ConfigurationError,
    LLMError,
    error_from_response,
    error_from_transport,
)
from ._fanout import as_completed, capture_errors, map_concurrently
from ._ratelimit import RateLimit, RateLimiter, Reservation, estimate_tokens
from ._retry import call_with_retries
from ._streaming import ChatStream, MultiChatStream, open_chat_stream, open_stream_many
from ._transport import DirectResponse, TrioTransport, direct_transport
from ._types import ChatResponse, EmbeddingResponse, Result, Usage
from ._version import __version__
from .providers._anthropic import AnthropicProvider
from .providers._base import Messages, Provider
from .providers._openai import OpenAIProvider

__all__ = ["Client", "ClientStatistics", "open_client"]

logger = logging.getLogger("trio_llm")


class _ClientDefault(enum.Enum):
    """The type of :data:`CLIENT_DEFAULT`."""

    CLIENT_DEFAULT = "CLIENT_DEFAULT"


#: A per-call setting left at this value takes the client's setting.
CLIENT_DEFAULT: Final = _ClientDefault.CLIENT_DEFAULT

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


@final
class Client:
    """A connection pool and the limits shared by every task that uses it.

    Create one with :func:`open_client`; it is safe to share between any number of tasks.
    """

    def __init__(
        self,
        *,
        http: httpx2.AsyncClient,
        base_url: str,
        model: str | None,
        max_concurrency: int,
        provider: Provider,
        timeouts: Timeouts,
        retry: RetryPolicy | None,
        rate_limit: RateLimit | None,
    ) -> None:
        self._http = http
        # The headers of every request, read once: httpx2 builds a new list on each read.
        self._direct_headers = http.headers.raw
        self._retry = retry
        self._rate = RateLimiter(rate_limit) if rate_limit is not None else None
        self._timeouts = timeouts
        self._base_url = base_url
        self._endpoints: dict[str, tuple[str, str]] = {}  # path: (URL, log label)
        self._model = model
        self._provider = provider
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self._sent = 0
        self._succeeded = 0
        self._failed = 0
        self._retried = 0
        self._rate_limited = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0

    def __repr__(self) -> str:
        return (
            f"<trio_llm.Client provider={self._provider.name!r} base_url={self._base_url!r} "
            f"model={self._model!r} max_concurrency={self._limiter.total_tokens}>"
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
        return int(self._limiter.total_tokens)

    def statistics(self) -> ClientStatistics:
        """Return a snapshot of the client's counters."""
        limiter = self._limiter.statistics()
        rate_waiting = self._rate.statistics().waiting if self._rate is not None else 0
        return ClientStatistics(
            in_flight=limiter.borrowed_tokens,
            waiting=limiter.tasks_waiting + rate_waiting,
            max_concurrency=int(limiter.total_tokens),
            sent=self._sent,
            succeeded=self._succeeded,
            failed=self._failed,
            retried=self._retried,
            rate_limited=self._rate_limited,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
        )

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
        # The body is not kept here: _call lets go of it once encoded.
        payload, request_id = await self._call(
            self._provider.chat_path,
            self._provider.chat_body(prompt_or_messages, self._resolve_model(model), params),
            retry,
        )
        try:
            reply = self._provider.parse_chat(payload, request_id)
        except (TypeError, ValueError, AttributeError) as exc:  # pragma: no cover - defensive
            self._failed += 1
            raise APIResponseError(
                f"unexpected chat response shape: {exc}", status_code=200, request_id=None
            ) from exc
        self._count_usage(reply.usage)
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
        payload, request_id = await self._call(
            self._provider.embeddings_path,
            self._provider.embeddings_body(texts, self._resolve_model(model), params),
            retry,
        )
        reply = self._provider.parse_embeddings(payload, request_id)
        self._count_usage(reply.usage)
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
        policy = self._retry if retry is CLIENT_DEFAULT else retry
        return open_chat_stream(self, prompt_or_messages, model=model, retry=policy, **params)

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
        policy = self._retry if retry is CLIENT_DEFAULT else retry
        return open_stream_many(self, prompts, model=model, retry=policy, **params)

    def _count_usage(self, usage: Usage) -> None:
        self._succeeded += 1
        self._prompt_tokens += usage.prompt_tokens
        self._completion_tokens += usage.completion_tokens

    def _note_retry(self, _error: LLMError) -> None:
        self._retried += 1

    async def _call(
        self,
        path: str,
        body: Mapping[str, Any],
        retry: RetryPolicy | _ClientDefault | None,
    ) -> tuple[dict[str, Any], str | None]:
        """POST ``body`` under the retry policy; return the decoded reply and request id."""
        policy = self._retry if retry is CLIENT_DEFAULT else retry
        endpoint = self._endpoints.get(path)
        if endpoint is None:
            url = self._base_url + path
            endpoint = self._endpoints[path] = (url, f"POST {url}")
        url, label = endpoint
        content = _encode_json(body)
        estimate = estimate_tokens(body) if self._rate is not None else 0
        # Encoded: the body is needed no more, and a request in flight holds only bytes.
        del body
        # Straight to trio-llm's own transport when httpx2's client layer would add nothing
        # to this POST (no proxy mounts, auth or hooks): it costs as much CPU as the whole
        # rest of the request (docs/performance.md). Other transports go through httpx2.
        direct = direct_transport(self._http)
        try:
            return await call_with_retries(
                partial(self._post_json, url, content, estimate, direct),
                policy,
                label=label,
                on_retry=self._note_retry,
                # The direct path cuts every wait and timeout short at the deadline.
                bounded=direct is not None,
            )
        except LLMError:
            self._failed += 1
            raise

    async def _post_json(
        self,
        url: str,
        content: bytes,
        estimate: int,
        direct: TrioTransport | None,
        deadline_at: float,
    ) -> tuple[dict[str, Any], str | None]:
        """Make one attempt: POST ``content`` within the rate and concurrency limits.

        ``direct``: the client's transport, when requests may skip httpx2's client layer.

        ``estimate`` is the request's token cost as reserved from the rate limiter before
        sending; the reservation is given back if nothing was sent, and corrected with the
        reply's real ``usage`` after. The waits for the rate limiter and for a concurrency
        slot, and on the direct path every I/O timeout, end by the trio time
        ``deadline_at`` (raising :class:`APITimeoutError`).
        """
        # A cancelled call stops here, before it takes a slot or a pooled connection (the
        # waits below do not checkpoint when nothing has to wait).
        await trio.lowlevel.checkpoint_if_cancelled()
        rate = self._rate
        reservation: Reservation | None = None
        if rate is not None:
            try:
                reservation = rate.acquire_nowait(estimate)
            except trio.WouldBlock:
                with trio.move_on_at(deadline_at):
                    reservation = await rate.acquire(estimate)
                if reservation is None:
                    raise _deadline_timeout(url, "the rate limiter") from None
        http = self._http
        response: httpx2.Response | DirectResponse
        limiter = self._limiter
        try:
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                with trio.move_on_at(deadline_at) as waiting:
                    await limiter.acquire()
                if waiting.cancelled_caught:
                    raise _deadline_timeout(url, "a concurrency slot") from None
            try:
                self._sent += 1
                started = time.perf_counter()
                if direct is not None:
                    response = await direct.post_direct(
                        url, self._direct_headers, content, http.timeout, deadline_at
                    )
                else:
                    response = await http.post(url, content=content)
            except httpx2.HTTPError as exc:
                raise error_from_transport(exc, method="POST", url=url) from exc
            finally:
                limiter.release()
        except BaseException as exc:
            # No response: the server most likely never counted it (and if the caller
            # cancelled, it must not cost the other tasks capacity).
            if reservation is not None:
                reservation.refund()
            if isinstance(exc, Exception):
                # A failure before any I/O (a header h11 refuses, a closed transport) must
                # still be a schedule point, as every trio call is.
                await trio.lowlevel.cancel_shielded_checkpoint()
            raise
        status = response.status_code
        if logger.isEnabledFor(logging.DEBUG):
            elapsed = (time.perf_counter() - started) * 1000
            logger.debug("POST %s -> %d (%.1f ms)", url, status, elapsed)
        headers = response.headers
        body = response.content
        if status >= 400:
            error = error_from_response(status, headers, body, reason=response.reason_phrase)
            if reservation is not None:
                reservation.refund() if status == 429 else reservation.reconcile(0)
            if rate is not None:
                # After the refund: the server's remaining count is the truth from here
                # on, and a refund on top of it would put this client ahead of the server.
                rate.update_from_headers(headers)
            if status == 429:
                self._rate_limited += 1
                if rate is not None and error.retry_after:
                    rate.pause(error.retry_after)  # every task of the client waits it out
            raise error
        if rate is not None:
            rate.update_from_headers(headers)
        try:
            return _decode_reply(url, status, headers, body, reservation)
        finally:
            if reservation is not None:
                reservation.keep()  # answered without a usage it could read: the estimate


def _decode_reply(
    url: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    reservation: Reservation | None,
) -> tuple[dict[str, Any], str | None]:
    """Decode a success reply; settle ``reservation`` with its usage, if it has one."""
    try:
        payload = _json.loads(body)
    except ValueError as exc:
        text = body[:200].decode("utf-8", "replace")
        raise APIResponseError(
            f"HTTP {status} from POST {url} is not JSON: {text!r}",
            status_code=status,
            request_id=headers.get("x-request-id"),
        ) from exc
    if not isinstance(payload, dict):
        raise APIResponseError(
            f"HTTP {status} from POST {url} is not a JSON object",
            status_code=status,
            request_id=headers.get("x-request-id"),
        )
    if reservation is not None:
        usage = payload.get("usage")
        if isinstance(usage, dict):
            total = usage.get("total_tokens")
            if total is None:  # Anthropic reports input and output tokens only
                parts = (usage.get("input_tokens"), usage.get("output_tokens"))
                total = sum(p for p in parts if isinstance(p, int))
            if isinstance(total, int):
                reservation.reconcile(total)
    # OpenAI says x-request-id; Anthropic says request-id.
    return payload, headers.get("x-request-id") or headers.get("request-id")


def _deadline_timeout(url: str, what: str) -> APITimeoutError:
    return APITimeoutError(
        f"the call's deadline passed while it waited for {what}", method="POST", url=url
    )


def _encode_json(body: Mapping[str, Any]) -> bytes:
    """Encode a request body as compact UTF-8 JSON."""
    return _json.dumps(body)


def _resolve_base_url(base_url: str | None, provider: Provider) -> str:
    url = base_url or os.environ.get(provider.base_url_env) or provider.default_base_url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"base_url must be an http:// or https:// URL, not {url!r}")
    return url.rstrip("/")


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
        max_concurrency: requests in flight at once, across all tasks; also the size
            of the connection pool.
        rate_limit: requests and tokens per minute for all the client's calls together
            (:class:`RateLimit`). The default, ``RateLimit()``, sets no limit of its own
            but adopts the server's from its ``x-ratelimit-*`` headers; ``None`` turns
            rate limiting off entirely. A 429 with ``retry-after`` pauses every task.
        retry: the :class:`RetryPolicy` of every call (default: ``RetryPolicy()``: 6
            attempts within 120 s); ``None`` disables retries. Calls may override it.
        timeouts: per-phase I/O limits (:class:`Timeouts`).
        transport: the HTTP transport. Default: a :class:`TrioTransport` with one
            connection per concurrency slot. Any ``httpx2.AsyncBaseTransport`` works:
            ``httpx2.AsyncHTTPTransport(...)`` for HTTP/2 or proxies,
            ``httpx2.MockTransport`` in tests.
        headers: extra headers sent with every request (e.g. ``OpenAI-Organization``).

    Raises:
        ConfigurationError: a bad setting, or no API key for a non-loopback server.

    Leaving the block closes every connection; calls still running in other tasks must
    have finished by then (open the client outside the nursery that uses it).
    """
    adapter: Provider
    if provider == "openai":
        adapter = OpenAIProvider()
    elif provider == "anthropic":
        adapter = AnthropicProvider()
    else:
        raise ConfigurationError(f"unknown provider {provider!r}; supported: 'openai', 'anthropic'")
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ConfigurationError(f"max_concurrency must be an int >= 1, not {max_concurrency!r}")
    url = _resolve_base_url(base_url, adapter)
    key = api_key if api_key is not None else os.environ.get(adapter.api_key_env)
    host = urlsplit(url).hostname or ""
    if not key and not _is_loopback(host):
        raise ConfigurationError(
            f"no API key for {url}: pass api_key= or set ${adapter.api_key_env}"
        )
    default_headers = {
        "user-agent": f"trio-llm/{__version__}",
        "content-type": "application/json",
        "accept": "application/json",
    }
    default_headers.update(adapter.auth_headers(key))
    if headers:
        default_headers.update(headers)
    limits = httpx2.Limits(
        max_connections=max_concurrency, max_keepalive_connections=max_concurrency
    )
    timeouts = timeouts or Timeouts()
    if transport is None:
        # Its cost per request stays flat as requests in flight grow, where httpx2's pool
        # rescans every connection (docs/performance.md). Timeouts reach it per request.
        transport = TrioTransport(limits=limits)
    http = httpx2.AsyncClient(
        headers=default_headers,
        timeout=timeouts.to_httpx(),
        limits=limits,
        transport=transport,
        follow_redirects=False,
    )
    async with http:
        yield Client(
            http=http,
            base_url=url,
            model=model,
            max_concurrency=max_concurrency,
            provider=adapter,
            timeouts=timeouts,
            retry=RetryPolicy() if retry is CLIENT_DEFAULT else retry,
            rate_limit=rate_limit,
        )
