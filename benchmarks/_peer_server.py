"""A minimal, fast OpenAI-shaped server for ``benchmarks/peers.py`` (uvloop + httptools).

Not a test double: it answers every POST with one canned chat completion, or with a
canned event stream when the body asks for ``"stream": true``, and does as little as
possible so that the client under test, not the server, is what gets measured. The
behaviour comes from the URL's prefix, so every client reaches every scenario by its
base URL alone::

    /b/<latency_ms>/<chunks>/v1/chat/completions

``latency_ms`` delays each reply; ``chunks`` is the number of content chunks of a
streamed reply. Run ``python benchmarks/_peer_server.py --port 0``: it prints its port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover - asyncio's own loop is slower but works
    uvloop = None

MODEL = "bench-model"

_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello from the benchmark server, in a few short words.",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 11, "total_tokens": 23},
        "system_fingerprint": "fp_bench",
    },
    separators=(",", ":"),
).encode()

_JSON_REPLY = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_bench\r\n"
    b"content-length: %d\r\n\r\n" % len(_COMPLETION)
) + _COMPLETION

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-request-id: req_bench\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _event(payload: dict[str, object] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    event = b"data: " + data.encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _chunk(delta: dict[str, object], finish: str | None) -> dict[str, object]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


_FIRST = _event(_chunk({"role": "assistant", "content": ""}, None))
_TOKEN = _event(_chunk({"content": " tok"}, None))
_LAST = _event(_chunk({}, "stop"))
_USAGE = _event(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": 200, "total_tokens": 212},
    }
)
_DONE = _event("[DONE]") + b"0\r\n\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parse requests with httptools, answer canned replies."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.stream = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.stream = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        if b'"stream":true' in body or b'"stream": true' in body:
            self.stream = True

    def on_message_complete(self) -> None:
        parts = self.url.split(b"/")  # b"", b"b", latency, chunks, b"v1", ...
        if len(parts) < 5 or parts[1] != b"b":
            self._write(_NOT_FOUND)
            return
        latency = int(parts[2]) / 1000.0
        chunks = int(parts[3])
        stream = self.stream
        if latency:
            asyncio.get_running_loop().call_later(latency, self._reply, stream, chunks)
        else:
            self._reply(stream, chunks)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _reply(self, stream: bool, chunks: int) -> None:
        if not stream:
            self._write(_JSON_REPLY)
            return
        # One write per event: each reaches the client as its own TCP segment, as a
        # model's tokens do, rather than in one block the client parses at once.
        self._write(_STREAM_HEAD + _FIRST)
        for _ in range(chunks):
            self._write(_TOKEN)
        self._write(_LAST)
        self._write(_USAGE)
        self._write(_DONE)


async def serve(port: int) -> None:
    """Serve on 127.0.0.1 until killed; print the bound port first."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, "127.0.0.1", port, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if uvloop is not None:
        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    sys.exit(main())
