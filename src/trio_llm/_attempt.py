"""The request lifecycle: one HTTP attempt, as ``chat``, ``embed`` and ``stream`` share it.

One attempt, in order (:meth:`Requester.open_exchange`, then the caller reads)::

    endpoint                                 the router's choice (one endpoint: no choice)
    rate-limit reservation (estimate)        the endpoint's limiter; waits FIFO
    concurrency slot                         the client's, then the endpoint's (if it has
                                             one); held until the exchange closes
    send                                     trio-llm's transport directly, or httpx2
    transport errors -> LLMError             mapped here, at each place I/O happens
    status >= 400 -> APIStatusError          429: refund, then header feedback, then pause
    rate-limit header feedback               the provider turns headers into levels
    -- the open response goes to the caller: chat/embed read the body, a stream its events
    settle (finish / fail / close)           reconcile with usage, keep, or refund
    statistics                               counted here and nowhere else

The retry policy repeats whole attempts in one cancel scope, the call's deadline
(:func:`trio_llm._retry.call_with_retries`); failing over to another endpoint is a retry
decision, and each attempt's outcome is its endpoint's health (:mod:`trio_llm._routing`).
The response cache hooks in twice (:mod:`trio_llm._cache`): its lookup in
:meth:`Requester.call`, before the retry loop and the router (a hit is no attempt, at no
endpoint), and its store in :meth:`Exchange.finish`, which has the reply. Where later
features hook in: cost where :meth:`Exchange.finish` has the usage; a tracing span from
:meth:`Requester.attempt` to :meth:`Exchange.aclose`.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import httpx2
import trio

from . import _json
from ._config import RetryPolicy, Timeouts
from ._errors import (
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    LLMError,
    error_from_response,
    error_from_transport,
)
from ._http import BodyTooLarge, HTTPResponse
from ._ratelimit import Reservation
from ._request import Request
from ._retry import call_with_retries
from ._routing import UP, Route, Router, exhausted_reset
from ._sending import HttpxResponse, PhaseLimits, stream_decoder
from ._types import JSONObject, Usage
from .providers._base import Provider

if TYPE_CHECKING:
    from ._cache import CachedReply, CacheHook

__all__ = ["Exchange", "Request", "Requester"]

T = TypeVar("T")

logger = logging.getLogger("trio_llm")

_NO_SCOPE: Final = nullcontext()
_INF: Final = math.inf
# One attempt in this many (per endpoint) is timed for the endpoint's recent latency:
# reading the clock twice per request costs more than the statistic is worth.
_LATENCY_SAMPLE: Final = 4
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
        "route",
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
        self.route = route = request.route
        self.request_id = route.provider.request_id(response.headers)
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
    def provider(self) -> Provider:
        """The wire format of the endpoint that answered."""
        return self.route.provider

    @property
    def endpoint(self) -> str:
        """The name of the endpoint that answered."""
        return self.route.name

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

    def finish(self, usage: Usage, payload: JSONObject | None = None) -> None:
        """Count the call as succeeded with ``usage``; settle the reservation with it.

        A reply that reports no tokens settles at the estimate. ``payload``, the reply
        (a streamed one aggregated), is stored in the client's cache if the call uses it.
        """
        requester = self._requester
        if payload is not None and requester.cache is not None:
            requester.cache.store(self.request, self.request_id, payload, usage)
        requester.succeeded += 1
        self.route.succeeded += 1
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

    def fail(self) -> None:
        """Count the call as failed after its response began (a stream that broke)."""
        self._requester.failed += 1
        self.route.failed += 1

    def _release_slot(self) -> None:
        if self._slot:
            self._slot = False
            self._requester.limiter.release()
            self.route.release()

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


@final
class Requester:
    """The lifecycle of a client's requests: routing, limits, sending, settling, statistics.

    One per client, shared by all its tasks. The counters are the client's statistics;
    each endpoint's are on its :class:`~trio_llm._routing.Route`.
    """

    __slots__ = (
        "_clock",
        "_estimate",
        "_limits",
        "cache",
        "cache_hits",
        "completion_tokens",
        "failed",
        "last_retry_error",
        "limiter",
        "max_response_bytes",
        "prompt_tokens",
        "rate_limited",
        "retried",
        "router",
        "sent",
        "succeeded",
        "timeouts",
    )

    def __init__(
        self,
        *,
        router: Router,
        max_concurrency: int,
        timeouts: Timeouts,
        max_response_bytes: int | None = None,
    ) -> None:
        self.router = router
        # The run's clock, read directly: trio.current_time() costs twice as much.
        self._clock = trio.lowlevel.current_clock().current_time
        # Token estimates are needed only where a rate limiter counts tokens.
        self._estimate = any(route.rate is not None for route in router.routes)
        self._limits = PhaseLimits(timeouts, self._clock)
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
        self.cache: CacheHook | None = None  # the client's response cache, if it has one
        self.cache_hits = 0

    def request(
        self,
        kind: int,
        source: Any,
        model: str | None,
        params: Mapping[str, Any],
        *,
        cache: bool = False,
    ) -> Request:
        """Build one call's request (see :meth:`Request.for_call`).

        With ``cache`` (and a client cache), the request gets its cache key, so that
        :meth:`call` looks it up and :meth:`Exchange.finish` stores its reply.
        """
        hook = self.cache if cache else None
        return Request.for_call(self.router, kind, source, model, params, self._estimate, hook)

    def call(
        self,
        request: Request,
        read: Callable[[Exchange], Awaitable[T]],
        policy: RetryPolicy | None,
        replay: Callable[[CachedReply, Provider], T] | None = None,
    ) -> Awaitable[T]:
        """Run attempts under ``policy``: each opens an exchange and ``read`` s it.

        Returns the call's coroutine (a plain function: one frame fewer held by every
        request in flight). See :meth:`attempt` for ``read``. A request with a cache key
        is first looked up in the client's cache, and a hit is returned by ``replay``
        without any attempt (:meth:`trio_llm._cache.CacheHook.call`).

        Raises:
            LLMError: the last attempt's error (counted as a failed call), or
                :class:`RetryDeadlineExceeded`.

        Cancellation: the attempt in flight is abandoned (its connection closed, slot
        released, reservation refunded if nothing was sent); nothing is retried.
        """
        attempt = partial(self.attempt, request, read)
        if request.cache_key is None or replay is None or self.cache is None:
            return call_with_retries(attempt, policy, call=request, stats=self)
        send = partial(call_with_retries, attempt, policy, call=request, stats=self)
        return self.cache.call(self, request, send, replay)

    def count_retry(self, error: LLMError) -> None:
        """Count a retry decided after ``error``, and keep ``error`` as the latest."""
        self.retried += 1
        self.last_retry_error = error

    def count_failure(self, _error: LLMError) -> None:
        """Count a call that failed with ``_error``."""
        self.failed += 1

    def count_cache_hit(self) -> None:
        """Count a call answered from the client's cache (no attempt, no tokens)."""
        self.cache_hits += 1

    async def attempt(self, request: Request, read: Callable[[Exchange], Awaitable[T]]) -> T:
        """Make one attempt: pick the endpoint, reserve, take slots, send, then ``read``.

        ``read`` gets the open :class:`Exchange` of a success status and returns the
        call's result. It owns the exchange only if it keeps it past its return (a
        stream): otherwise reading the body to its end and :meth:`Exchange.finish` leave
        nothing open. If ``read`` raises, the exchange is closed. The outcome goes to
        the endpoint's health.

        Raises:
            APIStatusError: the server answered with an error status (its body read).
            APIConnectionError: no response arrived (``APITimeoutError``: a timeout).
            LLMError: what ``read`` raises.

        Cancellation: nothing is held: the slots are released, the connection closed,
        and the reservation refunded if no response came.
        """
        # A cancelled call stops here, before it takes a slot or a pooled connection (the
        # waits below do not checkpoint when nothing has to wait).
        await _checkpoint_if_cancelled()
        route = self.router.choose(request)  # counts the attempt in the route's load
        epoch = route.epoch
        try:
            reservation = await self._capacity(route, request)
        except BaseException:
            route.load -= 1
            route.abandoned(request)
            raise
        request.waiting_for = "the response"
        # Timeouts.stream_idle bounds a stream's wait from its request to the start of the
        # reply (after that, the wait between events); not the waits for capacity above.
        idle = self.timeouts.stream_idle if request.stream else None
        # The endpoint's latency is sampled: one attempt in _LATENCY_SAMPLE is timed.
        route.sent = sent = route.sent + 1
        started = self._clock() if sent % _LATENCY_SAMPLE == 1 else None
        try:
            with _NO_SCOPE if idle is None else trio.move_on_after(idle):
                try:
                    self.sent += 1
                    response = await self._send(route, request)
                except BaseException as exc:
                    # No response: the server most likely never counted it.
                    self.limiter.release()
                    route.release()
                    if reservation is not None:
                        reservation.refund()
                    if not isinstance(exc, Exception):
                        raise
                    # A failure before any I/O (a header h11 refuses, a closed transport)
                    # must still be a schedule point, as every trio call is.
                    await _cancel_shielded_checkpoint()
                    if isinstance(exc, httpx2.HTTPError):
                        raise error_from_transport(
                            exc, method="POST", url=request.shown_url
                        ) from exc
                    raise
                exchange = Exchange(self, request, response, reservation)
                try:
                    if response.status_code >= 400:
                        await self._raise_status_error(exchange)
                    rate = route.rate
                    if rate is not None:
                        rate.update(route.provider.rate_limit_levels(response.headers))
                    result = await read(exchange)
                    if started is not None:
                        route.answered(request, epoch, self._clock() - started)
                    elif route.failures or route.state is not UP:
                        route.answered(request, epoch, None)
                    return result
                except BaseException:
                    await exchange.aclose()
                    raise
            raise _no_first_event(request, idle)
        except LLMError as exc:
            route.failed_attempt(request, exc, epoch)
            raise
        except BaseException:
            route.abandoned(request)
            raise

    async def _capacity(self, route: Route, request: Request) -> Reservation | None:
        """Take the endpoint's rate-limit reservation, then the client's and its slots.

        Cancellation: nothing is held (a reservation taken is refunded).
        """
        rate = route.rate
        reservation: Reservation | None = None
        if rate is not None:
            try:
                reservation = rate.acquire_nowait(request.estimate)
            except trio.WouldBlock:
                request.waiting_for = "the rate limiter"
                route.waiting += 1
                try:
                    reservation = await rate.acquire(request.estimate)
                finally:
                    route.waiting -= 1
        limiter = self.limiter
        try:
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                await _wait_for_slot(limiter, route, request)
            slots = route.slots
            if slots is not None:
                try:
                    await _wait_for_slot(slots, route, request)
                except BaseException:
                    limiter.release()
                    raise
        except BaseException:
            if reservation is not None:
                reservation.refund()  # never sent: it must not cost the others capacity
            raise
        return reservation

    def _send(self, route: Route, request: Request) -> Awaitable[HTTPResponse | HttpxResponse]:
        """Send ``request`` to ``route``: a coroutine returning the response once its head arrived.

        Transport errors become :class:`APIConnectionError` (mapped here, for sending, and
        in :class:`Exchange` for reading the body).
        """
        direct = route.direct
        if direct is None:
            return self._send_through_httpx(route.http, request)
        headers = route.stream_headers if request.stream else route.headers
        limits = self._limits
        deadline_at = request.deadline_at
        timeouts = limits.default if deadline_at == _INF else limits.before(deadline_at)
        return direct.open_response("POST", request.url, headers, request.content, timeouts)

    @staticmethod
    async def _send_through_httpx(http: httpx2.AsyncClient, request: Request) -> HttpxResponse:
        extra = {"accept": "text/event-stream"} if request.stream else None
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
        tokens otherwise; then the rate-limit headers apply; a 429 is counted, its
        ``retry-after`` pauses every task sent to that endpoint, and its ``retry-after``
        (else an exhausted rate-limit header's reset) sends the others elsewhere meanwhile.
        """
        headers = exchange.headers
        error = error_from_response(
            status, headers, body, reason=reason, request_id=exchange.request_id
        )
        exchange.settle(refund=status == 429)
        route = exchange.route
        rate = route.rate
        levels = (
            route.provider.rate_limit_levels(headers) if rate is not None or status == 429 else None
        )
        if rate is not None:
            # After the refund: the server's remaining count is the truth from here on,
            # and a refund on top of it would put this client ahead of the server.
            rate.update(levels)
        if status == 429:
            self.rate_limited += 1
            route.rate_limited += 1
            if rate is not None and error.retry_after:
                rate.pause(error.retry_after)  # every task sent there waits it out
            wait = error.retry_after or exhausted_reset(levels)
            if wait:
                route.pause(wait)
        return error


def _no_first_event(request: Request, idle: float | None) -> APITimeoutError:
    """The error of a stream whose first event did not come within ``stream_idle``."""
    return APITimeoutError(
        f"no event from {request.label} within stream_idle={idle}s",
        method="POST",
        url=request.shown_url,
    )


async def _wait_for_slot(limiter: trio.CapacityLimiter, route: Route, request: Request) -> None:
    """Take a slot of ``limiter``, counted as waiting at ``route`` if it has to wait."""
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        request.waiting_for = "a concurrency slot"
        route.waiting += 1
        try:
            await limiter.acquire()
        finally:
            route.waiting -= 1
