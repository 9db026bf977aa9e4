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
endpoint, and costs nothing), and its store in :meth:`Exchange.finish`, which has the
reply. :meth:`Exchange.finish` also prices the reply (:mod:`trio_llm._cost`: by the
provider of the endpoint that answered and the model sent there). A traced call
(:mod:`trio_llm._telemetry`) has a span around its retry loop and one per attempt, from
:meth:`Requester.attempt` to its end (:meth:`Exchange.aclose`), told its endpoint when
it is sent (:meth:`Requester._send`). The open response is an :class:`Exchange`
(:mod:`trio_llm._exchange`), settled there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import httpx2
import trio

from ._config import RetryPolicy, Timeouts
from ._cost import Pricer, Prices
from ._errors import (
    APIStatusError,
    APITimeoutError,
    LLMError,
    error_from_response,
    error_from_transport,
)
from ._exchange import Exchange
from ._http import HTTPResponse
from ._ratelimit import Reservation
from ._request import Request
from ._retry import call_with_retries
from ._routing import UP, Route, Router, exhausted_reset
from ._sending import HttpxResponse, PhaseLimits
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
        "cost",
        "failed",
        "last_retry_error",
        "limiter",
        "max_response_bytes",
        "pricers",
        "prompt_tokens",
        "rate_limited",
        "retried",
        "router",
        "sent",
        "succeeded",
        "timeouts",
        "unpriced",
    )

    def __init__(
        self,
        *,
        router: Router,
        max_concurrency: int,
        timeouts: Timeouts,
        max_response_bytes: int | None = None,
        prices: Prices | None = None,
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
        # What the replies cost (USD), and the replies with no known price; each
        # endpoint's provider has its table (the client's ``prices`` override them all).
        self.pricers = {
            name: Pricer(name, prices)
            for name in dict.fromkeys(route.provider.name for route in router.routes)
        }
        self.cost = 0.0
        self.unpriced = 0

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
        trace = request.telemetry
        if trace is None:
            attempt = partial(self.attempt, request, read)
            if request.cache_key is None or replay is None or self.cache is None:
                return call_with_retries(attempt, policy, call=request, stats=self)
            send = partial(call_with_retries, attempt, policy, call=request, stats=self)
        else:  # traced: a span around the retry loop, one per attempt
            attempt = partial(trace.attempt, self.attempt, request, read)
            if request.cache_key is None or replay is None or self.cache is None:
                return trace.run(attempt, policy, self)
            send = partial(trace.run, attempt, policy, self)
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
                            exc, method=request.method, url=request.shown_url
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
        in :class:`Exchange` for reading the body). A traced attempt is told its endpoint
        here, and sends its span's ``traceparent``.
        """
        direct = route.direct
        trace = request.telemetry
        extra = None if trace is None else trace.sending(route)
        if direct is None:
            return self._send_through_httpx(route.http, request, extra)
        headers = request.headers or (route.stream_headers if request.stream else route.headers)
        if extra:
            headers = headers + [(k.encode(), v.encode()) for k, v in extra.items()]
        limits = self._limits
        deadline_at = request.deadline_at
        timeouts = limits.default if deadline_at == _INF else limits.before(deadline_at)
        return direct.open_response(request.method, request.url, headers, request.content, timeouts)

    @staticmethod
    async def _send_through_httpx(
        http: httpx2.AsyncClient, request: Request, extra: dict[str, str] | None
    ) -> HttpxResponse:
        headers: list[tuple[bytes, bytes]] | dict[str, str] | None = request.headers
        if headers is None:  # (a call of the provider's other APIs has its own: see Request)
            headers = {**(extra or {}), "accept": "text/event-stream"} if request.stream else extra
        built = http.build_request(
            request.method, request.url, content=request.content, headers=headers
        )
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
        method=request.method,
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
