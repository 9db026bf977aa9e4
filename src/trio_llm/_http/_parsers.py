"""The response parsers: httptools (llhttp) when installed, h11 otherwise.

Which one reads responses is decided once, at import: httptools (llhttp, the C parser
aiohttp and uvicorn use: ~1.5 us a head, ~0.1 us a chunk of a chunked body) when it can
be imported, h11 (pure Python: ~19 us a head with its state machine; bodies then go
through ``_body.Body``, ~1 us a chunk) otherwise, as on PyPy. The environment variable
``TRIO_LLM_HTTP_PARSER`` (``httptools`` or ``h11``) forces one; tests set the module
attribute :data:`PARSER` instead, which is read at the start of each exchange.

Each exchange makes a reader (:func:`new_reader`), feeds it what the connection brings
until it returns the :class:`~._head.ResponseHead` (1xx heads skipped), then asks it for
the body decoder (:meth:`HttptoolsReader.body`). Both readers leave the head's meaning
to ``_head.response_head``, so framing and keep-alive are judged alike.

What each parser accepts differs at the edges of the grammar (``tests/test_transport.py``
pins both): llhttp refuses bare-LF line endings, obsolete line folding, control
characters in header values, repeated ``Content-Length`` headers (even equal ones), a
list as ``Content-Length`` and HTTP versions other than 0.9, 1.0, 1.1 and 2.0, all of
which h11 takes; h11 refuses blank lines before the status line, which llhttp skips. In
chunked bodies, llhttp refuses whitespace after the chunk size, which ``Body`` skips.
"""

from __future__ import annotations

import os
from typing import Final, final

import h11
import httpx2

from ._body import Body
from ._head import MAX_HEAD, ResponseHead, malformed, response_head

try:
    from httptools import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        HttpParserError,
        HttpParserUpgrade,
        HttpResponseParser,
    )
except ImportError:  # pragma: no cover - PyPy, or installed without it
    HAVE_HTTPTOOLS = False
else:
    HAVE_HTTPTOOLS = True

__all__ = [
    "H11",
    "HAVE_HTTPTOOLS",
    "HTTPTOOLS",
    "PARSER",
    "ChunkedBody",
    "H11Reader",
    "HttptoolsReader",
    "new_reader",
]

HTTPTOOLS: Final = "httptools"
H11: Final = "h11"


def _choose_parser(forced: str) -> str:
    """Return the parser to use: ``forced`` if given, else httptools when importable."""
    if not forced:
        return HTTPTOOLS if HAVE_HTTPTOOLS else H11
    if forced not in (HTTPTOOLS, H11):
        raise ValueError(f"TRIO_LLM_HTTP_PARSER must be 'httptools' or 'h11', not {forced!r}")
    if forced == HTTPTOOLS and not HAVE_HTTPTOOLS:
        raise ImportError("TRIO_LLM_HTTP_PARSER=httptools, but httptools is not installed")
    return forced


#: The parser that reads responses: ``"httptools"`` or ``"h11"``.
PARSER: str = _choose_parser(os.environ.get("TRIO_LLM_HTTP_PARSER", ""))


# --- httptools ------------------------------------------------------------------------------


@final
class _Collector:
    """llhttp's callbacks for one response. Apart from the reader: the parser holds it,
    and a parser holding its holder would be a cycle left to the garbage collector.
    """

    __slots__ = ("complete", "ended", "headers", "messages", "parts", "reason")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.complete = False  # the head
        self.parts: list[bytes] = []  # body bytes not yet taken
        self.ended = False  # the whole response
        self.messages = 0  # responses begun: more than one means bytes past the first

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_status(self, reason: bytes) -> None:
        # Called once per piece when the status line arrives in several reads.
        if not self.ended:
            self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops the whitespace before a value but keeps what follows it.
        if not self.ended:
            self.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_body(self, body: bytes) -> None:
        # Nothing past the end of this response: bytes of a next one are never its body.
        if not self.ended:
            self.parts.append(body)

    def on_message_complete(self) -> None:
        self.ended = True


_NO_COLLECTOR: Final = _Collector()  # (a reader's until its first bytes arrive)
_VERSIONS: Final = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}


