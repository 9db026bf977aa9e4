"""The neutral response head both parsers produce, and what it means for the connection.

The parsers (``_parsers.py``: httptools or h11) only tokenize a head and check its
syntax. What the head *means* is judged once, here, for both (:func:`response_head`):
the body's framing, as RFC 9112 section 6.3 and h11 say (no body for HEAD, 1xx, 204
and 304; ``Transfer-Encoding: chunked``; ``Content-Length``; otherwise until the server
closes), with the ambiguous framings refused (both ``Content-Length`` and
``Transfer-Encoding``, differing ``Content-Length`` values, any coding but ``chunked``:
the shapes of request smuggling and response splitting), and keep-alive as h11 judges
it (``Connection: close`` from either side, or a response older than HTTP/1.1, closes
the connection after the response).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, final

import httpx2

__all__ = ["MAX_HEAD", "ResponseHead", "malformed", "request_keeps_alive", "response_head"]

MAX_HEAD: Final = 100 * 1024  # the largest response head (or trailer) accepted, as httpcore


@final
class ResponseHead:
    """A response's head, whichever parser read it, and how its body is framed.

    Attributes:
        status_code: the status (never 1xx: informational heads are skipped).
        reason: the status line's reason phrase, as received.
        http_version: ``b"HTTP/1.1"``, ``b"HTTP/1.0"``, ...
        headers: the header lines in order, names in their own case.
        keep_alive: whether the connection may carry another request after this
            response, as far as the heads say (the request's and the response's
            ``Connection`` headers and versions; a body read until close is not).
        content_length: the body's length (0 when there is none: HEAD, 204, 304), or
            ``None`` when it is chunked or runs until the server closes.
        chunked: whether the body is chunked.
    """

    __slots__ = (
        "chunked",
        "content_length",
        "headers",
        "http_version",
        "keep_alive",
        "reason",
        "status_code",
    )

    def __init__(
        self,
        status_code: int,
        reason: bytes,
        http_version: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
    ) -> None:
        self.status_code = status_code
        self.reason = reason
        self.http_version = http_version
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status_code} {self.reason!r}>"


def malformed(message: str) -> httpx2.RemoteProtocolError:
    return httpx2.RemoteProtocolError(f"malformed response: {message}")


def _says_close(value: bytes) -> bool:
    """Whether a ``Connection`` header's value has the ``close`` option."""
    value = value.lower()
    return b"close" in value and any(token.strip() == b"close" for token in value.split(b","))


def request_keeps_alive(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether an HTTP/1.1 request with ``headers`` lets its connection be reused."""
    return not any(name.lower() == b"connection" and _says_close(value) for name, value in headers)


_NO_BODY: Final = frozenset({204, 304})


def response_head(
    status: int,
    reason: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    method: bytes,
    keep_alive: bool,
) -> ResponseHead:
    """Judge a parsed head: its body's framing and whether the connection stays open.

    ``method`` is the request's; ``keep_alive`` whether the request allows reuse.

    Raises:
        httpx2.RemoteProtocolError: the status is below 100, or the framing is
            ambiguous or unsupported (see the module's docstring).
    """
    if status < 100:
        raise malformed(f"status code {status}")
    length: int | None = None
    chunked = False
    for name, value in headers:
        name = name.lower()
        if name == b"content-length":
            value = value.strip()
            digits = value.lstrip(b"0") or b"0"
            # At most 19 digits past leading zeros: int() refuses over 4,300 digits, and no
            # body is longer than 10**19 bytes.
            if not value.isdigit() or len(digits) > 19:
                raise malformed(f"bad Content-Length {value[:40]!r}")
            if length is not None and int(digits) != length:
                raise malformed("conflicting Content-Length headers")
            length = int(digits)
        elif name == b"transfer-encoding":
            if chunked or value.strip().lower() != b"chunked":
                raise malformed("only one Transfer-Encoding: chunked is supported")
            chunked = True
        elif name == b"connection" and keep_alive:
            keep_alive = not _says_close(value)
    if chunked and length is not None:
        raise malformed("both Content-Length and Transfer-Encoding")
    if version < b"HTTP/1.1":
        keep_alive = False
    if method == b"HEAD" or status in _NO_BODY:
        length, chunked = 0, False
    elif length is None and not chunked:
        keep_alive = False  # the body ends when the server closes
    return ResponseHead(status, reason, version, headers, keep_alive, length, chunked)
