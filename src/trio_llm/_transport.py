"""trio-llm's own HTTP/1.1 transport for httpx2: trio sockets, h11, an O(1) keep-alive pool.

Why not httpx2's default transport: its pool rescans every connection each time it assigns
one, so its CPU cost per request grows with the requests in flight (0.7 ms at 64, 4.3 ms at
1,000 on loopback). Here each origin has a pool whose idle connections sit on a LIFO stack:
taking one and giving it back are O(1), whatever the number of connections.

The shape of one exchange::

    handle_async_request (httpx2's interface) or post_direct (trio-llm's hot path)
      ├─ pool: pop an idle connection (closed by the server? expired? drop it, pop again),
      │        or reserve a slot for a new one, or wait (FIFO) for one to be handed over
      ├─ connect (TCP, TLS) if needed                              ConnectError/ConnectTimeout
      ├─ send the request head and body (h11)                          WriteError/WriteTimeout
      ├─ read up to the response head (h11)          ReadError/ReadTimeout/RemoteProtocolError
      │    └─ a reused connection that ends before one byte arrives is stale: close it and
      │       send once more on a fresh connection (only if the body can be sent again)
      └─ read the body (_Body: content-length, chunked, until close): to the end, and the
         connection goes back to the pool; a body not read to its end closes it

No task is started per connection, and no background task at all: everything happens in
the task that makes the request. Content decoding (gzip, deflate, ...) is left to httpx2,
which does it from the ``content-encoding`` header. Measurements: ``docs/performance.md``.
"""

from __future__ import annotations

import math
import re
import select
import socket as _stdlib_socket
import ssl
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import partial
from typing import Any, Final, final

import h11
import httpx2
import trio

__all__ = ["DirectResponse", "TrioTransport", "direct_transport"]

_RECEIVE_SIZE: Final = 64 * 1024
_MAX_HEAD: Final = 100 * 1024  # the largest response head accepted, as httpcore does
_DEFAULT_LIMITS: Final = httpx2.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0
)

_MAX_LINE: Final = 4096  # the longest chunk-size line accepted
_CHUNK_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")

# h11 values, looked up once: the hot loops compare by identity.
_RESPONSE: Final = h11.Response
_NEED_DATA: Final = h11.NEED_DATA
_MAX_TEMPLATES: Final = 64  # (URL, headers, timeouts) whose request head post_direct keeps
_END_EVENT: Final = h11.EndOfMessage()

_Origin = tuple[bytes, bytes, int | None]  # scheme, host, port


class _StaleConnection(Exception):
    """A reused connection ended before the first byte of the response: resend once."""

    def __init__(self, error: httpx2.TransportError) -> None:
        super().__init__(str(error))
        self.error = error


