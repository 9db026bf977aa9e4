"""Endpoints: where a client sends its requests, and what it holds for each.

:class:`Endpoint` describes one API root: its URL, key, wire format, model, priority,
weight and limits. :func:`open_router` opens what a client keeps per endpoint (its own
connection pool, headers and rate limiter, in a :class:`~trio_llm._routing.Route`) and
the :class:`~trio_llm._routing.Router` that picks one for each attempt. A client opened
with ``base_url=`` has exactly one endpoint: the same code, with one choice.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, final
from urllib.parse import urlsplit

import attrs
import httpx2

from ._config import Timeouts
from ._errors import ConfigurationError, redact_url
from ._http import TrioTransport
from ._ratelimit import RateLimit, RateLimiter
from ._routing import Route, Router
from ._sending import direct_transport_for, environment_proxy_for
from ._version import __version__
from .providers._base import Provider
from .providers._registry import provider_named

__all__ = ["Endpoint", "default_headers", "is_loopback", "open_router", "resolve_base_url"]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (servers there often need no API key)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _checked_url(url: str, what: str = "base_url") -> str:
    """Return ``url`` without trailing slashes, if it is an http(s) URL with a host.

    Raises:
        ConfigurationError: it is not (the message names ``what``; credentials redacted).
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 address
        shown = redact_url(url)
        raise ConfigurationError(f"{what} {shown!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigurationError(
            f"{what} must be an http:// or https:// URL, not {redact_url(url)!r}"
        )
    return url.rstrip("/")


def resolve_base_url(base_url: str | None, provider: Provider) -> str:
    """Return ``base_url``, else the provider's variable (``$OPENAI_BASE_URL``) or default.

    Raises:
        ConfigurationError: the URL is not an http(s) URL with a host.
    """
    url = base_url or os.environ.get(provider.base_url_env) or provider.default_base_url
    return _checked_url(url)


