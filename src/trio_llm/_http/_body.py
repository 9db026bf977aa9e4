"""Response bodies: content-length, chunked and until-close framing, decoded sans-IO."""

from __future__ import annotations

import re
from typing import Final, final

import httpx2

from ._head import MAX_HEAD, ResponseHead

__all__ = ["Body"]

_MAX_LINE: Final = 4096  # the longest chunk-size line accepted
_CHUNK_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")


@final
class Body:
    """The body of one response, decoded from its framing as the bytes arrive.

    A parser reads the response head (``_parsers.py``); from there on this takes over,
    because h11 spends about 6 us on each chunk of a chunked body (its state machine runs
    for every event), and a streamed reply is hundreds of small chunks: here a chunk
    costs about 1 us (with httptools, chunked bodies go on through llhttp instead, at
    ~0.1 us a chunk: ``_parsers.ChunkedBody``). The framing is the head's
    (:class:`ResponseHead`, judged by ``_head.response_head``): chunked,
    ``Content-Length`` bytes (0 for HEAD, 204 and 304), or everything until the server
    closes.
    """

    __slots__ = ("_buffer", "_framing", "_left", "_trailer", "done", "reusable")

    _LENGTH = 0
    _CHUNKED = 1
    _UNTIL_CLOSE = 2

    def __init__(self, head: ResponseHead, buffer: bytes) -> None:
        """Start decoding the body ``head`` frames; ``buffer`` holds its first bytes."""
        self._buffer = buffer
        self._trailer = 0
        length = head.content_length
        #: Whether the connection may carry another request once the body is done: the
        #: heads' judgement (``ResponseHead.keep_alive``), then the body's own.
        self.reusable = head.keep_alive
        if head.chunked:
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
        self.done = length == 0
        if self.done and buffer:
            self.reusable = False  # bytes after a body-less response: the server is confused

    def declared_length(self) -> int | None:
        """The body's ``Content-Length`` still to come, or ``None`` when it is not declared."""
        return self._left if self._framing == self._LENGTH else None

    def take(self) -> list[bytes]:
        """Decode what is buffered; return the body bytes found (maybe none, never ``b""``).

        Raises:
            httpx2.RemoteProtocolError: the chunked framing is broken.
        """
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
                    if self._trailer > MAX_HEAD:
                        raise httpx2.RemoteProtocolError("trailer section too large")
                else:  # the empty line that ends the trailer section: the body is done
                    self.done = True
                    if at < size:
                        self.reusable = False  # bytes past the response
                    break
        self._left = left
        self._buffer = buffer[at:] if at < size else b""
        return parts