@final
class _Body:
    """The body of one response, decoded from its framing as the bytes arrive.

    h11 reads the response head; from there on this takes over, because h11 spends
    about 6 us on each chunk of a chunked body (its state machine runs for every event),
    and a streamed reply is hundreds of small chunks: here a chunk costs about 1 us.
    The framing follows RFC 9112 section 6.3, as h11 would: no body for HEAD, 1xx, 204
    and 304; chunked when ``Transfer-Encoding`` says so (h11 has checked it is the only
    coding); ``Content-Length`` bytes; otherwise everything until the server closes.
    """

    __slots__ = ("_buffer", "_framing", "_left", "_trailer", "done", "reusable")

    _LENGTH = 0
    _CHUNKED = 1
    _UNTIL_CLOSE = 2

    def __init__(self, event: h11.Response, method: bytes, state: h11.Connection) -> None:
        """Start decoding the body of ``event``, the answer to a ``method`` request.

        ``state`` is the h11 connection that read the head; the bytes it holds past the
        head are the start of the body.
        """
        self._buffer = state.trailing_data[0]
        self._trailer = 0
        length: int | None = None
        chunked = False
        for name, value in event.headers.raw_items():
            name = name.lower()
            if name == b"transfer-encoding":
                chunked = True  # h11 accepts no other coding than chunked
            elif name == b"content-length":
                length = int(value)  # h11 has checked it
        if method == b"HEAD" or event.status_code in (204, 304):
            length, chunked = 0, False
        #: Whether the connection may carry another request once the body is done: h11
        #: has judged the request's and the response's Connection headers and versions.
        self.reusable = state.our_state is h11.DONE
        if chunked:
            self._framing = self._CHUNKED
            self._left = 0  # > 0: data left in this chunk; 0: a size line; -1: CRLF; -2: trailer
        elif length is not None:
            self._framing = self._LENGTH
            self._left = length
        else:
            self._framing = self._UNTIL_CLOSE
            self._left = 0
            self.reusable = False
        #: Whether the whole body has been decoded.
        self.done = self._framing == self._LENGTH and length == 0
        if self.done and self._buffer:
            self.reusable = False  # bytes after a body-less response: the server is confused

    def take(self) -> list[bytes]:
        """Decode what is buffered; return the body bytes found (maybe none)."""
        if self.done or not self._buffer:
            return []
        if self._framing == self._CHUNKED:
            return self._take_chunked()
        buffer = self._buffer
        self._buffer = b""
        if self._framing == self._UNTIL_CLOSE:
            return [buffer]
        left = self._left
        if len(buffer) > left:
            buffer = buffer[:left]
            self.reusable = False  # bytes past the response: never reuse the connection
        self._left = left - len(buffer)
        self.done = self._left == 0
        return [buffer]

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes read from the connection (``b""``: the server closed it); decode them.

        Raises:
            httpx2.RemoteProtocolError: the body was cut short, or its framing is broken.
        """
        if not data:
            if self._framing != self._UNTIL_CLOSE:
                raise httpx2.RemoteProtocolError(
                    "the server closed the connection before the end of the body"
                )
            self.done = True
            return []
        self._buffer = self._buffer + data if self._buffer else data
        return self.take()

    def _take_chunked(self) -> list[bytes]:
        buffer = self._buffer
        size = len(buffer)
        at = 0
        parts = []
        left = self._left
        while True:
            if left > 0:  # inside a chunk's data
                end = min(at + left, size)
                if end == at:
                    break
                parts.append(buffer[at:end])
                left -= end - at
                at = end
                if left:
                    break
                left = -1
            elif left == -1:  # the CRLF after a chunk's data
                if size - at < 2:
                    break
                if buffer[at : at + 2] != b"\r\n":
                    raise httpx2.RemoteProtocolError("chunk data not followed by CRLF")
                at += 2
                left = 0
            else:  # a chunk-size line (0), or a trailer line (-2)
                end = buffer.find(b"\r\n", at)
                if end < 0:
                    if size - at > _MAX_LINE:
                        raise httpx2.RemoteProtocolError("chunk-size or trailer line too long")
                    break
                line = buffer[at:end]
                at = end + 2
                if left == 0:
                    digits = line.split(b";", 1)[0].rstrip(b" \t")
                    if not _CHUNK_SIZE.fullmatch(digits):
                        raise httpx2.RemoteProtocolError(f"bad chunk-size line {line[:40]!r}")
                    left = int(digits, 16) or -2
                elif line:
                    self._trailer += len(line)
                    if self._trailer > _MAX_HEAD:
                        raise httpx2.RemoteProtocolError("trailer section too large")
                else:  # the empty line that ends the trailer section: the body is done
                    self.done = True
                    if at < size:
                        self.reusable = False  # bytes past the response
                    break
        self._left = left
        self._buffer = buffer[at:] if at < size else b""
        return parts


async def _send_on_socket(socket: trio.socket.SocketType, data: bytes) -> None:
    """Send all of ``data`` on a plain-TCP trio socket (``OSError`` on failure).

    Used instead of ``trio.SocketStream.send_all``, which wraps each call in context
    managers (error translation, conflict detection, a memoryview) that cost more than
    the system call; the errors are handled where the calls are made.

    Cancellation: part of ``data`` may have been sent; the caller closes the socket.
    """
    sent = await socket.send(data)
    if sent < len(data):
        view = memoryview(data)
        while sent < len(data):
            sent += await socket.send(view[sent:])


async def _send_on_raw_socket(sock: _stdlib_socket.socket, data: bytes) -> None:
    """:func:`_send_on_socket` on the standard-library socket under a trio socket.

    Does what trio's socket methods do (a checkpoint, the system call, a wait for the
    socket only when it would block) without their two layers of coroutines and context
    managers: less CPU per call, and fewer frames held by each request waiting.

    Cancellation: part of ``data`` may have been sent; the caller closes the socket.
    """
    await _checkpoint_if_cancelled()
    view: memoryview | None = None
    sent = 0
    while True:
        try:
            sent += sock.send(data if view is None else view[sent:])
        except BlockingIOError:
            await _wait_writable(sock)
            continue
        if sent >= len(data):
            break
        view = memoryview(data)
    await _cancel_shielded_checkpoint()


async def _receive_on_raw_socket(sock: _stdlib_socket.socket, max_bytes: int) -> bytes:
    """Receive up to ``max_bytes`` (``b""`` at the end) as trio's ``socket.recv`` does.

    A checkpoint, then the system call, waiting for the socket only if it would block
    (see :func:`_send_on_raw_socket` for why not trio's own).

    Cancellation: nothing was received.
    """
    await _checkpoint_if_cancelled()
    try:
        data = sock.recv(max_bytes)
    except BlockingIOError:
        pass
    else:
        await _cancel_shielded_checkpoint()
        return data
    while True:
        await _wait_readable(sock)
        try:
            return sock.recv(max_bytes)
        except BlockingIOError:
            pass


_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable


@final
class _Connection:
    """One HTTP/1.1 connection: its socket, its I/O, and the exchange under way.

    ``send_all`` and ``receive_some`` are the ``trio.SSLStream``'s for TLS and, for plain
    TCP, straight on the socket (``trio.SocketStream``'s context managers cost more than
    the system calls, and each layer is a frame held by every request in flight).
    ``h11`` is a fresh state machine for each exchange: it writes the request and reads
    the response head; ``body`` then decodes the body.
    """

    __slots__ = ("body", "h11", "idle_since", "receive_some", "send_all", "socket")

    def __init__(self, socket: trio.socket.SocketType, tls: trio.SSLStream[Any] | None) -> None:
        self.socket = socket
        self.send_all: Callable[[bytes], Awaitable[None]]
        self.receive_some: Callable[[int], Awaitable[bytes | bytearray]]
        # The standard-library socket under trio's, where it has the usual one.
        raw = getattr(socket, "_sock", None)
        if tls is None and isinstance(raw, _stdlib_socket.socket):
            self.send_all = partial(_send_on_raw_socket, raw)
            self.receive_some = partial(_receive_on_raw_socket, raw)
        elif tls is None:
            self.send_all = partial(_send_on_socket, socket)
            self.receive_some = socket.recv
        else:
            self.send_all = tls.send_all
            self.receive_some = tls.receive_some
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        self.body: _Body | None = None
        self.idle_since = 0.0

    def usable_after_idle(self) -> bool:
        """Whether an idle connection may carry a request: the server has not closed it.

        An idle HTTP/1.1 connection has nothing to say; if its socket is readable, the
        server closed it (EOF or a reset) or broke the protocol, so it is dropped.
        """
        try:
            readable, _, _ = select.select((self.socket,), (), (), 0)
        except (OSError, ValueError):  # closed under us: fileno() is -1
            return False
        return not readable

    def close(self) -> None:
        """Close at once (no TLS close_notify: HTTP/1.1 framing makes it unnecessary)."""
        self.socket.close()


@final
class _Pool:
    """The connections to one origin: a LIFO stack of idle ones and a FIFO of waiters.

    ``_slots`` counts connections that exist or are being opened; it never passes
    ``_max``. A slot or an idle connection given back while a task waits is handed to
    that task directly, so a waiter is never overtaken by a newcomer.
    """

    __slots__ = ("_expiry", "_handoff", "_idle", "_lot", "_max", "_max_idle", "_slots", "closed")

    def __init__(self, limits: httpx2.Limits) -> None:
        self._max = math.inf if limits.max_connections is None else limits.max_connections
        self._max_idle = (
            math.inf
            if limits.max_keepalive_connections is None
            else limits.max_keepalive_connections
        )
        self._expiry = math.inf if limits.keepalive_expiry is None else limits.keepalive_expiry
        self._idle: deque[_Connection] = deque()  # oldest on the left, newest on the right
        self._slots = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._handoff: dict[trio.lowlevel.Task, _Connection | None] = {}
        self.closed = False

    def acquire_nowait(self) -> _Connection | None:
        """Take the newest usable idle connection, else a slot for a new one (``None``).

        Raises:
            trio.WouldBlock: every slot is taken, or other tasks are already waiting.
        """
        idle = self._idle
        if idle:
            oldest_allowed = trio.current_time() - self._expiry
            while idle:
                conn = idle.pop()
                if conn.idle_since >= oldest_allowed and conn.usable_after_idle():
                    return conn
                conn.close()  # expired, or closed by the server while idle
                self._slots -= 1
        if self._slots < self._max and not self._lot:
            self._slots += 1
            return None
        raise trio.WouldBlock

    async def acquire(
        self, seconds: float | None, deadline_at: float = math.inf
    ) -> _Connection | None:
        """Wait for an idle connection or a free slot, at most ``seconds`` (the pool timeout)
        and no later than the trio time ``deadline_at``.

        Returns:
            An idle connection, or ``None``: a slot reserved for a new connection.

        Raises:
            PoolTimeout: none came in time.

        Cancellation: either a connection or slot is returned, or ``Cancelled`` is raised
        and nothing was taken.
        """
        try:
            return self.acquire_nowait()
        except trio.WouldBlock:
            pass
        task = trio.lowlevel.current_task()
        with trio.move_on_at(_deadline(seconds, deadline_at)):
            await self._lot.park()
        # Handed over by release()/discard(); once unparked, no Cancelled can intervene.
        try:
            return self._handoff.pop(task)
        except KeyError:
            raise httpx2.PoolTimeout(
                f"no connection free {_within('pool', seconds, deadline_at)}"
            ) from None

    def _hand_over(self, conn: _Connection | None) -> bool:
        """Give a connection or slot to the longest waiter; return whether there was one."""
        if not self._lot:
            return False
        (task,) = self._lot.unpark()
        self._handoff[task] = conn
        return True

    def release(self, conn: _Connection) -> None:
        """Take back a connection whose body was read to its end; keep it if reusable."""
        body = conn.body
        if self.closed or body is None or not body.reusable:
            self.discard(conn)  # Connection: close, HTTP/1.0, or the transport is closed
            return
        conn.body = None
        conn.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        if self._hand_over(conn):
            return
        idle = self._idle
        if len(idle) >= self._max_idle:
            self.discard(conn)
            return
        now = trio.current_time()
        conn.idle_since = now
        idle.append(conn)
        # Connections at the bottom of the stack may never be reached again: close the
        # expired ones from there, so the server is not left holding them.
        oldest_allowed = now - self._expiry
        while idle[0].idle_since < oldest_allowed:
            idle.popleft().close()
            self._slots -= 1

    def discard(self, conn: _Connection | None) -> None:
        """Close ``conn`` (if any) and free its slot, for a waiter or for later."""
        if conn is not None:
            conn.close()
        if not self._hand_over(None):
            self._slots -= 1

    def close(self) -> None:
        """Close every idle connection; connections in use close when given back."""
        self.closed = True
        while self._idle:
            self._idle.pop().close()
            self._slots -= 1

    def statistics(self) -> tuple[int, int, int]:
        """Return ``(connections, idle connections, waiting tasks)``, for tests."""
        return self._slots, len(self._idle), len(self._lot)


def _transport_error(
    kind: type[httpx2.TransportError], message: str, exc: BaseException
) -> httpx2.TransportError:
    detail = f"{message}: {type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None:  # trio's BrokenResourceError wraps the OSError or SSLError
        detail += f" ({type(cause).__name__}: {cause})"
    return kind(detail)


async def _receive(
    conn: _Connection, seconds: float | None, deadline_at: float = math.inf
) -> bytes:
    """Read some bytes (``b""`` at EOF) within ``seconds`` and by the trio time
    ``deadline_at``, failing with httpx2's errors.

    Cancellation: nothing was read.
    """
    try:
        if seconds is None and deadline_at == math.inf:
            data = await conn.receive_some(_RECEIVE_SIZE)
        else:
            data = b""
            with trio.move_on_at(_deadline(seconds, deadline_at)) as scope:
                data = await conn.receive_some(_RECEIVE_SIZE)
            if scope.cancelled_caught:
                raise httpx2.ReadTimeout(f"no data {_within('read', seconds, deadline_at)}")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise _transport_error(httpx2.ReadError, "reading the response failed", exc) from exc
    return data if type(data) is bytes else bytes(data)  # trio may give a bytearray


@final
class _Timeouts:
    """The four per-phase limits of one request, in seconds (``None``: no limit)."""

    __slots__ = ("connect", "pool", "read", "write")

    def __init__(
        self, pool: float | None, connect: float | None, read: float | None, write: float | None
    ) -> None:
        self.pool = pool
        self.connect = connect
        self.read = read
        self.write = write

    @classmethod
    def from_extension(cls, timeouts: dict[str, float | None] | None) -> _Timeouts:
        """Read httpx2's ``timeout`` request extension."""
        get = (timeouts or {}).get
        return cls(get("pool"), get("connect"), get("read"), get("write"))


def _within(timeout: str, seconds: float | None, deadline_at: float) -> str:
    """How long a wait that just expired was allowed, for its error message."""
    if trio.current_time() >= deadline_at:
        return "before the call's deadline"
    return f"within the {timeout} timeout ({seconds} s)"


def _deadline(seconds: float | None, deadline_at: float) -> float:
    """The trio time a timeout of ``seconds`` from now ends, but no later than ``deadline_at``.

    Absolute, so that a wait cut short by the deadline ends exactly at it.
    """
    return deadline_at if seconds is None else min(trio.current_time() + seconds, deadline_at)


async def _next_body_part(
    pool: _Pool, conn: _Connection, seconds: float | None, deadline_at: float = math.inf
) -> tuple[bytes, bool]:
    """Return the next body bytes, and whether they end the body.

    Each read waits at most ``seconds``, and none ends after the trio time ``deadline_at``.

    Takes every byte already received, and reads only when there is none. At the end,
    the connection has gone back to the pool. Any failure, cancellation included,
    closes the connection instead.
    """
    body = conn.body
    assert body is not None
    try:
        parts = body.take()
        while not parts and not body.done:
            parts = body.feed(await _receive(conn, seconds, deadline_at))
    except BaseException:
        pool.discard(conn)
        raise
    if body.done:
        pool.release(conn)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), body.done