def default_headers(
    adapter: Provider, url: str, api_key: str | None, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """Return the headers of every request: ours, the provider's key, the caller's.

    ``api_key`` ``None`` reads the provider's variable (``$OPENAI_API_KEY``).

    Raises:
        ConfigurationError: no API key for a server that is not on a loopback address.
    """
    key = api_key if api_key is not None else os.environ.get(adapter.api_key_env)
    if not key and not is_loopback(urlsplit(url).hostname or ""):
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


def _base_url(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"Endpoint base_url must be a string, not {value!r}")
    _checked_url(value, "Endpoint base_url")


def _strip_slashes(value: object) -> object:
    return value.rstrip("/") if isinstance(value, str) else value


def _provider(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"Endpoint provider must be a string, not {value!r}")
    provider_named(value)  # its error names the providers there are


def _text_or_none(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not (isinstance(value, str) and value):
        raise ConfigurationError(
            f"Endpoint {attribute.name} must be a non-empty string or None, not {value!r}"
        )


def _key(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ConfigurationError("Endpoint api_key must be a string or None")


def _priority(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigurationError(f"Endpoint priority must be an int, not {value!r}")


def _weight(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):  # type: ignore[arg-type,operator]
        raise ConfigurationError(f"Endpoint weight must be a number > 0, not {value!r}")


def _concurrency(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"Endpoint max_concurrency must be an int >= 1, not {value!r}")


def _rate_limit(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, RateLimit):
        raise ConfigurationError(f"Endpoint rate_limit must be a RateLimit or None, not {value!r}")


def _host_and_port(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _name(value: str | None) -> str:
    """The name given, or ``""`` for the default (set once the URL is known)."""
    if value is None:
        return ""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"Endpoint name must be a non-empty string or None, not {value!r}")
    return value


@final
@attrs.frozen
class Endpoint:
    """One API root a client may send to, and how it shares the traffic.

    Give several to ``open_client(endpoints=[...])``: replicas of one model, two regions,
    or a cheaper model first with a hosted one behind it (see the how-to page).

    Attributes:
        base_url: the API root, e.g. ``http://10.0.0.1:8000/v1`` (for Anthropic, the
            root without ``/v1``).
        api_key: the key (default: read from ``api_key_env``, else the provider's
            variable, ``$OPENAI_API_KEY`` or ``$ANTHROPIC_API_KEY``; a server on a
            loopback address may need none). Not shown in ``repr``.
        api_key_env: the environment variable holding the key, read when the client
            opens (which fails if it is unset).
        provider: the wire format, ``"openai"`` or ``"anthropic"``.
        model: the model name sent to this endpoint; when set it replaces the model a
            call (or the client) names, so a fallback can be another model or provider.
        name: the label in statistics, logs and ``reply.endpoint`` (default: host and
            port, e.g. ``10.0.0.1:8000``).
        priority: traffic goes to the lowest number that has an endpoint available; a
            higher one only while every endpoint before it is unavailable.
        weight: the endpoint's share within its priority: requests are balanced by
            load (in flight and waiting) per unit of weight.
        max_concurrency: requests in flight at once to this endpoint (default: the
            client's ``max_concurrency``, which bounds them all together).
        rate_limit: this endpoint's own :class:`RateLimit` (default: the client's
            ``rate_limit``); each endpoint has its own limiter, which also adopts the
            limits its server's headers report.
    """

    base_url: str = attrs.field(converter=_strip_slashes, validator=_base_url)
    api_key: str | None = attrs.field(default=None, kw_only=True, validator=_key, repr=False)
    api_key_env: str | None = attrs.field(default=None, kw_only=True, validator=_text_or_none)
    provider: str = attrs.field(default="openai", kw_only=True, validator=_provider)
    model: str | None = attrs.field(default=None, kw_only=True, validator=_text_or_none)
    name: str = attrs.field(default=None, kw_only=True, converter=_name)
    priority: int = attrs.field(default=0, kw_only=True, validator=_priority)
    weight: float = attrs.field(default=1.0, kw_only=True, validator=_weight)
    max_concurrency: int | None = attrs.field(default=None, kw_only=True, validator=_concurrency)
    rate_limit: RateLimit | None = attrs.field(default=None, kw_only=True, validator=_rate_limit)

    def __attrs_post_init__(self) -> None:
        if self.api_key is not None and self.api_key_env is not None:
            raise ConfigurationError(
                f"Endpoint {redact_url(self.base_url)!r}: give api_key or api_key_env, not both"
            )
        if not self.name:
            object.__setattr__(self, "name", _host_and_port(self.base_url))


def _api_key(endpoint: Endpoint) -> str | None:
    """The endpoint's key, or ``None`` to read the provider's variable.

    Raises:
        ConfigurationError: its ``api_key_env`` is unset or empty.
    """
    name = endpoint.api_key_env
    if name is None:
        return endpoint.api_key
    value = os.environ.get(name)
    if not value:
        state = "is not set" if value is None else "is empty"
        raise ConfigurationError(f"${name} {state} (api_key_env of endpoint {endpoint.name!r})")
    return value


@final
class _Borrowed(httpx2.AsyncBaseTransport):
    """A transport shared by several endpoints' clients; closed once, by its owner."""

    def __init__(self, transport: httpx2.AsyncBaseTransport) -> None:
        self._transport = transport

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        """Leave the transport open: the client that lent it closes it."""


def _check_endpoints(endpoints: Sequence[object]) -> None:
    """Refuse an empty list, a non-:class:`Endpoint` and two endpoints of one name."""
    if not endpoints:
        raise ConfigurationError("endpoints= needs at least one trio_llm.Endpoint")
    names: set[str] = set()
    for endpoint in endpoints:
        if not isinstance(endpoint, Endpoint):
            raise ConfigurationError(
                f"endpoints= takes trio_llm.Endpoint objects, not {endpoint!r}"
            )
        if endpoint.name in names:
            raise ConfigurationError(
                f"two endpoints are named {endpoint.name!r}: give each a distinct name="
            )
        names.add(endpoint.name)


@asynccontextmanager
async def open_router(
    endpoints: Sequence[Endpoint],
    *,
    max_concurrency: int,
    timeouts: Timeouts,
    rate_limit: RateLimit | None,
    transport: httpx2.AsyncBaseTransport | None,
    headers: Mapping[str, str] | None,
) -> AsyncIterator[Router]:
    """Open each endpoint's connections, limiter and headers; yield their router.

    Each endpoint gets its own pool (a :class:`TrioTransport` of up to its
    ``max_concurrency`` connections, or httpx2's own behind an environment proxy) unless
    ``transport`` is given, which they then share. ``rate_limit`` is the limit of those
    that set none (``None``: none for them).

    Raises:
        ConfigurationError: no endpoints, two of one name, or an endpoint without a
            usable API key.

    Leaving the block closes every connection of every endpoint.
    """
    _check_endpoints(endpoints)
    routes = []
    async with AsyncExitStack() as stack:
        shared = transport is not None and len(endpoints) > 1
        if shared:
            assert transport is not None
            stack.push_async_callback(transport.aclose)
        for endpoint in endpoints:
            adapter = provider_named(endpoint.provider)
            url = endpoint.base_url
            route_headers = default_headers(adapter, url, _api_key(endpoint), headers)
            size = endpoint.max_concurrency or max_concurrency
            limits = httpx2.Limits(max_connections=size, max_keepalive_connections=size)
            own = transport
            if own is None and not environment_proxy_for(url):  # (else httpx2's, via the proxy)
                # Flat cost per request however many are in flight (docs/performance.md).
                own = TrioTransport(limits=limits)
            http = httpx2.AsyncClient(
                headers=route_headers,
                timeout=timeouts.to_httpx(),
                limits=limits,
                transport=_Borrowed(own) if shared and own is not None else own,
            )
            await stack.enter_async_context(http)
            limit = endpoint.rate_limit if endpoint.rate_limit is not None else rate_limit
            routes.append(
                Route(
                    endpoint,
                    provider=adapter,
                    http=http,
                    direct=direct_transport_for(own, url),
                    rate=RateLimiter(limit) if limit is not None else None,
                )
            )
        yield Router(routes)
