"""One HTTP/1.1 connection: its socket I/O, and one exchange up to the response head.

Every place I/O happens translates low-level errors (``OSError``, ``ssl.SSLError``,
trio's ``BrokenResourceError`` / ``ClosedResourceError``, h11's protocol errors) to
httpx2's with one context manager, :func:`map_exceptions` (or one of its prebuilt
instances on the hot path), as httpcore does. Responses are read by httptools or h11,
whichever ``_parsers.PARSER`` names.
"""

from __future__ import annotations

import math
import select
import socket as _stdlib_socket
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import partial
from types import TracebackType
from typing import Any, Final, final

import h11
import httpx2
import trio

from ._body import Body
from ._head import ResponseHead
from ._parsers import ChunkedBody, new_reader

__all__ = [
    "READ_ERRORS",
    "RECEIVE_SIZE",
    "WRITE_ERRORS",
    "Connection",
    "Origin",
    "PhaseTimeouts",
    "StaleConnection",
    "connect",
    "exchange",
    "map_exceptions",
    "receive",
]

RECEIVE_SIZE: Final = 64 * 1024

Origin = tuple[bytes, bytes, int | None]  # scheme, host, port

# Looked up once: module attributes cost a lookup.
_INF: Final = math.inf
_now = trio.current_time
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_poll = getattr(select, "poll", None)


@final
class PhaseTimeouts:
    """The four per-phase limits of one request, in seconds (``None``: no limit)."""

    __slots__ = ("connect", "pool", "read", "write")

    def __init__(self, timeouts: httpx2.Timeout) -> None:
        # Copied: the caller's object may change, and slots are quicker to read.
        self.pool = timeouts.pool
        self.connect = timeouts.connect
        self.read = timeouts.read
        self.write = timeouts.write


class StaleConnection(Exception):
    """A reused connection ended before the first byte of the response: resend once."""

    def __init__(self, error: httpx2.TransportError) -> None:
        super().__init__(str(error))
        self.error = error


# --- error mapping ------------------------------------------------------------------------

# ssl.SSLError is an OSError; trio's BrokenResourceError wraps the OSError or SSLError.
_LOW_LEVEL: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def _transport_error(
    kind: type[httpx2.TransportError], message: str, exc: BaseException
) -> httpx2.TransportError:
    detail = f"{message}: {type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None:
        detail += f" ({type(cause).__name__}: {cause})"
    return kind(detail)


@final
class _ErrorMap:
    """The context manager :func:`map_exceptions` returns."""

    __slots__ = ("kind", "message")

    def __init__(self, kind: type[httpx2.TransportError], message: str) -> None:
        self.kind = kind
        self.message = message

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, _LOW_LEVEL):
            raise _transport_error(self.kind, self.message, exc) from exc
        if isinstance(exc, h11.LocalProtocolError):
            raise httpx2.LocalProtocolError(f"cannot send this request: {exc}") from exc
        if isinstance(exc, h11.RemoteProtocolError):
            raise httpx2.RemoteProtocolError(f"malformed response: {exc}") from exc


def map_exceptions(kind: type[httpx2.TransportError], message: str) -> _ErrorMap:
    """Return a context manager that translates an I/O site's errors to httpx2's.

    ``OSError`` (``ssl.SSLError`` included) and trio's broken/closed-resource errors
    become ``kind(f"{message}: ...")``; h11's ``LocalProtocolError`` becomes httpx2's
    (the request cannot be sent as HTTP/1.1), its ``RemoteProtocolError`` httpx2's too
    (a malformed response); each ``raise ... from`` the original. Anything else,
    httpx2's errors and ``Cancelled`` included, passes unchanged.

    A class, not a ``@contextmanager`` generator: entering and leaving cost two plain
    calls, and the hot path reuses prebuilt ones (:data:`WRITE_ERRORS`,
    :data:`READ_ERRORS`).
    """
    return _ErrorMap(kind, message)


WRITE_ERRORS: Final = map_exceptions(httpx2.WriteError, "sending the request failed")
READ_ERRORS: Final = map_exceptions(httpx2.ReadError, "reading the response failed")


# --- socket I/O ---------------------------------------------------------------------------


