"""The request of one call: its body encoded for an endpoint, and where it stands.

A :class:`Request` is made once per call (``Requester.request``) and sent by each of its
attempts (``Requester.attempt``); the router (:mod:`trio_llm._routing`) reads it to pick
each attempt's endpoint, and the retry loop (:mod:`trio_llm._retry`) to decide whether
to fail over.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, final

from . import _json
from ._errors import ConfigurationError, redact_url
from ._estimate import estimate_tokens
from ._routing import CHAT, STREAM, Route, Router
from ._telemetry import instruments as _instruments

if TYPE_CHECKING:
    from ._cache import CacheHook
    from ._telemetry import CallTrace

__all__ = ["Request", "sole_route"]

_INF: Final = math.inf


@final
class Request:
    """One call's request, encoded for the endpoint it goes to, and sent by each attempt.

    ``kind`` is :data:`~trio_llm._routing.CHAT`, ``STREAM`` or ``EMBEDDINGS``. The body
    is encoded once, for the endpoint the call most likely goes to, and again only for an
    attempt sent to an endpoint of another provider or model (from ``source``). ``avoid``
    lists the endpoints that failed the call. ``waiting_for`` says what the call is
    waiting for now, for the message of a deadline that passes before any response.
    ``cache_key`` is set when the client's cache is to be consulted and filled, for the
    body of the endpoint ``cache_for`` names (:meth:`trio_llm._cache.CacheHook.address`).
    ``model`` is the model the body sent names (what a reply is priced as when its own
    model has no price); ``telemetry`` is the call's trace, if OpenTelemetry is configured.
    ``method`` and ``headers`` (every header, when not the endpoint's usual set) are a
    call's of the provider's other APIs (:meth:`for_api`).
    """

    __slots__ = (
        "avoid",
        "body_key",
        "cache_for",
        "cache_key",
        "content",
        "deadline_at",
        "estimate",
        "headers",
        "kind",
        "method",
        "model",
        "route",
        "shown_url",
        "source",
        "stream",
        "telemetry",
        "url",
        "waiting_for",
    )

    def __init__(self, route: Route, kind: int, content: bytes, estimate: int) -> None:
        self.route = route
        self.kind = kind
        self.url = route.urls[kind] or ""
        self.shown_url = route.shown_urls[kind]  # the URL as messages show it: redacted
        self.body_key = route.body_key
        self.content = content
        self.estimate = estimate
        self.stream = kind == STREAM
        self.waiting_for = "the response"
        self.deadline_at = _INF  # the call's deadline, set by the retry loop
        # (prompt or texts, model, params): set when another endpoint may need another body.
        self.source: tuple[Any, str | None, Mapping[str, Any]] | None = None
        self.avoid: list[Route] | None = None
        self.cache_key: str | None = None
        self.cache_for: tuple[str, str | None] | None = None
        self.model = ""  # as the body names it (set by for_call and retarget)
        self.telemetry: CallTrace | None = None
        self.method = "POST"
        self.headers: list[tuple[bytes, bytes]] | None = None

    @property
    def label(self) -> str:
        """What the request is, for messages: ``POST <url>``."""
        what = f"{self.method} {self.shown_url}"
        return f"{what} (stream)" if self.stream else what

    @property
    def endpoint(self) -> str:
        """The name of the endpoint of the latest attempt."""
        return self.route.name

    def can_fail_over(self) -> bool:
        """Whether another endpoint, one that has not failed this call, can take it now."""
        return self.route.router.can_fail_over(self)

    @classmethod
    def for_call(
        cls,
        router: Router,
        kind: int,
        source: Any,
        model: str | None,
        params: Mapping[str, Any],
        estimate: bool,
        cache: CacheHook | None = None,
    ) -> Request:
        """Build one call's request, encoded once (with its token estimate if ``estimate``).

        With ``cache``, the request gets its cache key from the body built here; with
        OpenTelemetry configured (:mod:`trio_llm._telemetry`), its trace.

        Args:
            router: the client's endpoints.
            kind: :data:`~trio_llm._routing.CHAT`, ``STREAM`` or ``EMBEDDINGS``.
            source: the prompt or messages (the texts, for embeddings).
            model: the call's model (or the client's); an endpoint's own model wins.
            params: the other body fields.
            estimate: whether a rate limiter needs the request's token estimate.
            cache: the client's response cache, if this call uses it.

        Raises:
            ConfigurationError: no model, or no endpoint can make such a request.
        """
        route = router.firsts[kind]
        body = route.build(kind, source, model, params)
        request = cls(route, kind, _json.dumps(body), estimate_tokens(body) if estimate else 0)
        if not router.uniform:
            request.source = (source, model, params)
        request.model = _model_of(body)
        if cache is not None:
            cache.address(request, body)
        instruments = _instruments()
        if instruments is not None:
            request.telemetry = instruments.call(request, body, provider=route.provider.name)
        return request

    @classmethod
    def for_api(
        cls,
        router: Router,
        method: str,
        url: str,
        content: bytes = b"",
        *,
        content_type: str | None = None,
        download: bool = False,
    ) -> Request:
        """Build a request of the provider's other APIs (files, batches) to ``url``.

        No token estimate, no cache key (such calls never touch the response cache), and
        no other endpoint: the router's choice of a one-endpoint client is that endpoint.
        ``content_type`` replaces JSON's (a multipart upload); a ``download`` is read as
        it arrives, uncompressed, by a ``read`` that keeps the exchange (as a stream's is).

        Raises:
            ConfigurationError: the client has several endpoints (see :func:`sole_route`).
        """
        route = sole_route(router)
        request = cls(route, CHAT, content, 0)
        request.method = method
        request.url = url
        request.shown_url = redact_url(url)
        request.stream = download
        if content_type is not None or download:
            replaced = (b"content-type", b"accept", b"accept-encoding")
            headers = [line for line in route.headers if line[0].lower() not in replaced]
            headers.append((b"content-type", (content_type or "application/json").encode()))
            accept = b"*/*" if download else b"application/json"
            request.headers = [*headers, (b"accept", accept), (b"accept-encoding", b"identity")]
        return request

    def retarget(self, route: Route) -> None:
        """Address the request to ``route``, its body rebuilt if that endpoint needs another.

        Raises:
            ConfigurationError: the endpoint cannot take it (no model for it).
        """
        kind = self.kind
        if route.body_key != self.body_key:
            assert self.source is not None  # kept whenever the endpoints' bodies differ
            source, model, params = self.source
            body = route.build(kind, source, model, params)
            self.content = _json.dumps(body)
            self.model = _model_of(body)
            self.body_key = route.body_key
        self.route = route
        self.url = route.urls[kind] or ""
        self.shown_url = route.shown_urls[kind]


def sole_route(router: Router) -> Route:
    """Return the one endpoint of a client, for calls that must all go there.

    A provider's batch and the files it reads live at the server that made them, so
    the Batch and Files APIs are not balanced or failed over between endpoints.

    Raises:
        ConfigurationError: the client has several endpoints.
    """
    if len(router.routes) > 1:
        count = len(router.routes)
        raise ConfigurationError(
            f"the provider's Batch API needs a client of one endpoint, not {count}: a batch "
            "and its files stay at the server that made them (give base_url= or "
            "--base-url, not endpoints= or --endpoints)"
        )
    return router.primary


def _model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""
