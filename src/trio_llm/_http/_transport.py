"""TrioTransport: the pools of every origin, the request entry, and httpx2's interface."""

from __future__ import annotations

import ssl
from typing import Final, final

import h11
import httpx2
import trio

from ._connection import (
    Connection,
    Origin,
    PhaseTimeouts,
    StaleConnection,
    connect,
    exchange,
    map_exceptions,
)
from ._head import request_keeps_alive
from ._pool import Pool
from ._response import HTTPResponse, ResponseStream

__all__ = ["TrioTransport"]

_DEFAULT_LIMITS: Final = httpx2.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0
)
_MAX_TEMPLATES: Final = 64  # (method, URL, headers, timeouts) whose request head is kept
_FRAMING: Final = (b"content-length", b"transfer-encoding")
# Methods sent with a Content-Length even when their body is empty, as httpx2 does.
_LENGTH_ALWAYS: Final = frozenset({"POST", "PUT", "PATCH", "QUERY"})
_HEAD_ERRORS: Final = map_exceptions(httpx2.LocalProtocolError, "cannot send this request")


def _request_head(method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> h11.Request:
    """Build (and so validate) a request head; h11's refusal is a LocalProtocolError."""
    with _HEAD_ERRORS:
        return h11.Request(method=method, target=target, headers=headers)


def _origin(url: httpx2.URL) -> Origin:
    return (url.raw_scheme, url.raw_host, url.port)


@final
class Template:
    """How :meth:`TrioTransport.open_response` sends an in-memory body for one
    (method, URL, headers, timeouts).

    Building an ``h11.Request`` (header validation included) costs more than all the
    rest of sending it, so it is done once per key: h11 validates this bodiless request
    (same method, target and headers, ``Content-Length: 0``; with h11 as the response
    parser, it is also what h11 is told of), and the bytes sent are ``prefix`` + the
    real ``Content-Length`` + the body. How the response is read
    depends only on the request's method and connection headers, which are the same
    (``keep_alive``: no ``Connection: close``). Headers that set the framing themselves
    (``Content-Length``, ``Transfer-Encoding``) are honoured instead: h11 then writes
    each request (and checks the body against them).
    """

    __slots__ = (
        "_always_length",
        "_framed",
        "head",
        "keep_alive",
        "origin",
        "prefix",
        "timeouts",
    )

    def __init__(
        self, method: str, url: str, headers: list[tuple[bytes, bytes]], timeouts: httpx2.Timeout
    ) -> None:
        self.timeouts = PhaseTimeouts(timeouts)
        parsed = httpx2.URL(url)
        self.origin = _origin(parsed)
        names = [name.lower() for name, _ in headers]
        lines = headers if b"host" in names else [(b"Host", parsed.netloc), *headers]
        target = parsed.raw_path
        # Validated here, by h11, once.
        bodiless = [line for line in lines if line[0].lower() not in _FRAMING]
        self.head = _request_head(method, target, [*bodiless, (b"Content-Length", b"0")])
        self.keep_alive = request_keeps_alive(lines)
        self._always_length = method in _LENGTH_ALWAYS
        self._framed: h11.Request | None = None
        if b"content-length" in names or b"transfer-encoding" in names:
            self._framed = _request_head(method, target, lines)
        # Host first, as h11 writes it (RFC 9110: a user agent SHOULD).
        lines = sorted(lines, key=lambda line: line[0].lower() != b"host")
        self.prefix = b"".join(
            [b"%s %s HTTP/1.1\r\n" % (self.head.method, target)]
            + [b"%s: %s\r\n" % (name, value) for name, value in lines]
        )

    def wire(self, content: bytes) -> bytes:
        """Return the whole request, with ``content`` as its body.

        Raises:
            httpx2.LocalProtocolError: ``content`` does not match the headers' framing.
        """
        if self._framed is None:
            if content or self._always_length:
                return b"%sContent-Length: %d\r\n\r\n%s" % (self.prefix, len(content), content)
            return self.prefix + b"\r\n"
        state = h11.Connection(h11.CLIENT)
        with _HEAD_ERRORS:
            data = state.send(self._framed) or b""
            if content:
                data += state.send(h11.Data(data=content)) or b""
            return data + (state.send(h11.EndOfMessage()) or b"")


def _streamed_request(
    method: str, url: str, headers: list[tuple[bytes, bytes]]
) -> tuple[Origin, h11.Request]:
    """Return the origin and head of a request whose body is a stream.

    ``Host`` is added if missing, and ``Transfer-Encoding: chunked`` if the headers set no
    framing.
    """
    parsed = httpx2.URL(url)
    names = {name.lower() for name, _ in headers}
    lines = headers if b"host" in names else [(b"Host", parsed.netloc), *headers]
    if names.isdisjoint(_FRAMING):
        lines = [*lines, (b"Transfer-Encoding", b"chunked")]
    return _origin(parsed), _request_head(method, parsed.raw_path, lines)


def _without_length(
    method: str, headers: list[tuple[bytes, bytes]], content: bytes
) -> list[tuple[bytes, bytes]]:
    """Drop the ``Content-Length`` httpx2 set for ``content``: the template adds it back."""
    if not content and method not in _LENGTH_ALWAYS:
        return headers  # none would be added back
    length = b"%d" % len(content)
    for index, (name, value) in enumerate(headers):
        if value == length and name.lower() == b"content-length":
            return headers[:index] + headers[index + 1 :]
    return headers


def _timeouts_of(request: httpx2.Request) -> httpx2.Timeout:
    """Read httpx2's ``timeout`` request extension (set from the client's ``Timeout``)."""
    get = (request.extensions.get("timeout") or {}).get
    return httpx2.Timeout(
        connect=get("connect"), read=get("read"), write=get("write"), pool=get("pool")
    )


@final
class TrioTransport(httpx2.AsyncBaseTransport):
    """An HTTP/1.1 transport for ``httpx2.AsyncClient`` built on trio sockets and llhttp.

    The default transport of :func:`trio_llm.open_client`. Its CPU cost per request stays
    flat as requests in flight grow (measured in ``docs/performance.md``), where httpx2's
    own pool grows linearly. Responses are parsed by httptools (llhttp, in C) where it is
    installed, by h11 otherwise (``TRIO_LLM_HTTP_PARSER=h11`` forces it). Choose
    ``httpx2.AsyncHTTPTransport`` instead for HTTP/2, Unix sockets, client certificates,
    connect retries or proxies (``open_client`` picks httpx2's own transport itself when a
    proxy from the environment applies).

    Each origin (scheme, host, port) has its own keep-alive pool. A connection the server
    closed while idle is dropped when next taken; a reused connection that ends before
    the response's first byte is replaced and the request sent once more (only if its
    body is in memory, which is the case for ``content=`` bodies). Per-phase timeouts:
    ``pool`` bounds the wait for a connection, ``connect`` the TCP and TLS set-up,
    ``write`` each write, ``read`` each read. A deadline for the whole request is the
    caller's cancel scope.

    Args:
        verify: certificate verification: ``True`` (the default) for the system's
            trust roots, chosen as httpx2 chooses them (``SSL_CERT_FILE`` and
            ``SSL_CERT_DIR`` when ``trust_env``); an ``ssl.SSLContext`` to use as given;
            ``False`` to check nothing (never do that outside tests).
        trust_env: whether ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` choose the trust roots.
        limits: ``max_connections`` bounds the connections to each origin (open and
            being opened; requests beyond it wait, up to the pool timeout),
            ``max_keepalive_connections`` the idle ones kept per origin, and
            ``keepalive_expiry`` how long one may stay idle before it is closed.
    """

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool = True,
        trust_env: bool = True,
        limits: httpx2.Limits = _DEFAULT_LIMITS,
    ) -> None:
        self._verify = verify
        self._trust_env = trust_env
        self._ssl_context = verify if isinstance(verify, ssl.SSLContext) else None
        self._limits = limits
        self._pools: dict[Origin, Pool] = {}
        self._templates: dict[tuple[object, ...], Template] = {}
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<trio_llm.TrioTransport max_connections={self._limits.max_connections} "
            f"origins={len(self._pools)}{' closed' if self._closed else ''}>"
        )

    def _context(self) -> ssl.SSLContext:
        # Built on first use: loading the trust roots takes milliseconds, and plain-HTTP
        # clients (local servers) never need them.
        if self._ssl_context is None:
            context = httpx2.create_ssl_context(verify=self._verify, trust_env=self._trust_env)
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    def _pool(self, origin: Origin) -> Pool:
        if self._closed:
            raise RuntimeError("cannot send a request: the transport is closed")
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = Pool(self._limits)
        return pool

    def _template(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        timeouts: httpx2.Timeout,
    ) -> Template:
        # Not inline in open_response: the key would then live as long as the request.
        key = (
            method,
            url,
            tuple(headers),
            timeouts.pool,
            timeouts.connect,
            timeouts.read,
            timeouts.write,
        )
        template = self._templates.get(key)
        if template is None:
            template = Template(method, url, headers, timeouts)
            if len(self._templates) >= _MAX_TEMPLATES:
                self._templates.clear()
            self._templates[key] = template
        return template

    async def open_response(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | httpx2.AsyncByteStream,
        timeouts: httpx2.Timeout,
    ) -> HTTPResponse:
        """Send the request, return once the response head has arrived (body unread).

        The one way requests are sent: :meth:`handle_async_request` and trio-llm's client
        both come here.

        Args:
            method: the request method (``"POST"``).
            url: the absolute URL.
            headers: the request's headers. For an in-memory ``body``, the transport adds
                ``Host`` if missing and ``Content-Length`` (not for an empty body with a
                method other than POST, PUT, PATCH or QUERY); if ``Content-Length`` or
                ``Transfer-Encoding`` is given, it is sent as given instead. For a
                streamed ``body``, ``Transfer-Encoding: chunked`` is added if neither is.
            body: the body in memory (resent once if a reused connection turns out to
                have been closed by the server), or a stream (never resent).
            timeouts: the per-phase limits (``pool``, ``connect``, ``write``, ``read``).

        Returns:
            The response, its body to be read with :meth:`HTTPResponse.read` or
            :meth:`HTTPResponse.receive_some`, and closed with :meth:`HTTPResponse.close`.

        Raises:
            httpx2.PoolTimeout: no connection was free within the pool timeout.
            httpx2.ConnectError: connecting failed (refused, DNS, TLS, certificate).
            httpx2.ConnectTimeout: connecting took longer than the connect timeout.
            httpx2.WriteError: sending failed.
            httpx2.WriteTimeout: a write took longer than the write timeout.
            httpx2.ReadError: the connection failed before the response head arrived.
            httpx2.ReadTimeout: a read took longer than the read timeout.
            httpx2.RemoteProtocolError: the server broke HTTP/1.1 or closed the connection
                without answering.
            httpx2.LocalProtocolError: the request cannot be sent as HTTP/1.1 (a bad header).
            httpx2.UnsupportedProtocol: the URL's scheme is neither http nor https.
            RuntimeError: the transport is closed.

        Cancellation: whatever the phase, the connection in use is closed (never
        returned to the pool half-used) and its pool slot freed; nothing is retried. A
        request cancelled while it waits for the pool takes nothing.
        """
        stream: httpx2.AsyncByteStream | None = None
        wire: bytes | None = None
        if isinstance(body, bytes):
            template = self._template(method, url, headers, timeouts)
            origin = template.origin
            phases = template.timeouts
            head = template.head
            keep_alive = template.keep_alive
            wire = template.wire(body)
        else:
            origin, head = _streamed_request(method, url, headers)
            keep_alive = request_keeps_alive(head.headers.raw_items())
            phases = PhaseTimeouts(timeouts)
            stream = body
        pool = self._pool(origin)
        conn, reused = await self._checkout(pool, origin, phases)
        try:
            try:
                response_head = await exchange(conn, reused, head, keep_alive, wire, stream, phases)
            except StaleConnection as stale:
                if wire is None:
                    raise stale.error from stale
                # The server closed the idle connection as we sent on it: its slot
                # carries a fresh connection, and the request is sent once more.
                conn.close()
                conn = await connect(origin, phases.connect, self._context)
                response_head = await exchange(conn, False, head, keep_alive, wire, None, phases)
        except BaseException:
            pool.discard(conn)  # (closing a closed connection again is harmless)
            raise
        return HTTPResponse(pool, conn, response_head, phases.read)

    async def _checkout(
        self, pool: Pool, origin: Origin, timeouts: PhaseTimeouts
    ) -> tuple[Connection, bool]:
        """Return an idle connection and ``True``, or a new one and ``False``.

        On any failure, cancellation included, the pool slot is freed.
        """
        conn = await pool.acquire(timeouts.pool)
        if pool.closed:
            pool.discard(conn)
            raise RuntimeError("cannot send a request: the transport is closed")
        if conn is not None:
            return conn, True
        try:
            return await connect(origin, timeouts.connect, self._context), False
        except BaseException:
            pool.discard(None)
            raise

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` and return the response once its head has arrived.

        Through :meth:`open_response`, with the request's ``timeout`` extension (which
        httpx2 sets from the client's ``Timeout``). The response's body is read through
        its stream; reading it to the end returns the connection to the pool, closing the
        response earlier closes the connection.

        Raises:
            The errors of :meth:`open_response`.

        Cancellation: as for :meth:`open_response`.
        """
        try:
            body: bytes | httpx2.AsyncByteStream = request.content
        except httpx2.RequestNotRead:
            # A streamed body: sent as it is produced, never replayed.
            if not isinstance(request.stream, httpx2.AsyncByteStream):
                raise TypeError("TrioTransport sends only async request streams") from None
            body = request.stream
        headers = request.headers.raw
        if isinstance(body, bytes):
            headers = _without_length(request.method, headers, body)
        response = await self.open_response(
            request.method, str(request.url), headers, body, _timeouts_of(request)
        )
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.raw_headers,
            stream=ResponseStream(response),
            extensions={
                "http_version": response.http_version,
                "reason_phrase": response.reason_phrase.encode("latin-1"),
            },
        )

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their response does.

        Requests sent after this fail with ``RuntimeError``. It never blocks and is
        complete when it returns; cancellation has no effect on it.
        """
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _statistics(self) -> dict[Origin, tuple[int, int, int]]:
        """Return each origin's ``(connections, idle, waiting)``, for tests."""
        return {origin: pool.statistics() for origin, pool in self._pools.items()}