@final
class _ResponseStream(httpx2.AsyncByteStream):
    """A response body read from its connection; its end gives the connection back.

    Each step returns every body byte already received, so a small body is one step.
    """

    __slots__ = ("_conn", "_pool", "_read")

    def __init__(self, pool: _Pool, conn: _Connection, read: float | None) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read = read

    def __aiter__(self) -> _ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        """Return the next part of the body.

        Raises:
            StopAsyncIteration: the body is complete (the connection went back to the pool).
            httpx2.ReadError: the connection failed.
            httpx2.ReadTimeout: nothing arrived within the read timeout.
            httpx2.RemoteProtocolError: the body was cut short or malformed.

        Cancellation: the connection is closed at once (never returned half-read), and
        the stream ends.
        """
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        try:
            part, finished = await _next_body_part(self._pool, conn, self._read)
        except BaseException:
            self._conn = None  # closed by _next_body_part
            raise
        if finished:
            self._conn = None  # handed back to the pool
            if not part:
                raise StopAsyncIteration
        return part

    async def aclose(self) -> None:
        """Close the body: a body not read to its end closes its connection.

        Never blocks and never raises, so it is safe in ``finally`` blocks of cancelled
        scopes; it is not a checkpoint.
        """
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool.discard(conn)


@final
class _Template:
    """How :meth:`TrioTransport.post_direct` sends to one URL with given headers and timeouts.

    Building an ``h11.Request`` (header validation included) costs more than all the
    rest of sending it, so it is done once per URL and header set: h11 is told of this
    bodiless request (same method, target and headers, ``Content-Length: 0``), and the
    bytes sent are ``prefix`` + the real ``Content-Length`` + the body. What h11 does
    with the response depends only on the request's method and connection headers,
    which are the same.
    """

    __slots__ = ("head", "origin", "prefix", "timeouts")

    def __init__(
        self, url: str, headers: list[tuple[bytes, bytes]], limits: httpx2.Timeout
    ) -> None:
        self.timeouts = _Timeouts(limits.pool, limits.connect, limits.read, limits.write)
        parsed = httpx2.URL(url)
        self.origin: _Origin = (parsed.raw_scheme, parsed.raw_host, parsed.port)
        lines = headers
        names = {name.lower() for name, _ in headers}
        if b"content-length" in names or b"transfer-encoding" in names:
            raise httpx2.LocalProtocolError("the body's framing is this transport's to set")
        if b"host" not in names:
            lines = [(b"Host", parsed.netloc), *headers]
        # Validated here, by h11, once.
        self.head = _request_head("POST", parsed.raw_path, [*lines, (b"Content-Length", b"0")])
        self.prefix = b"".join(
            [b"POST %s HTTP/1.1\r\n" % parsed.raw_path]
            + [b"%s: %s\r\n" % (name, value) for name, value in lines]
        )