def _stdlib_socket_of(sock: trio.socket.SocketType) -> _stdlib_socket.socket | None:
    """Return the standard-library socket under a trio socket, or ``None``.

    The one place trio-llm reaches into trio's privates: trio's socket keeps the
    standard-library one in ``_sock``. Sending and receiving on it directly saves CPU on
    every request (docs/performance.md); where it is missing (another trio version, a
    fake socket), the connection uses trio's public socket methods instead.
    ``tests/test_transport.py`` checks that a trio TCP socket still has it.
    """
    raw = getattr(sock, "_sock", None)
    return raw if isinstance(raw, _stdlib_socket.socket) else None


def _phase_deadline(seconds: float | None) -> float:
    """When a phase limit of ``seconds`` starting now ends (``inf`` for no limit)."""
    return _INF if seconds is None else _now() + seconds


def _write_timeout(seconds: float | None) -> httpx2.WriteTimeout:
    return httpx2.WriteTimeout(f"could not send within the write timeout ({seconds} s)")


def _read_timeout(seconds: float | None) -> httpx2.ReadTimeout:
    return httpx2.ReadTimeout(f"no data within the read timeout ({seconds} s)")


async def _send_on_raw_socket(
    sock: _stdlib_socket.socket, data: bytes, seconds: float | None
) -> None:
    """Send all of ``data``, each wait for the socket within ``seconds`` (``OSError``).

    Does what trio's socket methods do (a checkpoint, the system call, a wait for the
    socket only when it would block) without their two layers of coroutines and context
    managers: less CPU per call, and fewer frames held by each request waiting. The write
    timeout's scope is made only when the socket is full.

    Raises:
        httpx2.WriteTimeout: the socket stayed full for ``seconds``.

    Cancellation: part of ``data`` may have been sent; the caller closes the socket.
    """
    await _checkpoint_if_cancelled()
    view: memoryview | None = None
    sent = 0
    while True:
        try:
            sent += sock.send(data if view is None else view[sent:])
        except BlockingIOError:
            deadline = _phase_deadline(seconds)
            if deadline == _INF:
                await _wait_writable(sock)
                continue
            with trio.CancelScope(deadline=deadline):
                await _wait_writable(sock)
                continue
            raise _write_timeout(seconds) from None
        if sent >= len(data):
            break
        view = memoryview(data)
    await _cancel_shielded_checkpoint()