@final
class HttptoolsReader:
    """Reads one response head with llhttp, fed the head's bytes and nothing more.

    The end of a head is its first ``CRLF CRLF`` (llhttp refuses bare LFs); bytes before
    it are fed as they arrive, so garbage is refused at once, and the bytes after it are
    the start of the body (:attr:`rest`). 1xx heads are skipped. The parser is made when
    the first bytes arrive: with its callbacks it is ~0.9 KB that a request waiting for
    its reply need not hold.
    """

    __slots__ = ("_buffer", "_collector", "_fed", "_keep_alive", "_method", "_parser", "rest")

    def __init__(self, method: bytes, keep_alive: bool) -> None:
        self._method = method
        self._keep_alive = keep_alive
        self._buffer = b""
        self._fed = 0  # bytes of _buffer llhttp has seen
        self._collector = _NO_COLLECTOR
        self._parser: HttpResponseParser | None = None
        #: The bytes received past the head: the start of the body.
        self.rest = b""

    def sending(self, head: h11.Request) -> None:
        """Note that ``head`` goes out with its body in one write (nothing to do here)."""

    def writer(self) -> h11.Connection:
        """Return an h11 state machine to write a streamed request with."""
        return h11.Connection(h11.CLIENT)

    def feed(self, data: bytes | bytearray) -> ResponseHead | None:
        """Take bytes read from the connection (``b""``: it closed); return the head once
        complete (the bytes after it in :attr:`rest`), else ``None``.

        Raises:
            httpx2.RemoteProtocolError: the head is malformed, larger than ``MAX_HEAD``,
                or cut short.
        """
        if not data:
            raise malformed("the server closed the connection in the middle of the head")
        if type(data) is not bytes:
            data = bytes(data)  # TLS gives a bytearray
        buffer = self._buffer + data if self._buffer else data
        parser = self._parser
        if parser is None:
            self._collector = _Collector()
            parser = self._parser = HttpResponseParser(self._collector)
        while True:
            fed = self._fed
            end = buffer.find(b"\r\n\r\n", fed - 3 if fed > 3 else 0)
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise malformed(f"the head is larger than {MAX_HEAD} bytes")
                if len(buffer) > fed:
                    _parse(parser, buffer[fed:])
                self._buffer = buffer
                self._fed = len(buffer)
                return None
            end += 4
            if end > MAX_HEAD:
                raise malformed(f"the head is larger than {MAX_HEAD} bytes")
            _parse(parser, buffer[fed:end] if fed or end < len(buffer) else buffer)
            collector = self._collector
            if not collector.complete:  # only blank lines so far (llhttp skips them)
                self._fed = end
                continue
            status = parser.get_status_code()
            if status >= 200 or status < 100:
                break
            if status == 101:  # never asked for
                raise malformed("101 Switching Protocols without an Upgrade request")
            # 100 Continue and the like: the real head follows.
            buffer = buffer[end:]
            self._fed = 0
            self._collector = _Collector()
            parser = self._parser = HttpResponseParser(self._collector)
        self.rest = buffer[end:]
        version = parser.get_http_version()
        return response_head(
            status,
            collector.reason,
            _VERSIONS.get(version) or b"HTTP/" + version.encode(),
            collector.headers,
            self._method,
            self._keep_alive,
        )

    def body(self, head: ResponseHead) -> Body | ChunkedBody:
        """Return the decoder of the body ``head`` frames, starting with :attr:`rest`.

        A chunked body goes on through llhttp; the others are slices of what arrives.
        """
        if head.chunked:
            assert self._parser is not None  # (a head was read)
            return ChunkedBody(self._parser, self._collector, self.rest, head.keep_alive)
        return Body(head, self.rest)


def _parse(parser: HttpResponseParser, data: bytes) -> None:
    """Feed ``data`` (part of a head) to ``parser``; its refusal is a RemoteProtocolError."""
    try:
        parser.feed_data(data)
    except HttpParserUpgrade:  # a 101 with "Connection: upgrade": refused by feed()
        pass
    except HttpParserError as exc:
        raise malformed(str(exc) or type(exc).__name__) from exc


