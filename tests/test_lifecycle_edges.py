"""Lifecycle edge cases: waits that stream_idle must not count, deadlines a caller moves,
compressed streams, error events settled as statuses, proxies from the environment."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import trio_llm

USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def _chunk(choices: list[Any], **extra: Any) -> bytes:
    payload = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + json.dumps({**payload, "choices": choices, **extra}).encode() + b"\n\n"


SSE_BODY = (
    _chunk([{"index": 0, "delta": {"role": "assistant", "content": "ok"}}])
    + _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    + _chunk([], usage=USAGE)
    + b"data: [DONE]\n\n"
)

CHAT_BODY = json.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": USAGE,
    }
).encode()


def http_reply(
    body: bytes, *, status: int = 200, kind: bytes = b"application/json", extra: bytes = b""
) -> bytes:
    return (
        b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
        % (status, kind, len(body), extra)
        + body
    )


Handler = Callable[[trio.SocketStream, dict[str, Any], dict[bytes, bytes]], Awaitable[bool]]


async def _read_request(
    stream: trio.SocketStream, buffer: bytes
) -> tuple[dict[str, Any], dict[bytes, bytes], bytes] | None:
    while b"\r\n\r\n" not in buffer:
        incoming = await stream.receive_some(65536)
        if not incoming:
            return None
        buffer += incoming
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    headers: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    while len(buffer) < length:
        buffer += await stream.receive_some(65536)
    body, buffer = buffer[:length], buffer[length:]
    return json.loads(body or b"{}"), headers, buffer


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """A raw HTTP/1.1 server on 127.0.0.1; ``handler`` answers each request (False: stop)."""

    async def connection(stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            request = await _read_request(stream, buffer)
            if request is None:
                return
            body, headers, buffer = request
            if not await handler(stream, body, headers):
                return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1"
        nursery.cancel_scope.cancel()


async def answer_ok(stream: trio.SocketStream, body: dict[str, Any], _h: Any) -> bool:
    if body.get("stream"):
        await stream.send_all(http_reply(SSE_BODY, kind=b"text/event-stream"))
    else:
        await stream.send_all(http_reply(CHAT_BODY))
    return True


async def stall(stream: trio.SocketStream, body: dict[str, Any], _h: Any) -> bool:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def read_stream(client: trio_llm.Client) -> trio_llm.ChatResponse:
    async with client.stream("hi") as stream:
        async for _ in stream:
            pass
    return stream.response


async def test_stream_idle_does_not_cover_the_wait_for_a_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A stream queued behind another for a concurrency slot is not failed by stream_idle."""
    timeouts = trio_llm.Timeouts(stream_idle=2.0)
    async with (
        serving(answer_ok) as url,
        trio_llm.open_client(
            base_url=url, model="m", max_concurrency=1, timeouts=timeouts, retry=None
        ) as client,
    ):
        replies: list[trio_llm.ChatResponse] = []

        async def hold_slot() -> None:
            async with client.stream("hi") as stream:
                async for _ in stream:
                    pass
                await trio.sleep(5.0)  # the consumer is busy; the slot stays taken

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_slot)
            await trio.testing.wait_all_tasks_blocked()
            replies.append(await read_stream(client))
    assert replies[0].text == "ok"


