"""An open response: its head arrived, its body read from the connection on demand."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, final

import httpx2

from ._connection import Connection, receive
from ._head import ResponseHead
from ._pool import Pool

__all__ = ["BodyTooLarge", "HTTPResponse", "ResponseStream"]


class BodyTooLarge(Exception):
    """A body read whole was larger than the size limit it was read with."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than the {limit:,}-byte limit")
        self.limit = limit


_UNLIMITED: Final = float("inf")


@final
class HTTPResponse:
    """A response whose head has arrived, returned by :meth:`TrioTransport.open_response`.

    Its body is read with :meth:`read` (all of it) or :meth:`receive_some` (as it
    arrives). Reading it to its end gives the connection back to the pool; :meth:`close`
    before the end closes the connection. Close it in every case (``finally``): that
    costs nothing once the body is read.

    Attributes:
        status_code: the HTTP status.
        reason_phrase: the status line's reason.
        headers: lower-case names to values (repeated headers joined with ``", "``),
            built on first use.
        raw_headers: the headers as received, names in their own case.
        http_version: ``b"HTTP/1.1"`` or ``b"HTTP/1.0"``.
    """

    __slots__ = (
        "_complete",
        "_conn",
        "_head",
        "_headers",
        "_pool",
        "_read",
        "reason_phrase",
        "status_code",
    )

    def __init__(
        self, pool: Pool, conn: Connection, head: ResponseHead, read: float | None
    ) -> None:
        self._pool = pool
        self._conn: Connection | None = conn  # None: complete (given back) or closed
        self._complete = False
        self._head = head
        self._read = read
        self._headers: dict[str, str] | None = None
        self.status_code: int = head.status_code
        self.reason_phrase = head.reason.decode("latin-1")

    def __repr__(self) -> str:
        return f"<HTTPResponse [{self.status_code} {self.reason_phrase}]>"

    @property
    def headers(self) -> Mapping[str, str]:
        headers = self._headers
        if headers is None:
            headers = {}
            for raw_name, raw_value in self._head.headers:
                name = raw_name.lower().decode("latin-1")
                value = raw_value.decode("latin-1")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return headers

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self._head.headers

    @property
    def http_version(self) -> bytes:
        return self._head.http_version

    async def receive_some(self) -> bytes:
        """Return the next body bytes as they came (not decoded); ``b""`` at the end.

        Returns every body byte already received, reading only when there is none; the
        bytes that end the body come back with the connection already in the pool. A
        read waits at most the read timeout. Not a checkpoint when it returns bytes
        already received (the read that brought them was one).

        Raises:
            httpx2.ReadError: the connection failed.
            httpx2.ReadTimeout: nothing arrived within the read timeout.
            httpx2.RemoteProtocolError: the body was cut short or its framing is broken.
            httpx2.StreamClosed: the response was closed before the end of its body.

        Cancellation: the connection is closed (never returned half-read), and so is the
        response: nothing more can be read.
        """
        conn = self._conn
        if conn is None:
            if self._complete:
                return b""
            raise httpx2.StreamClosed()
        body = conn.body
        assert body is not None
        try:
            parts = body.take()
            while not parts and not body.done:
                parts = body.feed(await receive(conn, self._read))
        except BaseException:
            self._conn = None
            self._pool.discard(conn)
            raise
        if body.done:
            self._conn = None
            self._complete = True
            self._pool.release(conn)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read(self, max_bytes: int | None = None) -> bytes:
        """Read the rest of the body; return it decoded as its ``content-encoding`` says.

        The connection then goes back to the pool. Decoding (gzip, deflate, ...) is
        httpx2's, and assumes the body is read from its start: mixed with
        :meth:`receive_some`, only an unencoded body makes sense.

        Args:
            max_bytes: the largest body accepted, as received and as decoded; a larger
                one stops the read at once (a declared ``Content-Length`` before any
                read), so memory stays bounded whatever the server sends.

        Raises:
            BodyTooLarge: the body is larger than ``max_bytes`` (the connection closed).
            The errors of :meth:`receive_some`, and ``httpx2.DecodingError``.

        Cancellation: as for :meth:`receive_some`.
        """
        conn = self._conn
        if conn is None:
            if self._complete:
                return b""
            raise httpx2.StreamClosed()
        # receive_some's loop, inline: one coroutine fewer on the hot path.
        body = conn.body
        assert body is not None
        limit = max_bytes if max_bytes is not None else _UNLIMITED
        try:
            declared = body.declared_length()
            if declared is not None and declared > limit:
                raise BodyTooLarge(int(limit))
            parts = body.take()
            size = sum(map(len, parts))  # (a whole chunked body may come with the head)
            while True:
                if size > limit:
                    raise BodyTooLarge(int(limit))
                if body.done:
                    break
                more = body.feed(await receive(conn, self._read))
                parts += more
                size += sum(map(len, more))
        except BaseException:
            self._conn = None
            self._pool.discard(conn)
            raise
        self._conn = None
        self._complete = True
        self._pool.release(conn)
        content = parts[0] if len(parts) == 1 else b"".join(parts)
        if "content-encoding" in self.headers:
            raw = self._head.headers
            content = httpx2.Response(self.status_code, headers=raw, content=content).content
            if len(content) > limit:  # a small compressed body can decode to a huge one
                raise BodyTooLarge(int(limit))
        return content

    def close(self) -> None:
        """Close the response: a body not read to its end closes its connection.

        A body complete with the head (none, or ``Content-Length: 0``) gives the
        connection back to the pool instead. Never blocks and never raises, so it is safe
        in ``finally`` blocks of cancelled scopes; it is not a checkpoint. Nothing more
        can be read after it.
        """
        conn = self._conn
        if conn is not None:
            self._conn = None
            body = conn.body
            if body is not None and body.done:
                self._complete = True
                self._pool.release(conn)
            else:
                self._pool.discard(conn)


@final
class ResponseStream(httpx2.AsyncByteStream):
    """An :class:`HTTPResponse`'s body as httpx2 reads it: its raw bytes, part by part."""

    __slots__ = ("_response",)

    def __init__(self, response: HTTPResponse) -> None:
        self._response = response

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        """Return the next part of the body.

        Raises:
            StopAsyncIteration: the body is complete (the connection went back to the pool).
            The errors of :meth:`HTTPResponse.receive_some`.

        Cancellation: the connection is closed at once, and the stream ends.
        """
        part = await self._response.receive_some()
        if not part:
            raise StopAsyncIteration
        return part

    async def aclose(self) -> None:
        """Close the body, as :meth:`HTTPResponse.close` does."""
        self._response.close()