@final
class DirectResponse:
    """A whole response read by :meth:`TrioTransport.post_direct`.

    Attributes:
        status_code: the HTTP status.
        reason_phrase: the status line's reason.
        headers: lower-case names to values (repeated headers joined with ``", "``).
        content: the body, decoded if the server compressed it.
    """

    __slots__ = ("content", "headers", "reason_phrase", "status_code")

    def __init__(
        self, status_code: int, reason_phrase: str, headers: dict[str, str], content: bytes
    ) -> None:
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        self.headers = headers
        self.content = content


@final
class TrioTransport(httpx2.AsyncBaseTransport):
    """An HTTP/1.1 transport for ``httpx2.AsyncClient`` built on trio sockets and h11.

    The default transport of :func:`trio_llm.open_client`. Its CPU cost per request stays
    flat as requests in flight grow (measured in ``docs/performance.md``), where httpx2's
    own pool grows linearly. Choose ``httpx2.AsyncHTTPTransport`` instead for HTTP/2,
    Unix sockets, client certificates or connect retries. Proxies from the environment
    (``HTTPS_PROXY``, ...) still work: httpx2's client routes those URLs through its own
    proxy transport, whatever the default transport is.

    Each origin (scheme, host, port) has its own keep-alive pool. A connection the server
    closed while idle is dropped when next taken; a reused connection that ends before
    the response's first byte is replaced and the request sent once more (only if its
    body is in memory, which is the case for ``content=`` bodies). Timeouts come from each
    request's ``timeout`` extension (which httpx2 sets from the client's ``Timeout``):
    ``pool`` bounds the wait for a connection, ``connect`` the TCP and TLS set-up,
    ``write`` each write, ``read`` each read.

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
        self._pools: dict[_Origin, _Pool] = {}
        self._templates: dict[tuple[object, ...], _Template] = {}
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

    def _pool(self, origin: _Origin) -> _Pool:
        if self._closed:
            raise RuntimeError("cannot send a request: the transport is closed")
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(self._limits)
        return pool

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` and return the response once its head has arrived.

        The response's body is read through its stream; reading it to the end returns
        the connection to the pool, closing the response earlier closes the connection.

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
        returned to the pool half-used) and its pool slot freed; nothing is retried.
        """
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port)
        pool = self._pool(origin)
        timeouts = _Timeouts.from_extension(request.extensions.get("timeout"))
        try:
            content: bytes | None = request.content
        except httpx2.RequestNotRead:
            content = None  # a streamed body: sent as it is produced, never replayed
        head = _request_head(request.method, url.raw_path, request.headers.raw)
        conn, event = await self._start(pool, origin, head, content, request.stream, timeouts)
        return httpx2.Response(
            status_code=event.status_code,
            headers=event.headers.raw_items(),
            stream=_ResponseStream(pool, conn, timeouts.read),
            extensions={
                "http_version": b"HTTP/" + event.http_version,
                "reason_phrase": event.reason,
            },
        )

    async def post_direct(
        self,
        url: str,
        headers: list[tuple[bytes, bytes]],
        content: bytes,
        limits: httpx2.Timeout,
        deadline_at: float = math.inf,
    ) -> DirectResponse:
        """POST ``content`` and read the whole response, with no ``httpx2`` objects made.

        The hot path of :class:`trio_llm.Client`, for clients whose httpx2 layer would add
        nothing (see :func:`direct_transport`): it saves about half the CPU time of a
        request. Sent as :meth:`handle_async_request` would send it, plus ``Host`` and
        ``Content-Length``; a compressed body is decoded by httpx2.

        Args:
            url: the absolute URL.
            headers: the request's headers, ``Host`` and ``Content-Length`` excepted.
            content: the body.
            limits: the per-phase timeouts.
            deadline_at: a trio time by which every phase ends: each timeout is cut
                short to it (and raised as that phase's timeout), so a caller's deadline
                needs no cancel scope of its own.

        Raises:
            The errors of :meth:`handle_async_request`, and the same ones while reading
            the body.

        Cancellation: as for :meth:`handle_async_request`: the connection is closed.
        """
        template = self._template(url, headers, limits)
        origin = template.origin
        pool = self._pool(origin)
        wire = b"%sContent-Length: %d\r\n\r\n%s" % (template.prefix, len(content), content)
        timeouts = template.timeouts
        # Not through _start: one frame fewer held while the response is awaited.
        conn, reused = await self._checkout(pool, origin, timeouts, deadline_at)
        conn, event = await _exchange(
            self, pool, origin, conn, reused, template.head, wire, None, timeouts, True, deadline_at
        )
        parts = []
        finished = False
        while not finished:
            part, finished = await _next_body_part(pool, conn, timeouts.read, deadline_at)
            parts.append(part)
        body = b"".join(parts)
        raw_headers = event.headers.raw_items()
        names: dict[str, str] = {}
        for raw_name, raw_value in raw_headers:
            name = raw_name.lower().decode("latin-1")
            value = raw_value.decode("latin-1")
            names[name] = f"{names[name]}, {value}" if name in names else value
        if "content-encoding" in names:
            body = httpx2.Response(event.status_code, headers=raw_headers, content=body).content
        return DirectResponse(event.status_code, event.reason.decode("latin-1"), names, body)

    def _template(
        self, url: str, headers: list[tuple[bytes, bytes]], limits: httpx2.Timeout
    ) -> _Template:
        # Not inline in post_direct: its key would then live as long as the request.
        key = (url, tuple(headers), limits.pool, limits.connect, limits.read, limits.write)
        template = self._templates.get(key)
        if template is None:
            template = _Template(url, headers, limits)
            if len(self._templates) >= _MAX_TEMPLATES:
                self._templates.clear()
            self._templates[key] = template
        return template

    async def _start(
        self,
        pool: _Pool,
        origin: _Origin,
        head: h11.Request,
        content: bytes | None,
        stream: object,
        timeouts: _Timeouts,
        preformatted: bool = False,
    ) -> tuple[_Connection, h11.Response]:
        """Take a connection, send the request and read up to the response head.

        The connection returned carries the unread body. On any failure, cancellation
        included, the connection is closed and its slot freed.
        ``preformatted``: ``content`` is the whole request, and ``head`` the bodiless
        equivalent h11 is told of (see :class:`_Template`).
        """
        conn, reused = await self._checkout(pool, origin, timeouts)
        return await _exchange(
            self, pool, origin, conn, reused, head, content, stream, timeouts, preformatted
        )

    async def _checkout(
        self, pool: _Pool, origin: _Origin, timeouts: _Timeouts, deadline_at: float = math.inf
    ) -> tuple[_Connection, bool]:
        """Return an idle connection and ``True``, or a new one and ``False``.

        On any failure, cancellation included, the pool slot is freed. The pool and
        connect timeouts end by ``deadline_at`` at the latest.
        """
        conn = await pool.acquire(timeouts.pool, deadline_at)
        if pool.closed:
            pool.discard(conn)
            raise RuntimeError("cannot send a request: the transport is closed")
        if conn is not None:
            return conn, True
        try:
            return await self._connect(origin, timeouts.connect, deadline_at), False
        except BaseException:
            pool.discard(None)
            raise

    async def _connect(
        self, origin: _Origin, seconds: float | None, deadline_at: float = math.inf
    ) -> _Connection:
        """Open a connection (TCP, then TLS for https) within ``seconds``, by ``deadline_at``.

        Cancellation: any socket opened so far is closed.
        """
        scheme, host, port = origin
        tls = scheme == b"https"
        if not tls and scheme != b"http":
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme.decode()!r}")
        hostname = host.decode("ascii")
        with trio.move_on_at(_deadline(seconds, deadline_at)):
            try:
                tcp = await trio.open_tcp_stream(hostname, port or (443 if tls else 80))
            except OSError as exc:
                raise _transport_error(
                    httpx2.ConnectError, f"cannot connect to {hostname}", exc
                ) from exc
            if not tls:
                return _Connection(tcp.socket, None)
            stream = trio.SSLStream(
                tcp, self._context(), server_hostname=hostname, https_compatible=True
            )
            try:
                await stream.do_handshake()
            except BaseException as exc:
                tcp.socket.close()
                if isinstance(exc, (trio.BrokenResourceError, ssl.SSLError, OSError)):
                    raise _transport_error(
                        httpx2.ConnectError, f"TLS handshake with {hostname} failed", exc
                    ) from exc
                raise
            return _Connection(tcp.socket, stream)
        raise httpx2.ConnectTimeout(
            f"cannot connect to {hostname} {_within('connect', seconds, deadline_at)}"
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

    def _statistics(self) -> dict[_Origin, tuple[int, int, int]]:
        """Return each origin's ``(connections, idle, waiting)``, for tests."""
        return {origin: pool.statistics() for origin, pool in self._pools.items()}


def _request_head(method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> h11.Request:
    try:
        return h11.Request(method=method, target=target, headers=headers)
    except h11.LocalProtocolError as exc:
        raise httpx2.LocalProtocolError(f"cannot send this request: {exc}") from exc


async def _exchange(
    transport: TrioTransport,
    pool: _Pool,
    origin: _Origin,
    conn: _Connection,
    reused: bool,
    head: h11.Request,
    content: bytes | None,
    stream: object,
    timeouts: _Timeouts,
    preformatted: bool,
    deadline_at: float = math.inf,
) -> tuple[_Connection, h11.Response]:
    """Send the request on ``conn`` (taken from ``pool``) and read up to the response head.

    Returns the connection that carries the response, its body unread: ``conn``, or a
    fresh one if ``conn`` was ``reused`` and the server had closed it while it was idle
    (the request is then sent once more, unless its body was a stream). On any failure,
    cancellation included, the connection is closed and its slot freed. One function
    rather than several: each frame is held by every request waiting for its response.
    Every write and read timeout ends by ``deadline_at`` at the latest.

    ``preformatted``: ``content`` is the whole request, to send as it is, and ``head``
    the bodiless equivalent to tell h11 of.

    One cancel scope covers both phases, its deadline moved before each write (``write``
    timeout) and each read (``read`` timeout): a scope costs more than the I/O it guards.
    (The deadline of the first write is set when the scope is made, to move it less.)

    Cancellation: the connection is closed and its slot freed.
    """
    try:
        state = conn.h11
        send_all = conn.send_all
        write = timeouts.write
        read = timeouts.read
        writing = True
        received = False
        # Created with the write deadline: each change of a scope's deadline costs a few us.
        with trio.CancelScope(
            deadline=min(math.inf if write is None else trio.current_time() + write, deadline_at)
        ) as scope:
            try:
                if preformatted:
                    assert content is not None
                    state.send(head)
                    state.send(_END_EVENT)
                    await send_all(content)
                elif content is not None:
                    # Head and body in one write: one system call, one TCP segment if small.
                    data = state.send(head) or b""
                    if content:
                        data += state.send(h11.Data(data=content)) or b""
                    data += state.send(h11.EndOfMessage()) or b""
                    await send_all(data)
                else:
                    assert isinstance(stream, httpx2.AsyncByteStream)
                    await send_all(state.send(head) or b"")
                    parts = stream.__aiter__()
                    try:
                        async for chunk in parts:
                            if chunk:
                                if write is not None:
                                    scope.deadline = min(trio.current_time() + write, deadline_at)
                                await send_all(state.send(h11.Data(data=chunk)) or b"")
                                # Producing the next part is not writing.
                                scope.deadline = deadline_at
                    finally:
                        if isinstance(parts, AsyncGenerator):
                            await parts.aclose()  # at once, not by the garbage collector
                    if write is not None:
                        scope.deadline = min(trio.current_time() + write, deadline_at)
                    await send_all(state.send(h11.EndOfMessage()) or b"")
                writing = False
                if read is None:
                    scope.deadline = deadline_at  # the write timeout no longer applies
                # Nothing of the response can be buffered yet (a connection with bytes past
                # its last response is never reused), so the first step is a read.
                event: object = _NEED_DATA
                while True:
                    if event is _NEED_DATA:
                        if read is not None:
                            scope.deadline = min(trio.current_time() + read, deadline_at)
                        incoming = await conn.receive_some(_RECEIVE_SIZE)
                        if not incoming and not received:
                            error = httpx2.RemoteProtocolError(
                                "the server closed the connection without sending a response"
                            )
                            raise _StaleConnection(error) if reused else error
                        received = True
                        state.receive_data(incoming)  # type: ignore[arg-type]  # any bytes-like
                    elif type(event) is _RESPONSE:
                        conn.body = _Body(event, head.method, state)
                        return conn, event
                    elif not isinstance(event, h11.InformationalResponse):
                        # (100 Continue and the like are skipped: the real response follows.)
                        raise httpx2.RemoteProtocolError(
                            f"unexpected {type(event).__name__} before the response head"
                        )
                    event = state.next_event()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if writing:
                    failure = _transport_error(httpx2.WriteError, "sending the request failed", exc)
                else:
                    failure = _transport_error(httpx2.ReadError, "reading the response failed", exc)
                if reused and not received:
                    raise _StaleConnection(failure) from exc
                raise failure from exc
            except h11.LocalProtocolError as exc:
                raise httpx2.LocalProtocolError(f"cannot send this request: {exc}") from exc
            except h11.RemoteProtocolError as exc:
                raise httpx2.RemoteProtocolError(f"malformed response: {exc}") from exc
        if writing:
            raise httpx2.WriteTimeout(f"could not send {_within('write', write, deadline_at)}")
        raise httpx2.ReadTimeout(f"no data {_within('read', read, deadline_at)}")
    except _StaleConnection as stale:
        if content is None:
            pool.discard(conn)
            raise stale.error from stale
        # The server closed the idle connection as we sent on it: its slot carries a
        # fresh connection, and the request is sent once more.
        conn.close()
        try:
            fresh = await transport._connect(origin, timeouts.connect, deadline_at)
        except BaseException:
            pool.discard(None)
            raise
        return await _exchange(
            transport,
            pool,
            origin,
            fresh,
            False,
            head,
            content,
            stream,
            timeouts,
            preformatted,
            deadline_at,
        )
    except BaseException:
        pool.discard(conn)
        raise


def direct_transport(http: httpx2.AsyncClient) -> TrioTransport | None:
    """Return ``http``'s transport if it is a :class:`TrioTransport` that may be used directly.

    That is, when httpx2's client layer would add nothing to a plain POST: no mounted
    transports (environment proxies), no auth flow and no event hooks. Cookies and
    redirects are not needed on the API's hot path.
    """
    transport = getattr(http, "_transport", None)
    if (
        type(transport) is not TrioTransport
        or getattr(http, "_mounts", True)
        or http.auth is not None
        or any(http.event_hooks.values())
    ):
        return None
    return transport
