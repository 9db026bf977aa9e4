"""Parser edges, under httptools and h11 alike: the next response never joins a chunked body,
upgrades after a body, status lines split across reads, absurd Content-Length values."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import pytest
import trio
import trio.testing

from test_transport import read_request_head, serve_raw
from trio_llm._http import TrioTransport, _parsers


@pytest.fixture(params=[_parsers.HTTPTOOLS, _parsers.H11])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make ``_parsers.PARSER`` the parametrized one for the test."""
    name: str = request.param
    if name == _parsers.HTTPTOOLS and not _parsers.HAVE_HTTPTOOLS:
        pytest.skip("httptools is not installed")
    monkeypatch.setattr(_parsers, "PARSER", name)
    return name


def sending(*pieces: bytes) -> Callable[[trio.SocketStream], Any]:
    """A raw server: after the request head, each piece in its own write (a pause
    between), then hold the connection open until the client closes it."""

    async def handler(stream: trio.SocketStream) -> None:
        await read_request_head(stream)
        for piece in pieces:
            await stream.send_all(piece)
            await trio.sleep(0.01)
        while await stream.receive_some(65536):
            pass

    return handler


def pool_state(transport: TrioTransport) -> tuple[int, int, int]:
    """(connections, idle, waiting) of the transport's only origin."""
    (state,) = transport._statistics().values()
    return state


OK = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "following",
    [
        OK + b"Content-Length: 4\r\n\r\nEVIL",
        CHUNKED + b"4\r\nEVIL\r\n0\r\n\r\n",
    ],
    ids=["length", "chunked"],
)
async def test_a_chunked_body_never_takes_in_the_next_response(
    parser: str, following: bytes, autojump_clock: trio.abc.Clock
) -> None:
    """Bytes of a response sent after a chunked body (same read) are never body bytes."""
    async with serve_raw(sending(CHUNKED, b"2\r\nok\r\n0\r\n\r\n" + following)) as url:
        transport = TrioTransport()
        async with httpx2.AsyncClient(transport=transport) as http:
            assert (await http.get(url)).content == b"ok"
            assert pool_state(transport) == (0, 0, 0)  # never reused


async def test_an_upgrade_head_after_a_chunked_body_is_no_foreign_exception(
    parser: str, autojump_clock: trio.abc.Clock
) -> None:
    """A 101 head right after a chunked body is dropped (or an httpx2 error), never httptools'."""
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
    async with serve_raw(sending(CHUNKED, b"2\r\nok\r\n0\r\n\r\n" + upgrade)) as url:
        transport = TrioTransport()
        async with httpx2.AsyncClient(transport=transport) as http:
            try:
                content = (await http.get(url)).content
            except httpx2.HTTPError:
                content = b"ok"
            assert content == b"ok"
            assert pool_state(transport) == (0, 0, 0)


async def test_a_reason_phrase_split_across_reads_is_kept_whole(
    parser: str, autojump_clock: trio.abc.Clock
) -> None:
    """The status line's reason is the whole phrase, however the reads split it."""
    head = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno"
    async with serve_raw(sending(head[:13], head[13:17], head[17:])) as url:
        transport = TrioTransport()
        async with httpx2.AsyncClient(transport=transport) as http:
            response = await http.get(url)
            assert (response.status_code, response.reason_phrase) == (404, "Not Found")


async def test_a_long_zero_padded_content_length_is_a_protocol_error(
    parser: str, autojump_clock: trio.abc.Clock
) -> None:
    """A Content-Length of 4,301+ digits is accepted or a RemoteProtocolError, never ValueError."""
    head = OK + b"Content-Length: " + b"0" * 5000 + b"2\r\n\r\nok"
    async with serve_raw(sending(head)) as url:
        transport = TrioTransport()
        async with httpx2.AsyncClient(transport=transport) as http:
            try:
                content = (await http.get(url)).content
            except httpx2.RemoteProtocolError:
                content = b"ok"
            assert content == b"ok"
            assert pool_state(transport) in ((0, 0, 0), (1, 1, 0))
