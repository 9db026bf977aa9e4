"""The request lifecycle: one HTTP attempt, as ``chat``, ``embed`` and ``stream`` share it.

One attempt, in order (:meth:`Requester.open_exchange`, then the caller reads)::

    rate-limit reservation (estimate)        waits FIFO; a cancelled wait takes nothing
    concurrency slot                         waits FIFO; held until the exchange closes
    send                                     trio-llm's transport directly, or httpx2
    transport errors -> LLMError             mapped here, at each place I/O happens
    status >= 400 -> APIStatusError          429: refund, then header feedback, then pause
    rate-limit header feedback               the provider turns headers into levels
    -- the open response goes to the caller: chat/embed read the body, a stream its events
    settle (finish / fail / close)           reconcile with usage, keep, or refund
    statistics                               counted here and nowhere else

The retry policy repeats whole attempts, inside one cancel scope that is the call's
deadline (:func:`trio_llm._retry.call_with_retries`). Where later features hook in:
endpoint choice picks the :class:`Requester` (its URL, transport and limits) before
:meth:`Requester.open_exchange`; a cache lookup runs in :meth:`Requester.call` before the
retry loop (a hit is no attempt); cost is computed where :meth:`Exchange.finish_reply` has
the reply; a traced call (:mod:`trio_llm._telemetry`) has a span around its retry loop and
one per attempt, from :meth:`Requester.attempt` to its end (:meth:`Exchange.aclose`).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import Any, Final, TypeVar, final

import httpx2
import trio

from . import _json
from ._config import RetryPolicy, Timeouts
from ._cost import Pricer
from ._errors import (
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    LLMError,
    error_from_response,
    error_from_transport,
    redact_url,
)
from ._estimate import estimate_tokens
from ._http import BodyTooLarge, HTTPResponse, TrioTransport
from ._ratelimit import RateLimiter, Reservation
from ._request import Request
from ._retry import call_with_retries
from ._sending import HttpxResponse, stream_decoder
from ._telemetry import instruments as _instruments
from ._types import ChatResponse, EmbeddingResponse, Usage, set_cost
from .providers._base import Provider

__all__ = ["Exchange", "Request", "Requester"]

T = TypeVar("T")
R = TypeVar("R", ChatResponse, EmbeddingResponse)

logger = logging.getLogger("trio_llm")

_NO_SCOPE: Final = nullcontext()
_INF: Final = math.inf
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint


@final
class Exchange:
    """One attempt's response, open: its concurrency slot and reservation held.

    Obtained from :meth:`Requester.open_exchange` with a success status. Read it with
    :meth:`read_json` (a whole reply) or :meth:`receive_some` (a stream), then
    :meth:`finish` with the reply's usage or :meth:`fail`, and always :meth:`aclose`.
    """

    __slots__ = (
        "_decoder",
        "_requester",
        "_reservation",
        "_response",
        "_slot",
        "request",
        "request_id",
    )

    def __init__(
        self,
        requester: Requester,
        request: Request,
        response: HTTPResponse | HttpxResponse,
        reservation: Reservation | None,
    ) -> None:
        self._requester = requester
        self._response = response
        self._reservation = reservation
        self._slot = True
        self.request = request
        self.request_id = requester.provider.request_id(response.headers)
        # Read part by part on trio-llm's transport, a stream is decoded here (httpx2 does
        # it for its own responses).
        self._decoder = (
            stream_decoder(response.headers.get("content-encoding"))
            if request.stream and type(response) is HTTPResponse
            else None
        )

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def reason_phrase(self) -> str:
        return self._response.reason_phrase

    @property
    def max_response_bytes(self) -> int | None:
        """The largest body (or streamed event) the client accepts."""
        return self._requester.max_response_bytes

    async def read(self) -> bytes:
        """Read the whole body; the slot is released once it is read.

        Raises:
            APIConnectionError: the connection failed (``APITimeoutError``: the read
                timeout expired) before the end of the body.
            APIResponseError: the body is larger than the client's ``max_response_bytes``.

        Cancellation: the connection is closed; the exchange is left to :meth:`aclose`.
        """
        limit = self._requester.max_response_bytes
        self.request.waiting_for = "the rest of the response"
        try:
            body = await self._response.read(limit)
        except httpx2.HTTPError as exc:
            raise error_from_transport(exc, method="POST", url=self.request.shown_url) from exc
        except BodyTooLarge as exc:
            raise self.bad_reply(
                f"is larger than the {exc.limit:,}-byte limit (open_client's "
                "max_response_bytes); its connection was closed"
            ) from None
        self._release_slot()
        return body

    async def read_json(self) -> dict[str, Any]:
        """Read the whole body and decode it as a JSON object.

        Raises:
            APIResponseError: the body is not a JSON object.
            APIConnectionError: as for :meth:`read`.
        """
        body = await self.read()
        try:
            payload = _json.loads(body)
        except ValueError as exc:
            raise self.bad_reply(f"is not JSON: {body[:200].decode('utf-8', 'replace')!r}") from exc
        if not isinstance(payload, dict):
            raise self.bad_reply("is not a JSON object")
        return payload

    async def receive_some(self) -> bytes:
        """Return the next bytes of the body (``b""`` at its end), decoded if compressed.

        Raises:
            APIConnectionError: the connection failed or the read timeout expired.
            APIResponseError: a compressed body does not decode.

        Cancellation: nothing was received; the connection is closed.
        """
        try:
            data = await self._response.receive_some()
            decoder = self._decoder
            if decoder is None:
                return data
            # A server that compresses a stream although asked not to (a proxy, say).
            while data:
                decoded = decoder.decompress(data)
                if decoded:
                    return decoded
                data = await self._response.receive_some()
            return decoder.flush()
        except httpx2.HTTPError as exc:
            raise error_from_transport(exc, method="POST", url=self.request.shown_url) from exc
        except zlib.error as exc:
            raise self.bad_reply(f"does not decode as its content-encoding says: {exc}") from exc

    def bad_reply(self, what: str) -> APIResponseError:
        """Return the error for a success reply whose body ``what`` (e.g. "is not JSON")."""
        return APIResponseError(
            f"HTTP {self.status_code} from {self.request.label} {what}",
            status_code=self.status_code,
            request_id=self.request_id,
        )

    def error_event(self, status: int, error: object) -> APIStatusError:
        """Return the error for an error event that came before any of the reply.

        Built and settled as an error reply of ``status`` carrying ``error`` would be, so
        it is retried (or not), refunded and counted as that status is.
        """
        body = _json.dumps({"error": error})
        return self._requester.status_error(self, status, body, "error event in the stream")

    def finish(self, usage: Usage) -> None:
        """Count the call as succeeded with ``usage``; settle the reservation with it.

        A reply that reports no tokens settles at the estimate.
        """
        requester = self._requester
        requester.succeeded += 1
        requester.prompt_tokens += usage.prompt_tokens
        requester.completion_tokens += usage.completion_tokens
        reservation = self._reservation
        if reservation is not None:
            self._reservation = None
            if usage.total_tokens:
                reservation.reconcile(usage.total_tokens)
            else:
                reservation.keep()

    def settle(self, *, refund: bool) -> None:
        """Settle the reservation of an error reply: refunded, or charged no tokens."""
        reservation = self._reservation
        if reservation is not None:
            self._reservation = None
            reservation.refund() if refund else reservation.reconcile(0)

    def finish_reply(self, reply: R) -> R:
        """:meth:`finish` with ``reply``'s usage, price it (``reply.cost``), count it; return it.

        A reply with no known price (``trio_llm._cost``) is counted as unpriced.
        """
        usage = reply.usage
        self.finish(usage)
        requester = self._requester
        request = self.request
        cost = requester.pricer.cost(usage, reply.model, request.model)
        if cost is None:
            requester.unpriced += 1
        else:
            requester.cost += cost
            set_cost(reply, cost)
        trace = request.telemetry
        if trace is not None:
            trace.replied(reply)
        return reply

    def fail(self, error: BaseException | None = None) -> None:
        """Count the call as failed after its response began (a stream that broke)."""
        self._requester.failed += 1
        trace = self.request.telemetry
        if trace is not None and error is not None:
            trace.failed(error)

    def _release_slot(self) -> None:
        if self._slot:
            self._slot = False
            self._requester.limiter.release()

    async def aclose(self) -> None:
        """Close the response and release the slot; an unsettled reservation is kept.

        A body not read to its end closes its connection. Never raises; safe in
        ``finally`` blocks of cancelled scopes.
        """
        response = self._response
        try:
            if type(response) is HTTPResponse:
                response.close()
            else:
                await response.aclose()
        finally:
            if self._reservation is not None:
                # Answered, usage unknown (left early, failed): the estimate stays charged.
                self._reservation.keep()
                self._reservation = None
            self._release_slot()
            trace = self.request.telemetry
            if trace is not None:
                trace.closed()


@final
class Requester:
    """The lifecycle of a client's requests: limits, sending, settling and statistics.

    One per client, shared by all its tasks. The counters are the client's statistics.
    """

    __slots__ = (
        "_headers",
        "_http",
        "_limits",
        "_limits_by_phases",
        "_phases",
        "_shown",
        "_stream_headers",
        "completion_tokens",
        "cost",
        "direct",
        "failed",
        "last_retry_error",
        "limiter",
        "max_response_bytes",
        "pricer",
        "prompt_tokens",
        "provider",
        "rate",
        "rate_limited",
        "retried",
        "sent",
        "succeeded",
        "timeouts",
        "unpriced",
    )

    def __init__(
        self,
        *,
        http: httpx2.AsyncClient,
        direct: TrioTransport | None,
        provider: Provider,
        rate: RateLimiter | None,
        max_concurrency: int,
        timeouts: Timeouts,
        max_response_bytes: int | None = None,
        pricer: Pricer | None = None,
    ) -> None:
        self._http = http
        self.direct = direct
        # Read once: httpx2 builds a new list on each read.
        self._headers = http.headers.raw
        # A stream is read as it arrives, undecoded: ask for it uncompressed.
        self._stream_headers = [
            (name, value)
            for name, value in self._headers
            if name.lower() not in (b"accept", b"accept-encoding")
        ] + [(b"accept", b"text/event-stream"), (b"accept-encoding", b"identity")]
        self._limits = timeouts.to_httpx()
        self._limits_by_phases: dict[tuple[bool, ...], httpx2.Timeout] = {}
        # The phase limits as numbers, read per attempt by _limits_before (None: inf).
        self._phases: tuple[float, float, float, float] = (
            _INF if timeouts.connect is None else timeouts.connect,
            _INF if timeouts.read is None else timeouts.read,
            _INF if timeouts.write is None else timeouts.write,
            _INF if timeouts.pool is None else timeouts.pool,
        )
        self._shown: dict[str, str] = {}  # URL: as messages show it
        self.provider = provider
        self.rate = rate
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self.timeouts = timeouts
        self.max_response_bytes = max_response_bytes
        self.sent = 0
        self.succeeded = 0
        self.failed = 0
        self.retried = 0
        # The error the latest retry was decided after (the batch progress line shows it).
        self.last_retry_error: LLMError | None = None
        self.rate_limited = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        # What the replies cost (USD), and the replies with no known price.
        self.pricer = pricer if pricer is not None else Pricer(provider.name)
        self.cost = 0.0
        self.unpriced = 0

    def request(self, url: str, body: Mapping[str, Any], *, stream: bool = False) -> Request:
        """Encode ``body`` for ``url`` once, with its token estimate when rate-limited."""
        estimate = estimate_tokens(body) if self.rate is not None else 0
        shown = self._shown.get(url)
        if shown is None:
            shown = self._shown[url] = redact_url(url)
        request = Request(url, _json.dumps(body), estimate, stream=stream, shown_url=shown)
        model = body.get("model")
        if isinstance(model, str):
            request.model = model
        instruments = _instruments()
        if instruments is not None:  # OpenTelemetry is configured
            request.telemetry = instruments.call(request, body, provider=self.provider.name)
        return request

    def call(
        self,
        request: Request,
        read: Callable[[Exchange], Awaitable[T]],
        policy: RetryPolicy | None,
    ) -> Awaitable[T]:
        """Run attempts under ``policy``: each opens an exchange and ``read`` s it.

        Returns the call's coroutine (a plain function: one frame fewer held by every
        request in flight). See :meth:`attempt` for ``read``.

        Raises:
            LLMError: the last attempt's error (counted as a failed call), or
                :class:`RetryDeadlineExceeded`.

        Cancellation: the attempt in flight is abandoned (its connection closed, slot
        released, reservation refunded if nothing was sent); nothing is retried.
        """
        trace = request.telemetry
        if trace is not None:
            return trace.run(partial(trace.attempt, self.attempt, request, read), policy, self)
        attempt = partial(self.attempt, request, read)
        return call_with_retries(attempt, policy, call=request, stats=self)

    def count_retry(self, error: LLMError) -> None:
        """Count a retry decided after ``error``, and keep ``error`` as the latest."""
        self.retried += 1
        self.last_retry_error = error

    def count_failure(self, _error: LLMError) -> None:
        """Count a call that failed with ``_error``."""
        self.failed += 1

    async def attempt(self, request: Request, read: Callable[[Exchange], Awaitable[T]]) -> T:
        """Make one attempt: reserve, take a slot, send, check the status, then ``read``.

        ``read`` gets the open :class:`Exchange` of a success status and returns the
        call's result. It owns the exchange only if it keeps it past its return (a
        stream): otherwise reading the body to its end and :meth:`Exchange.finish` leave
        nothing open. If ``read`` raises, the exchange is closed.

        Raises:
            APIStatusError: the server answered with an error status (its body read).
            APIConnectionError: no response arrived (``APITimeoutError``: a timeout).
            LLMError: what ``read`` raises.

        Cancellation: nothing is held: the slot is released, the connection closed, and
        the reservation refunded if no response came.
        """
        # A cancelled call stops here, before it takes a slot or a pooled connection (the
        # waits below do not checkpoint when nothing has to wait).
        await _checkpoint_if_cancelled()
        rate = self.rate
        reservation: Reservation | None = None
        if rate is not None:
            try:
                reservation = rate.acquire_nowait(request.estimate)
            except trio.WouldBlock:
                request.waiting_for = "the rate limiter"
                reservation = await rate.acquire(request.estimate)
        limiter = self.limiter
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            request.waiting_for = "a concurrency slot"
            try:
                await limiter.acquire()
            except BaseException:
                if reservation is not None:
                    reservation.refund()  # never sent: it must not cost the others capacity
                raise
        request.waiting_for = "the response"
        # Timeouts.stream_idle bounds a stream's wait from its request to the start of the
        # reply (after that, the wait between events); not the waits for capacity above.
        idle = self.timeouts.stream_idle if request.stream else None
        with _NO_SCOPE if idle is None else trio.move_on_after(idle):
            try:
                self.sent += 1
                response = await self._send(request)
            except BaseException as exc:
                # No response: the server most likely never counted it.
                limiter.release()
                if reservation is not None:
                    reservation.refund()
                if not isinstance(exc, Exception):
                    raise
                # A failure before any I/O (a header h11 refuses, a closed transport) must
                # still be a schedule point, as every trio call is.
                await _cancel_shielded_checkpoint()
                if isinstance(exc, httpx2.HTTPError):
                    raise error_from_transport(exc, method="POST", url=request.shown_url) from exc
                raise
            exchange = Exchange(self, request, response, reservation)
            try:
                if response.status_code >= 400:
                    await self._raise_status_error(exchange)
                if rate is not None:
                    rate.update(self.provider.rate_limit_levels(response.headers))
                return await read(exchange)
            except BaseException:
                await exchange.aclose()
                raise
        raise APITimeoutError(
            f"no event from {request.label} within stream_idle={idle}s",
            method="POST",
            url=request.shown_url,
        )

    def _send(self, request: Request) -> Awaitable[HTTPResponse | HttpxResponse]:
        """Send ``request``: a coroutine returning the response once its head arrived.

        Transport errors become :class:`APIConnectionError` (mapped here, for sending, and
        in :class:`Exchange` for reading the body).
        """
        direct = self.direct
        if direct is None:
            return self._send_through_httpx(request)
        headers = self._stream_headers if request.stream else self._headers
        trace = request.telemetry
        if trace is not None:  # the attempt's span, to the server (traceparent)
            headers = headers + [(k.encode(), v.encode()) for k, v in trace.headers().items()]
        limits = self._limits
        if request.deadline_at != _INF:
            limits = self._limits_before(request.deadline_at)
        return direct.open_response("POST", request.url, headers, request.content, limits)

    def _limits_before(self, deadline_at: float) -> httpx2.Timeout:
        """The phase timeouts that can still fire before the call's deadline.

        A phase limit that would end at or after the trio time ``deadline_at`` (the
        call's own deadline scope, which is never moved later) is left out: the
        transport then makes no cancel scope for it, which saves CPU and memory on every
        request in flight. With the defaults (read 120 s, a 120 s deadline) that is the
        read timeout, the one every request waits under.
        """
        left = deadline_at - trio.current_time()
        connect, read, write, pool = self._phases  # (None as inf: never kept)
        key = (connect < left, read < left, write < left, pool < left)
        limits = self._limits_by_phases.get(key)
        if limits is None:
            phases = self.timeouts
            limits = httpx2.Timeout(
                connect=phases.connect if key[0] else None,
                read=phases.read if key[1] else None,
                write=phases.write if key[2] else None,
                pool=phases.pool if key[3] else None,
            )
            self._limits_by_phases[key] = limits
        return limits

    async def _send_through_httpx(self, request: Request) -> HttpxResponse:
        http = self._http
        extra = {"accept": "text/event-stream"} if request.stream else {}
        if request.telemetry is not None:
            extra.update(request.telemetry.headers())
        built = http.build_request("POST", request.url, content=request.content, headers=extra)
        return HttpxResponse(await http.send(built, stream=True))

    async def _raise_status_error(self, exchange: Exchange) -> None:
        """Read an error reply and raise its error, settled (see :meth:`status_error`)."""
        body = await exchange.read()
        raise self.status_error(exchange, exchange.status_code, body, exchange.reason_phrase)

    def status_error(
        self, exchange: Exchange, status: int, body: bytes, reason: str
    ) -> APIStatusError:
        """Return the error of an error reply (or error event), its effects applied.

        The reservation is refunded for a 429 (the server did not count it) and charged no
        tokens otherwise; then the rate-limit headers apply; a 429 is counted and its
        ``retry-after`` pauses every task of the client.
        """
        headers = exchange.headers
        error = error_from_response(
            status, headers, body, reason=reason, request_id=exchange.request_id
        )
        exchange.settle(refund=status == 429)
        rate = self.rate
        if rate is not None:
            # After the refund: the server's remaining count is the truth from here on,
            # and a refund on top of it would put this client ahead of the server.
            rate.update(self.provider.rate_limit_levels(headers))
        if status == 429:
            self.rate_limited += 1
            if rate is not None and error.retry_after:
                rate.pause(error.retry_after)  # every task of the client waits it out
        return error
