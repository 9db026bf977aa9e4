"""How the lifecycle reaches the network: which transport, through what, decoded how.

- :func:`environment_proxy_for` and :func:`direct_transport_for`: whether a client uses
  trio-llm's own transport, and whether its requests may skip httpx2's client layer.
- :class:`HttpxResponse`: an ``httpx2.Response`` seen as trio-llm's own
  :class:`~trio_llm._http.HTTPResponse`, for clients on any other transport.
- :func:`stream_decoder`: a decompressor for a stream a server compressed anyway.
- :class:`PhaseLimits`: the phase timeouts a request is sent under, before a deadline.
"""

from __future__ import annotations

import math
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from typing import Final, Protocol, final
from urllib.parse import urlsplit

import httpx2
import trio

from ._config import Timeouts
from ._errors import APIResponseError
from ._http import BodyTooLarge, TrioTransport

__all__ = [
    "Decompressor",
    "HttpxResponse",
    "PhaseLimits",
    "direct_transport_for",
    "environment_proxy_for",
    "stream_decoder",
]

# A shielded close of an httpx2 response must not hang on a dead peer.
_CLOSE_GRACE: Final = 5.0


def environment_proxy_for(base_url: str) -> bool:
    """Whether a proxy from the environment applies to ``base_url``.

    ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` (and the system's settings where the
    standard library reads them), unless ``NO_PROXY`` names the host. A client whose URL
    is proxied uses httpx2's own transport, which goes through the proxy.
    """
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


def direct_transport_for(
    transport: httpx2.AsyncBaseTransport | None, base_url: str
) -> TrioTransport | None:
    """Return ``transport`` if requests to ``base_url`` may skip httpx2's client layer.

    That is, when it is trio-llm's own transport and the URL holds no credentials (which
    httpx2's client layer sends as basic auth). httpx2's client layer costs as much CPU as
    the rest of a request (docs/performance.md), and adds nothing else to a plain POST:
    the client sets no auth, hooks, cookies or redirects, and httpx2 applies no
    environment proxy to a transport given to it.
    """
    if type(transport) is not TrioTransport:
        return None
    if urlsplit(base_url).username is not None:
        return None
    return transport


@final
class HttpxResponse:
    """An ``httpx2.Response`` seen through the interface of :class:`HTTPResponse`.

    For clients whose transport is not trio-llm's own (``MockTransport``, httpx2's own for
    HTTP/2 or proxies): every request then goes through httpx2's client layer.
    """

    __slots__ = ("_parts", "_response", "headers", "reason_phrase", "status_code")

    def __init__(self, response: httpx2.Response) -> None:
        self._response = response
        self._parts = response.aiter_bytes()
        self.status_code = response.status_code
        self.reason_phrase = response.reason_phrase
        self.headers: Mapping[str, str] = response.headers

    async def read(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            return await self._response.aread()
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise BodyTooLarge(max_bytes)
        parts = []
        size = 0
        async for part in self._parts:
            size += len(part)
            if size > max_bytes:
                raise BodyTooLarge(max_bytes)
            parts.append(part)
        return b"".join(parts)

    async def receive_some(self) -> bytes:
        try:
            return await self._parts.__anext__()
        except StopAsyncIteration:
            return b""

    async def aclose(self) -> None:
        # Shielded: this runs on the way out of cancelled scopes too, and a half-read
        # connection must be closed rather than left to the garbage collector.
        with trio.move_on_after(_CLOSE_GRACE, shield=True):
            await self._parts.aclose()
            await self._response.aclose()


class Decompressor(Protocol):
    """What a ``zlib`` decompressor offers (``zlib.decompressobj()``)."""

    def decompress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


def stream_decoder(encoding: str | None) -> Decompressor | None:
    """Return a ``zlib`` decompressor for a streamed body's ``content-encoding`` (or None).

    Raises:
        APIResponseError: an encoding other than gzip, deflate or identity.
    """
    if encoding is None or encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise APIResponseError(
        f"the event stream is encoded as {encoding!r}, which trio-llm does not decode",
        status_code=200,
        request_id=None,
    )


@final
class PhaseLimits:
    """The phase timeouts of a client's requests, and those a call's deadline leaves.

    ``default`` holds every phase limit of the client's :class:`~trio_llm.Timeouts`.
    """

    __slots__ = ("_by_phases", "_clock", "_phases", "_timeouts", "default")

    def __init__(self, timeouts: Timeouts, clock: Callable[[], float]) -> None:
        self._timeouts = timeouts
        self._clock = clock  # the run's clock (trio time)
        self.default = timeouts.to_httpx()
        self._by_phases: dict[tuple[bool, ...], httpx2.Timeout] = {}
        # The phase limits as numbers, read per attempt by before() (None: inf).
        inf = math.inf
        self._phases: tuple[float, float, float, float] = (
            inf if timeouts.connect is None else timeouts.connect,
            inf if timeouts.read is None else timeouts.read,
            inf if timeouts.write is None else timeouts.write,
            inf if timeouts.pool is None else timeouts.pool,
        )

    def before(self, deadline_at: float) -> httpx2.Timeout:
        """The phase timeouts that can still fire before the call's deadline.

        A phase limit that would end at or after the trio time ``deadline_at`` (the
        call's own deadline scope, which is never moved later) is left out: the
        transport then makes no cancel scope for it, which saves CPU and memory on every
        request in flight. With the defaults (read 120 s, a 120 s deadline) that is the
        read timeout, the one every request waits under.
        """
        left = deadline_at - self._clock()
        connect, read, write, pool = self._phases  # (None as inf: never kept)
        key = (connect < left, read < left, write < left, pool < left)
        limits = self._by_phases.get(key)
        if limits is None:
            phases = self._timeouts
            limits = httpx2.Timeout(
                connect=phases.connect if key[0] else None,
                read=phases.read if key[1] else None,
                write=phases.write if key[2] else None,
                pool=phases.pool if key[3] else None,
            )
            self._by_phases[key] = limits
        return limits