@final
class ChunkedBody:
    """A chunked body decoded by the llhttp parser that read its head.

    The same interface as ``_body.Body``. Trailer fields are read and dropped, as
    ``Body`` does. Framing bytes that bring no body bytes (chunk extensions, trailers)
    are bounded by ``MAX_HEAD`` in a row, so a server cannot make llhttp's callbacks
    buffer without end.
    """

    __slots__ = ("_collector", "_parser", "_pending", "_unproductive", "done", "reusable")

    def __init__(
        self, parser: HttpResponseParser, collector: _Collector, rest: bytes, keep_alive: bool
    ) -> None:
        self._parser = parser
        self._collector = collector
        collector.headers = []  # trailers from here on (the head keeps its own list)
        self._pending = rest
        self._unproductive = 0
        #: Whether the connection may carry another request once the body is done.
        self.reusable = keep_alive
        #: Whether the whole body has been decoded.
        self.done = False

    def declared_length(self) -> int | None:
        """``None``: a chunked body declares no length."""
        return None

    def take(self) -> list[bytes]:
        """Decode the bytes that came with the head (once); as ``Body.take``."""
        if not self._pending:
            return []
        data = self._pending
        self._pending = b""
        return self._decode(data)

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Decode bytes read from the connection (``b""``: it closed); as ``Body.feed``.

        Raises:
            httpx2.RemoteProtocolError: the body was cut short, or its framing is broken.
        """
        if not data:
            raise httpx2.RemoteProtocolError(
                "the server closed the connection before the end of the body"
            )
        return self._decode(data)

    def _decode(self, data: bytes | bytearray) -> list[bytes]:
        collector = self._collector
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            if not collector.ended:
                raise httpx2.RemoteProtocolError(f"malformed chunked body: {exc}") from exc
            self.reusable = False  # bytes past the response that are no response
        parts = collector.parts
        if parts:
            collector.parts = []  # (never hand out the list llhttp's callback fills)
            self._unproductive = 0
        else:
            parts = []
            self._unproductive += len(data)
            if self._unproductive > MAX_HEAD and not collector.ended:
                raise httpx2.RemoteProtocolError("chunk framing or trailer section too large")
        if collector.ended:
            self.done = True
            if collector.messages > 1:
                self.reusable = False  # bytes past the response
        return parts


# --- h11 ------------------------------------------------------------------------------------

_NEED_DATA: Final = h11.NEED_DATA
_END_EVENT: Final = h11.EndOfMessage()


@final
class H11Reader:
    """Reads one response head with h11 (the fallback where httptools is missing).

    h11 must have been told of the request first (:meth:`sending`, or the request
    written with :meth:`writer`). Its errors are h11's (``map_exceptions`` turns them
    into httpx2's). Bodies are decoded by ``_body.Body``.
    """

    __slots__ = ("_keep_alive", "_method", "_state", "rest")

    def __init__(self, method: bytes, keep_alive: bool) -> None:
        self._method = method
        self._keep_alive = keep_alive
        self._state = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.rest = b""

    def sending(self, head: h11.Request) -> None:
        """Tell h11 of ``head``, sent (pre-formatted) with its whole body."""
        self._state.send(head)
        self._state.send(_END_EVENT)

    def writer(self) -> h11.Connection:
        """Return the h11 state machine to write a streamed request with."""
        return self._state

    def feed(self, data: bytes | bytearray) -> ResponseHead | None:
        """As :meth:`HttptoolsReader.feed`, with h11's errors."""
        state = self._state
        state.receive_data(data)  # type: ignore[arg-type]  # any bytes-like
        while True:
            event = state.next_event()
            if event is _NEED_DATA:
                return None
            if type(event) is h11.Response:
                self.rest = bytes(state.trailing_data[0])
                return response_head(
                    event.status_code,
                    event.reason,
                    b"HTTP/" + event.http_version,
                    event.headers.raw_items(),
                    self._method,
                    self._keep_alive,
                )
            if not isinstance(event, h11.InformationalResponse):
                raise httpx2.RemoteProtocolError(
                    f"unexpected {type(event).__name__} before the response head"
                )
            # (100 Continue and the like are skipped: the real response follows.)

    def body(self, head: ResponseHead) -> Body:
        """Return the decoder of the body ``head`` frames, starting with :attr:`rest`."""
        return Body(head, self.rest)


def new_reader(method: bytes, keep_alive: bool) -> HttptoolsReader | H11Reader:
    """Return a reader for the response to a ``method`` request, with :data:`PARSER`.

    ``keep_alive``: whether the request lets the connection be reused.
    """
    if PARSER == HTTPTOOLS:
        return HttptoolsReader(method, keep_alive)
    return H11Reader(method, keep_alive)
