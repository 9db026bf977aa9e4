"""Which endpoint takes an attempt: priority levels, load per weight, health, pauses.

A :class:`Route` is what a client holds for one :class:`~trio_llm.Endpoint`: its URLs,
headers, connection pool and rate limiter, its health and its counters. The
:class:`Router` picks one for every attempt (``Requester.attempt``, before the rate-limit
reservation), and learns from each attempt's outcome.

The choice, for one attempt:

1. The lowest priority level that has an *available* endpoint takes it. Available: up
   and not paused, or cooled down and ready for its probe. Endpoints that already failed
   this call are passed over while another is available (that is the failover).
2. Within the level, the endpoint with the least load per unit of weight, counting the
   attempt about to be added: ``(in flight + waiting + 1) / weight``; an endpoint whose
   own rate limiter or concurrency limit would make the attempt wait comes after those
   that can send at once; ties go to the endpoint chosen least recently (so a lone
   caller takes equal endpoints in turn, and one back from a cooldown is not owed the
   traffic it missed). The state is exact and local (no other balancer shares it), so
   the least-loaded choice needs no sampling; a slow endpoint holds its load longer and
   so gets less.
3. If no endpoint is available, the one that will be available soonest (one that has
   not failed this call first; the least priority number on a tie) takes it anyway,
   rather than the call waiting: a lone endpoint behaves as a one-endpoint client always
   did, and an endpoint that answers so comes back at once.

Health (the numbers are module constants, documented in docs/howto-endpoints.md):
``FAILURES_TO_COOL`` consecutive retryable failures (connection errors, timeouts, 5xx, a
429 that says nothing of when to come back) put an endpoint in cooldown for
``COOLDOWN_FIRST`` seconds; then one request is its probe. A probe that succeeds (or
gets any answer that no retry could fix, such as a 400) brings it back at once with its
full share; one that fails doubles the cooldown, up to ``COOLDOWN_MAX``. A 429 that says
when to come back (``retry-after``, or an exhausted rate-limit header's reset) pauses the
endpoint for that long instead, and its traffic goes elsewhere; a pause only ever
extends (LiteLLM issue #40130: a later, shorter pause must not cut it short).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, final

import attrs
import httpx2
import trio

from ._errors import APIStatusError, LLMError, redact_url
from ._http import TrioTransport
from ._ratelimit import RateLimiter, RateLimitLevels
from ._retry import is_retryable
from ._types import ChatResponse, EmbeddingResponse
from .providers._base import Provider

if TYPE_CHECKING:
    from ._endpoints import Endpoint

__all__ = [
    "CHAT",
    "COOLDOWN_FIRST",
    "COOLDOWN_MAX",
    "EMBEDDINGS",
    "FAILURES_TO_COOL",
    "STREAM",
    "UP",
    "EndpointStatistics",
    "Route",
    "Routed",
    "Router",
    "exhausted_reset",
    "set_chat_endpoint",
    "set_embeddings_endpoint",
]

#: What a request is, as an index into a route's URLs and body builders.
CHAT: Final = 0
STREAM: Final = 1
EMBEDDINGS: Final = 2

#: Consecutive retryable failures that put an endpoint in cooldown.
FAILURES_TO_COOL: Final = 3
#: The first cooldown, in seconds; each failed probe doubles it.
COOLDOWN_FIRST: Final = 2.0
#: The longest cooldown, in seconds.
COOLDOWN_MAX: Final = 60.0
# How much of the recent latency the newest attempt makes (an exponential average over
# about the last ten successful attempts).
_LATENCY_WEIGHT: Final = 0.2

UP: Final = "up"
COOLING: Final = "cooling"
PROBING: Final = "probing"


@final
@attrs.frozen(kw_only=True)
class EndpointStatistics:
    """A snapshot of one endpoint of a client (``client.statistics().endpoints``).

    Attributes:
        name: the endpoint's name (:attr:`Endpoint.name`).
        state: ``"up"``; ``"cooling"`` (after consecutive failures: no traffic until
            its cooldown ends, unless every endpoint is unavailable); ``"probing"`` (one
            request is testing whether it is back).
        in_flight: requests sent to it and not yet finished.
        waiting: requests assigned to it and waiting for its rate limiter or a
            concurrency slot.
        sent: HTTP attempts sent to it.
        succeeded: replies it gave in full.
        failed: attempts that failed there (an error status, no response, a stream
            cut off), whether or not the call then succeeded elsewhere.
        rate_limited: 429 responses it sent.
        latency: recent latency in seconds (the whole reply; a stream's first event):
            an exponential average over about the last ten timed successes, one attempt
            in four being timed; ``None`` before the first.
        paused_for: seconds left of a pause its 429 asked for (0 when none).
    """

    name: str
    state: str
    in_flight: int
    waiting: int
    sent: int
    succeeded: int
    failed: int
    rate_limited: int
    latency: float | None
    paused_for: float


# Set ``reply.endpoint`` on a reply just parsed, before anyone else sees it: the slots' own
# setters (the classes are frozen), as ``ChatChunk.from_json`` does (``set(reply, name)``).
set_chat_endpoint: Final[Any] = ChatResponse.__dict__["endpoint"].__set__
set_embeddings_endpoint: Final[Any] = EmbeddingResponse.__dict__["endpoint"].__set__


@final
class Route:
    """One endpoint of a client: where to send, through what, and how it is doing.

    Counters and health change only through the :class:`Router` and the request
    lifecycle (``trio_llm._attempt``), in the one trio thread.
    """

    __slots__ = (
        "body_key",
        "builders",
        "chosen",
        "cool_until",
        "cooldown",
        "direct",
        "endpoint",
        "epoch",
        "failed",
        "failures",
        "headers",
        "http",
        "latency",
        "load",
        "model",
        "name",
        "paused_until",
        "per_weight",
        "priority",
        "probe",
        "provider",
        "rate",
        "rate_limited",
        "router",
        "sent",
        "shown_urls",
        "slots",
        "state",
        "stream_headers",
        "succeeded",
        "urls",
        "waiting",
        "weight",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        provider: Provider,
        http: httpx2.AsyncClient,
        direct: TrioTransport | None,
        rate: RateLimiter | None,
    ) -> None:
        self.endpoint = endpoint
        self.name = endpoint.name
        self.priority = endpoint.priority
        self.weight = float(endpoint.weight)
        self.per_weight = 1.0 / self.weight
        self.provider = provider
        self.model = endpoint.model
        chat = endpoint.base_url + provider.chat_path
        # A provider without embeddings (Anthropic) has no URL for them: never chosen.
        embeddings = (
            endpoint.base_url + provider.embeddings_path if provider.embeddings_path else None
        )
        self.urls: tuple[str | None, ...] = (chat, chat, embeddings)
        self.shown_urls = tuple(redact_url(url) if url else "" for url in self.urls)
        self.builders = (provider.chat_body, provider.stream_body, provider.embeddings_body)
        # Routes with equal keys send the same body: it is encoded once for all of them.
        self.body_key = (provider.name, endpoint.model)
        self.http = http
        self.direct = direct
        # Read once: httpx2 builds a new list on each read.
        self.headers = http.headers.raw
        # A stream is read as it arrives, undecoded: ask for it uncompressed.
        self.stream_headers = [
            (name, value)
            for name, value in self.headers
            if name.lower() not in (b"accept", b"accept-encoding")
        ] + [(b"accept", b"text/event-stream"), (b"accept-encoding", b"identity")]
        self.rate = rate
        limit = endpoint.max_concurrency
        self.slots = trio.CapacityLimiter(limit) if limit is not None else None
        # Health: see the module's docstring.
        self.state = UP
        self.failures = 0  # consecutive retryable failures while up
        self.cooldown = COOLDOWN_FIRST  # the next cooldown's length
        self.cool_until = -math.inf
        self.epoch = 0  # cooldowns begun so far: tells an attempt sent during one
        self.probe: object = None  # the request probing it, while probing
        self.paused_until = -math.inf
        # Counters.
        self.chosen = 0  # the router's count of choices when it last chose this one
        self.load = 0  # attempts assigned and not finished: waiting or in flight
        self.waiting = 0
        self.sent = 0
        self.succeeded = 0
        self.failed = 0
        self.rate_limited = 0
        self.latency: float | None = None
        self.router: Router  # set by the Router that holds it

    def __repr__(self) -> str:
        return f"<Route {self.name!r} {self.state} load={self.load}>"

    def build(
        self, kind: int, source: Any, model: str | None, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the body of a ``kind`` request for this endpoint (its own model first).

        Raises:
            ConfigurationError: the provider cannot make such a request (Anthropic has
                no embeddings). (``Client`` has made sure there is a model.)
        """
        chosen = self.model or model
        assert chosen, "Client._resolve_model gives a model to endpoints that name none"
        return self.builders[kind](source, chosen, params)

    def ready(self, tokens: int) -> bool:
        """Whether an attempt could start now without waiting for this endpoint's limits."""
        slots = self.slots
        if slots is not None and not slots.available_tokens:
            return False
        rate = self.rate
        return rate is None or rate.ready(tokens)

    def release(self) -> None:
        """Count an attempt as finished here, and give back its slot of this endpoint."""
        self.load -= 1
        if self.slots is not None:
            self.slots.release()

    # Outcomes, from the request lifecycle.

    def answered(self, probe: object, epoch: int, latency: float | None) -> None:
        """Record an attempt that got an answer (``latency`` given for a success).

        An endpoint in cooldown comes back with its full share if the attempt was sent
        during this cooldown (its probe, or any attempt when all were unavailable).
        """
        self.failures = 0
        if latency is not None:
            recent = self.latency
            if recent is not None:
                latency = recent + _LATENCY_WEIGHT * (latency - recent)
            self.latency = latency
        if self.state is not UP and epoch == self.epoch:
            self.state = UP
            self.cooldown = COOLDOWN_FIRST
            self.probe = None
        elif self.probe is probe:
            self.probe = None

    def broke(self, probe: object, epoch: int, now: float) -> None:
        """Record an attempt that failed in a way another attempt may not (retryable)."""
        if self.state is UP:
            self.failures += 1
            if self.failures >= FAILURES_TO_COOL:
                self._cool(now)
        elif self.probe is probe and epoch == self.epoch:
            self.cooldown = min(self.cooldown * 2.0, COOLDOWN_MAX)
            self._cool(now)
        # Else sent before the cooldown began, or alongside the probe: that changes nothing.

    def failed_attempt(self, request: Routed, error: LLMError, epoch: int) -> None:
        """Record an attempt of ``request`` that failed here with ``error``.

        A retryable failure is the endpoint's (unless a 429 that paused it: no fault)
        and keeps the call's next attempts away from it while others can take them; any
        other error means the endpoint answered.
        """
        self.failed += 1
        if not is_retryable(error):
            self.answered(request, epoch, None)  # no other attempt would help
            return
        now = trio.current_time()
        rate_limited = isinstance(error, APIStatusError) and error.status_code == 429
        if not (rate_limited and self.paused_until > now):
            self.broke(request, epoch, now)
        avoid = request.avoid
        if avoid is None:
            request.avoid = [self]
        elif self not in avoid:
            avoid.append(self)

    def abandoned(self, probe: object) -> None:
        """Record an attempt cancelled before its outcome: a probe is due again at once."""
        if self.probe is probe:
            self.probe = None
            if self.state is PROBING:
                self.state = COOLING

    def _cool(self, now: float) -> None:
        self.state = COOLING
        self.cool_until = now + self.cooldown
        self.epoch += 1
        self.failures = 0
        self.probe = None

    def pause(self, seconds: float) -> None:
        """Send nothing here for ``seconds`` while another endpoint can take it."""
        until = trio.current_time() + seconds
        if until > self.paused_until:
            self.paused_until = until

    def usable(self, now: float) -> bool:
        """Whether the endpoint may take an attempt now (up and not paused, or a probe)."""
        if self.state is UP:
            return self.paused_until <= now
        return self.state is COOLING and now >= self.cool_until

    def available_at(self, now: float) -> float:
        """When the endpoint will be usable (``now`` or earlier if it is, or probing)."""
        cooling = self.cool_until if self.state is COOLING else -math.inf
        return max(self.paused_until, cooling, now)

    def statistics(self) -> EndpointStatistics:
        """Return a snapshot of this endpoint."""
        return EndpointStatistics(
            name=self.name,
            state=self.state,
            in_flight=self.load - self.waiting,
            waiting=self.waiting,
            sent=self.sent,
            succeeded=self.succeeded,
            failed=self.failed,
            rate_limited=self.rate_limited,
            latency=self.latency,
            paused_for=max(0.0, self.paused_until - trio.current_time()),
        )


def exhausted_reset(levels: RateLimitLevels | None) -> float | None:
    """The longest reset of a rate-limit level a response reports as exhausted."""
    if levels is None:
        return None
    resets = [
        level.reset_seconds
        for level in (levels.requests, levels.tokens)
        if level.remaining is not None and level.remaining < 1 and level.reset_seconds
    ]
    return max(resets) if resets else None


class Routed(Protocol):
    """What the router reads of a request (``trio_llm._attempt.Request``)."""

    #: CHAT, STREAM or EMBEDDINGS.
    kind: int
    #: The request's estimated tokens (0 when no endpoint is rate-limited).
    estimate: int
    #: The routes that failed the call so far (``None``: none).
    avoid: list[Route] | None
    #: The route the request is addressed to.
    route: Route

    def retarget(self, route: Route) -> None:
        """Address the request to ``route`` (its URL, and its body if it needs another)."""
        ...


@final
class Router:
    """The endpoints of a client in priority levels, and the choice of one per attempt.

    Attributes:
        routes: every endpoint, in the order given.
        primary: the first endpoint of the lowest priority (the client's ``base_url``).
        uniform: every endpoint takes the same request body (one provider and model).
        needs_model: some endpoint names no model of its own.
    """

    __slots__ = (
        "_choices",
        "_levels",
        "_single",
        "firsts",
        "needs_model",
        "primary",
        "routes",
        "uniform",
    )

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        for route in routes:
            route.router = self
        priorities = sorted({route.priority for route in routes})
        levels = [tuple(r for r in routes if r.priority == p) for p in priorities]
        self.primary = levels[0][0]
        # Per kind of request, the levels of the routes that can make it.
        self._levels = tuple(
            tuple(
                level
                for level in (tuple(r for r in all_ if r.urls[kind] is not None) for all_ in levels)
                if level
            )
            for kind in (CHAT, STREAM, EMBEDDINGS)
        )
        # One endpoint: nothing to choose, whatever its state.
        self._single = self.routes[0] if len(self.routes) == 1 else None
        self.uniform = len({route.body_key for route in routes}) == 1
        self.needs_model = any(route.model is None for route in routes)
        self._choices = 0
        #: Per kind, the route a request is most likely sent to first (its body is built
        #: for it): the first of the lowest level that can make it.
        self.firsts = tuple(levels[0][0] if levels else self.primary for levels in self._levels)

    def choose(self, request: Routed) -> Route:
        """Pick the route of ``request``'s next attempt, address it there, count it there.

        A cooled-down route picked becomes ``probing``, with ``request`` as its probe.

        Raises:
            Exception: what the endpoint's provider raises building its body (an
                argument it refuses); the route is left as it was.
        """
        route = self._single
        if route is None:
            now = trio.current_time()
            levels = self._levels[request.kind]
            avoid = request.avoid
            route = self._available(levels, avoid, request, now)
            if route is None and avoid:
                route = self._available(levels, None, request, now)
            if route is None:
                route = self._soonest(levels, avoid, now)
            self._choices += 1
            route.chosen = self._choices
        if route is not request.route:
            try:
                request.retarget(route)
            except BaseException:
                route.abandoned(request)  # a probe it was to be is due again
                raise
        route.load += 1
        return route

    def _available(
        self,
        levels: tuple[tuple[Route, ...], ...],
        avoid: list[Route] | None,
        request: Routed,
        now: float,
    ) -> Route | None:
        """The least loaded available route of the first level that has one (or a probe)."""
        for level in levels:
            best = self._least_loaded(level, avoid, request, now, None)
            if best is not None:
                if best.probe is request or len(level) == 1 or best.ready(request.estimate):
                    return best
                # Its own limits would make the attempt wait: the least loaded of those
                # that would not, if any (checked only now: a limiter's check costs).
                return self._least_loaded(level, avoid, request, now, request.estimate) or best
        return None

    @staticmethod
    def _least_loaded(
        level: tuple[Route, ...],
        avoid: list[Route] | None,
        request: Routed,
        now: float,
        ready_for: int | None,
    ) -> Route | None:
        """The usable route of ``level`` with the least load per weight (a due probe first).

        With ``ready_for`` (a token estimate), only routes whose limits let it start now.
        """
        best: Route | None = None
        best_load = math.inf
        best_chosen = 0
        for route in level:
            if avoid is not None and route in avoid:
                continue
            if route.state is not UP:
                if route.state is COOLING and now >= route.cool_until:
                    route.state = PROBING
                    route.probe = request
                    return route
                continue
            if route.paused_until > now:
                continue
            if ready_for is not None and not route.ready(ready_for):
                continue
            load = (route.load + 1) * route.per_weight
            if load < best_load or (load == best_load and route.chosen < best_chosen):
                best, best_load, best_chosen = route, load, route.chosen
        return best

    def _soonest(
        self, levels: tuple[tuple[Route, ...], ...], avoid: list[Route] | None, now: float
    ) -> Route:
        """The route that will be usable first, as every one is unavailable now.

        One that has not failed this call first; then the soonest, by priority and load.
        """
        candidates = [route for level in levels for route in level]
        if not candidates:  # pragma: no cover - Requester.request refuses such a call first
            return self.primary
        tried = avoid or ()
        return min(
            candidates,
            key=lambda r: (r in tried, r.available_at(now), r.priority, r.load / r.weight),
        )

    def can_fail_over(self, request: Routed) -> bool:
        """Whether an endpoint that has not failed ``request`` can take it at once."""
        if self._single is not None:
            return False
        now = trio.current_time()
        avoid = request.avoid or ()
        return any(
            route.usable(now) and route not in avoid
            for level in self._levels[request.kind]
            for route in level
        )

    def statistics(self) -> tuple[EndpointStatistics, ...]:
        """Return one snapshot per endpoint, in the order given."""
        return tuple(route.statistics() for route in self.routes)