async def test_stream_idle_does_not_cover_the_wait_for_the_rate_limiter(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A stream waiting for rate-limit capacity is sent once it has it, whatever stream_idle."""
    timeouts = trio_llm.Timeouts(stream_idle=2.0)
    limit = trio_llm.RateLimit(requests_per_minute=1)
    async with (
        serving(answer_ok) as url,
        trio_llm.open_client(
            base_url=url, model="m", rate_limit=limit, timeouts=timeouts, retry=None
        ) as client,
    ):
        await read_stream(client)
        start = trio.current_time()
        reply = await read_stream(client)  # waits ~60 s for the limiter, then is sent
        assert trio.current_time() - start == pytest.approx(60.0, abs=1.0)
        assert client.statistics().failed == 0
    assert reply.text == "ok"


@pytest.mark.parametrize("stream", [False, True])
async def test_read_timeout_holds_when_the_callers_deadline_moves_later(
    stream: bool, autojump_clock: trio.abc.Clock
) -> None:
    """Timeouts.read still fires when the caller's scope, earlier at first, is moved later."""
    timeouts = trio_llm.Timeouts(read=5.0, stream_idle=None)
    async with (
        serving(stall) as url,
        trio_llm.open_client(base_url=url, model="m", timeouts=timeouts, retry=None) as client,
    ):
        start = trio.current_time()
        with trio.move_on_after(60.0):  # the test's guard
            with trio.CancelScope(deadline=start + 2.0) as scope:

                async def extend() -> None:
                    await trio.sleep(1.0)
                    scope.deadline = start + 1000.0  # e.g. a watchdog granting more time

                call = partial(read_stream, client) if stream else partial(client.chat, "hi")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(extend)
                    with pytest.raises(trio_llm.APITimeoutError):
                        await call()
        assert trio.current_time() - start == pytest.approx(5.0)


async def test_gzip_encoded_stream_is_decoded() -> None:
    """A stream the server sends gzip-encoded anyway is decoded, as a gzip chat reply is."""

    async def gzipped(stream: trio.SocketStream, body: dict[str, Any], _h: Any) -> bool:
        payload = gzip.compress(SSE_BODY if body.get("stream") else CHAT_BODY)
        kind = b"text/event-stream" if body.get("stream") else b"application/json"
        await stream.send_all(http_reply(payload, kind=kind, extra=b"content-encoding: gzip\r\n"))
        return True

    async with (
        serving(gzipped) as url,
        trio_llm.open_client(base_url=url, model="m", retry=None) as client,
    ):
        assert (await client.chat("hi")).text == "ok"
        assert (await read_stream(client)).text == "ok"


@pytest.mark.parametrize("shape", ["status", "event"])
async def test_error_before_the_reply_settles_alike_as_status_or_event(
    shape: str, autojump_clock: trio.abc.Clock
) -> None:
    """A 500 sent as an error event before the reply costs no tokens, as an HTTP 500 does."""
    replies = []

    async def fail_then_answer(stream: trio.SocketStream, body: dict[str, Any], h: Any) -> bool:
        replies.append(body)
        if len(replies) > 1:
            return await answer_ok(stream, body, h)
        error = {"error": {"message": "boom", "type": "server_error"}}
        if shape == "status":
            await stream.send_all(http_reply(json.dumps(error).encode(), status=500))
        else:
            event = b"data: " + json.dumps(error).encode() + b"\n\n"
            await stream.send_all(http_reply(event, kind=b"text/event-stream"))
        return True

    limit = trio_llm.RateLimit(requests_per_minute=100, tokens_per_minute=100_000)
    policy = trio_llm.RetryPolicy(attempts=2, wait_initial=0.0, wait_jitter=0.0)
    async with (
        serving(fail_then_answer) as url,
        trio_llm.open_client(base_url=url, model="m", rate_limit=limit, retry=policy) as client,
    ):
        reply = await read_stream(client)
        assert client._rate is not None
        tokens = client._rate.statistics().tokens_available
        stats = client.statistics()
    assert reply.text == "ok"
    assert (stats.sent, stats.retried, stats.succeeded, stats.failed) == (2, 1, 1, 0)
    assert tokens == pytest.approx(100_000 - 4)  # only the reply's usage is charged


async def test_environment_proxy_is_used_with_the_default_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With HTTP_PROXY set, requests go through the proxy (docs/performance.md says so)."""
    seen: list[dict[bytes, bytes]] = []

    async def proxy(stream: trio.SocketStream, body: dict[str, Any], h: Any) -> bool:
        seen.append(h)
        return await answer_ok(stream, body, h)

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    async with serving(proxy) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url.removesuffix("/v1"))
        # Nothing listens there: only the proxy can answer.
        async with trio_llm.open_client(
            base_url="http://127.0.0.2:9/v1", model="m", retry=None
        ) as client:
            reply = await client.chat("hi")
    assert reply.text == "ok"
    assert seen  # the proxy saw the request