async def _receive_on_raw_socket(
    sock: _stdlib_socket.socket, max_bytes: int, seconds: float | None
) -> bytes:
    """Receive up to ``max_bytes`` (``b""`` at the end) as trio's ``socket.recv`` does.

    A checkpoint, then the system call, waiting for the socket only if it would block
    (see :func:`_send_on_raw_socket` for why not trio's own), within ``seconds``: the
    read timeout's scope is made only for that wait.

    Raises:
        httpx2.ReadTimeout: nothing arrived within ``seconds``.

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
    deadline = _phase_deadline(seconds)
    while True:
        if deadline == _INF:
            await _wait_readable(sock)
        else:
            with trio.CancelScope(deadline=deadline) as scope:
                await _wait_readable(sock)
            if scope.cancelled_caught:
                raise _read_timeout(seconds)
        try:
            return sock.recv(max_bytes)
        except BlockingIOError:
            pass


async def _send_within(
    send: Callable[[bytes], Awaitable[object]], data: bytes, seconds: float | None
) -> None:
    """Send ``data`` with a stream's or trio socket's own method, within ``seconds``.

    Raises:
        httpx2.WriteTimeout: the send did not complete within ``seconds``.
    """
    deadline = _phase_deadline(seconds)
    if deadline == _INF:
        await _send_all(send, data)
        return
    with trio.CancelScope(deadline=deadline):
        await _send_all(send, data)
        return
    raise _write_timeout(seconds)


async def _send_all(send: Callable[[bytes], Awaitable[object]], data: bytes) -> None:
    # A trio socket's send() may send part (it returns a count); a stream's sends all.
    sent = await send(data)
    if isinstance(sent, int) and sent < len(data):
        view = memoryview(data)
        while sent < len(data):
            more = await send(view[sent:])  # type: ignore[arg-type]  # bytes-like
            assert isinstance(more, int)
            sent += more


async def _receive_within(
    receive: Callable[[int], Awaitable[bytes | bytearray]], max_bytes: int, seconds: float | None
) -> bytes | bytearray:
    """Receive with a stream's or trio socket's own method, within ``seconds``.

    Raises:
        httpx2.ReadTimeout: nothing arrived within ``seconds``.
    """
    deadline = _phase_deadline(seconds)
    if deadline == _INF:
        return await receive(max_bytes)
    with trio.CancelScope(deadline=deadline):
        return await receive(max_bytes)
    raise _read_timeout(seconds)


@final
class Connection:
    """One HTTP/1.1 connection: its socket, its I/O, and the exchange under way.

    ``send_all`` and ``receive_some`` are the ``trio.SSLStream``'s for TLS and, for plain
    TCP, straight on the socket (``trio.SocketStream``'s context managers cost more than
    the system calls, and each layer is a frame held by every request in flight).
    Each exchange reads the response head with a reader of its own (``_parsers.py``);
    ``body`` then decodes the body.
    """

    __slots__ = ("body", "idle_since", "receive_some", "send_all", "socket")

    def __init__(self, socket: trio.socket.SocketType, tls: trio.SSLStream[Any] | None) -> None:
        self.socket = socket
        #: ``send_all(data, seconds)``: send all of ``data``, each wait within ``seconds``.
        self.send_all: Callable[[bytes, float | None], Awaitable[None]]
        #: ``receive_some(max_bytes, seconds)``: some bytes, waiting at most ``seconds``.
        self.receive_some: Callable[[int, float | None], Awaitable[bytes | bytearray]]
        raw = None if tls is not None else _stdlib_socket_of(socket)
        if raw is not None:
            self.send_all = partial(_send_on_raw_socket, raw)
            self.receive_some = partial(_receive_on_raw_socket, raw)
        elif tls is None:
            self.send_all = partial(_send_within, socket.send)
            self.receive_some = partial(_receive_within, socket.recv)
        else:
            self.send_all = partial(_send_within, tls.send_all)
            self.receive_some = partial(_receive_within, tls.receive_some)
        self.body: Body | ChunkedBody | None = None
        self.idle_since = 0.0

    def usable_after_idle(self) -> bool:
        """Whether an idle connection may carry a request: the server has not closed it.

        An idle HTTP/1.1 connection has nothing to say; if its socket is readable, the
        server closed it (EOF or a reset) or broke the protocol, so it is dropped.
        """
        try:
            fileno = self.socket.fileno()
            if _poll is None:  # Windows: select() has no descriptor-number limit there
                readable, _, _ = select.select((fileno,), (), (), 0)
                return not readable
            # poll(), not select(): select() refuses descriptors from 1024 on.
            poller = _poll()
            poller.register(fileno, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):  # closed under us: fileno() is -1
            return False

    def close(self) -> None:
        """Close at once (no TLS close_notify: HTTP/1.1 framing makes it unnecessary)."""
        self.socket.close()


async def connect(
    origin: Origin, seconds: float | None, context: Callable[[], ssl.SSLContext]
) -> Connection:
    """Open a connection to ``origin`` (TCP, then TLS for https) within ``seconds``.

    ``context`` gives the TLS context, called only for https.

    Raises:
        httpx2.UnsupportedProtocol: the scheme is neither http nor https.
        httpx2.ConnectError: the TCP connection or the TLS handshake failed.
        httpx2.ConnectTimeout: both did not complete within ``seconds``.

    Cancellation: any socket opened so far is closed.
    """
    scheme, host, port = origin
    tls = scheme == b"https"
    if not tls and scheme != b"http":
        raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme.decode()!r}")
    hostname = host.decode("ascii")
    with trio.CancelScope(deadline=_phase_deadline(seconds)):
        with map_exceptions(httpx2.ConnectError, f"cannot connect to {hostname}"):
            tcp = await trio.open_tcp_stream(hostname, port or (443 if tls else 80))
        if not tls:
            return Connection(tcp.socket, None)
        stream = trio.SSLStream(tcp, context(), server_hostname=hostname, https_compatible=True)
        try:
            with map_exceptions(httpx2.ConnectError, f"TLS handshake with {hostname} failed"):
                await stream.do_handshake()
        except BaseException:
            tcp.socket.close()
            raise
        return Connection(tcp.socket, stream)
    raise httpx2.ConnectTimeout(
        f"cannot connect to {hostname} within the connect timeout ({seconds} s)"
    )


async def exchange(
    conn: Connection,
    reused: bool,
    head: h11.Request,
    keep_alive: bool,
    wire: bytes | None,
    stream: httpx2.AsyncByteStream | None,
    timeouts: PhaseTimeouts,
) -> ResponseHead:
    """Send a request on ``conn`` and read up to the response head; return the head.

    ``wire`` is the whole request, to send as it is, and ``head`` the bodiless
    equivalent (see ``_transport.Template``: its method, and for h11 the request it is
    told of); or, with ``wire=None``, ``head`` is the request's head and its body comes
    from ``stream``. ``keep_alive`` says whether the request lets the connection be
    reused (no ``Connection: close``). The body stays unread, in ``conn.body``. The
    caller closes the connection on any failure.

    Each write has the ``write`` timeout and each read the ``read`` timeout, as cancel
    scopes made only where the socket has to be waited for, and only when an enclosing
    deadline would not end first (see :func:`_phase_deadline`): a scope costs more than
    the I/O it guards. One function rather than several: each frame is held by every
    request waiting.

    Raises:
        StaleConnection: ``conn`` was ``reused`` and ended before the first byte of the
            response: the server closed it while idle.
        httpx2.WriteError, httpx2.WriteTimeout, httpx2.ReadError, httpx2.ReadTimeout,
        httpx2.RemoteProtocolError, httpx2.LocalProtocolError: as their names say.
    """
    reader = new_reader(head.method, keep_alive)
    read = timeouts.read
    received = False
    try:
        with WRITE_ERRORS:
            if wire is not None:
                reader.sending(head)
                await conn.send_all(wire, timeouts.write)
            else:
                assert stream is not None
                await _send_streamed(conn, reader.writer(), head, stream, timeouts.write)
        # Nothing of the response can be buffered yet (a connection with bytes past its
        # last response is never reused), so the first step is a read.
        with READ_ERRORS:
            while True:
                incoming = await conn.receive_some(RECEIVE_SIZE, read)
                if not incoming and not received:
                    error = httpx2.RemoteProtocolError(
                        "the server closed the connection without sending a response"
                    )
                    raise StaleConnection(error) if reused else error
                received = True
                response = reader.feed(incoming)
                if response is not None:
                    conn.body = reader.body(response)
                    return response
    except (httpx2.WriteError, httpx2.ReadError) as exc:
        if reused and not received:
            raise StaleConnection(exc) from exc
        raise


async def _send_streamed(
    conn: Connection,
    state: h11.Connection,
    head: h11.Request,
    stream: httpx2.AsyncByteStream,
    write: float | None,
) -> None:
    """Send ``head``, then the body as ``stream`` produces it; each write within ``write``.

    ``state`` (h11's) frames the body and checks it against the head. Producing the next
    part is not writing: only the sends are timed.
    """
    send_all = conn.send_all
    await send_all(state.send(head) or b"", write)
    parts = stream.__aiter__()
    try:
        async for chunk in parts:
            if chunk:
                await send_all(state.send(h11.Data(data=chunk)) or b"", write)
    finally:
        if isinstance(parts, AsyncGenerator):
            await parts.aclose()  # at once, not by the garbage collector
    await send_all(state.send(h11.EndOfMessage()) or b"", write)


async def receive(conn: Connection, seconds: float | None) -> bytes:
    """Read some bytes of ``conn`` (``b""`` at EOF) within ``seconds``.

    Raises:
        httpx2.ReadError: the connection failed.
        httpx2.ReadTimeout: nothing arrived within ``seconds``.

    Cancellation: nothing was read.
    """
    with READ_ERRORS:
        data = await conn.receive_some(RECEIVE_SIZE, seconds)
    return data if type(data) is bytes else bytes(data)  # trio may give a bytearray
