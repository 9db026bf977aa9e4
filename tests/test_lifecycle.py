"""The request lifecycle, one test per behaviour, each run for ``chat`` and ``stream`` alike.

``chat`` and ``stream`` share one lifecycle (``trio_llm._attempt``): these tests keep them
from drifting apart again. A raw HTTP/1.1 server on 127.0.0.1 plays scripted replies in
either provider's wire format, so each test controls every header the client sees.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx2
import pytest
import trio
import trio.testing

import trio_llm
from trio_llm._sending import direct_transport_for, environment_proxy_for

Mode = str  # "chat" or "stream"
MODES = ["chat", "stream"]
PROVIDERS = ["openai", "anthropic"]

# The request id header each provider sends.
REQUEST_ID_HEADER = {"openai": b"x-request-id", "anthropic": b"request-id"}
USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


def _chunk(choices: list[Any], **extra: Any) -> bytes:
    payload = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + json.dumps({**payload, "choices": choices, **extra}).encode() + b"\n\n"


def openai_body(stream: bool) -> bytes:
    if not stream:
        message = {"role": "assistant", "content": "ok"}
        return json.dumps(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": USAGE,
            }
        ).encode()
    return (
        _chunk([{"index": 0, "delta": {"role": "assistant", "content": "ok"}}])
        + _chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        + _chunk([], usage=USAGE)
        + b"data: [DONE]\n\n"
    )


def _event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def anthropic_body(stream: bool) -> bytes:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m"}
    if not stream:
        return json.dumps(
            {
                **message,
                "content": [{"type": "text", "text": "ok"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 3, "output_tokens": 1},
            }
        ).encode()
    start = {**message, "content": [], "usage": {"input_tokens": 3, "output_tokens": 0}}
    return (
        _event("message_start", message=start)
        + _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        + _event("content_block_delta", index=0, delta={"type": "text_delta", "text": "ok"})
        + _event("content_block_stop", index=0)
        + _event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 1})
        + _event("message_stop")
    )


def reply(
    provider: str, stream: bool, *, status: int = 200, headers: dict[bytes, bytes] | None = None
) -> bytes:
    """A whole HTTP response: the provider's success body (or an error body for >= 400)."""
    if status >= 400:
        body = json.dumps({"error": {"message": f"scripted {status}", "type": "x"}}).encode()
        kind = b"application/json"
    elif stream:
        body = (openai_body if provider == "openai" else anthropic_body)(True)
        kind = b"text/event-stream"
    else:
        body = (openai_body if provider == "openai" else anthropic_body)(False)
        kind = b"application/json"
    head = [b"HTTP/1.1 %d X" % status, b"content-type: " + kind, b"content-length: %d" % len(body)]
    head += [name + b": " + value for name, value in (headers or {}).items()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


Responder = Callable[[dict[str, Any]], bytes | None]  # request body -> response (None: stall)


class Server:
    """Answers each request with the next responder's bytes; records request times."""

    def __init__(self, *responders: Responder) -> None:
        self._responders = list(responders)
        self.times: list[float] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                incoming = await stream.receive_some(65536)
                if not incoming:
                    return
                data += incoming
            head, _, data = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(data) < length:
                data += await stream.receive_some(65536)
            body, data = data[:length], data[length:]
            self.times.append(trio.current_time())
            responder = (
                self._responders.pop(0) if len(self._responders) > 1 else self._responders[0]
            )
            response = responder(json.loads(body))
            if response is None:
                await trio.sleep_forever()
            await stream.send_all(response)


@asynccontextmanager
async def serving(server: Server) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def answer(provider: str, **options: Any) -> Responder:
    """A responder that answers in the request's own shape (streamed or not)."""
    return lambda body: reply(provider, bool(body.get("stream")), **options)


@asynccontextmanager
async def client_for(
    server: Server, provider: str = "openai", **options: Any
) -> AsyncIterator[trio_llm.Client]:
    async with serving(server) as root:
        base_url = root + "/v1" if provider == "openai" else root
        options.setdefault("retry", None)
        async with trio_llm.open_client(
            base_url=base_url, model="m", provider=provider, **options
        ) as client:
            yield client


async def call(client: trio_llm.Client, mode: Mode, **options: Any) -> trio_llm.ChatResponse:
    """Make one call by ``mode``; return its reply (a stream read to its end)."""
    if mode == "chat":
        return await client.chat("hi", **options)
    async with client.stream("hi", **options) as stream:
        async for _ in stream:
            pass
    return stream.response


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
async def test_request_id_comes_from_the_provider_header(mode: Mode, provider: str) -> None:
    """A reply carries the request id its provider's header names (and so does an error)."""
    header = REQUEST_ID_HEADER[provider]
    server = Server(
        answer(provider, headers={header: b"req_ok"}),
        answer(provider, status=400, headers={header: b"req_bad"}),
    )
    async with client_for(server, provider) as client:
        reply = await call(client, mode)
        with pytest.raises(trio_llm.BadRequestError) as caught:
            await call(client, mode)
    assert reply.text == "ok"
    assert reply.request_id == "req_ok"
    assert caught.value.request_id == "req_bad"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
async def test_usage_settles_the_reservation(
    mode: Mode, provider: str, autojump_clock: trio.abc.Clock
) -> None:
    """The tokens charged are the reply's usage, not the estimate; nothing stays in flight."""
    limit = trio_llm.RateLimit(tokens_per_minute=100_000, requests_per_minute=100)
    async with client_for(Server(answer(provider)), provider, rate_limit=limit) as client:
        reply = await call(client, mode)
        assert client._rate is not None
        limits = client._rate.statistics()
        stats = client.statistics()
    assert reply.usage.total_tokens == 4
    assert limits.tokens_available == pytest.approx(100_000 - 4)
    assert limits.requests_available == pytest.approx(99)
    assert (client._rate._in_flight_requests, client._rate._in_flight_tokens) == (0, 0)
    assert (stats.prompt_tokens, stats.completion_tokens) == (3, 1)


@pytest.mark.parametrize("mode", MODES)
async def test_429_refunds_then_pauses_every_task(
    mode: Mode, autojump_clock: trio.abc.Clock
) -> None:
    """A 429 gives its reservation back and pauses the whole client for its retry-after."""
    limit = trio_llm.RateLimit(requests_per_minute=6)  # refills 0.1 per second
    policy = trio_llm.RetryPolicy(attempts=2, wait_initial=0.0, wait_jitter=0.0)
    server = Server(answer("openai", status=429, headers={b"retry-after": b"7"}), answer("openai"))
    async with client_for(server, rate_limit=limit, retry=policy) as client:
        start = trio.current_time()
        await call(client, mode)
        assert client._rate is not None
        limits = client._rate.statistics()
        stats = client.statistics()
    assert server.times[1] - server.times[0] == pytest.approx(7.0)
    assert trio.current_time() - start == pytest.approx(7.0)
    # Starting full (6): the 429's request was refunded (6 again, nothing to refill in the
    # pause), then the retry took one. Without the refund: 5 + 0.7 - 1.
    assert limits.requests_available == pytest.approx(5.0)
    assert (stats.sent, stats.rate_limited, stats.retried, stats.succeeded) == (2, 1, 1, 1)


@pytest.mark.parametrize("mode", MODES)
async def test_deadline_is_one_scope_over_every_attempt(
    mode: Mode, autojump_clock: trio.abc.Clock
) -> None:
    """The deadline ends a stalled attempt at the deadline exactly, saying what it waited for."""
    policy = trio_llm.RetryPolicy(deadline=5.0)
    server = Server(answer("openai", status=503), lambda body: None)
    async with client_for(server, retry=policy) as client:
        start = trio.current_time()
        with pytest.raises(trio_llm.RetryDeadlineExceeded) as caught:
            await call(client, mode)
        assert trio.current_time() - start == pytest.approx(5.0)
        stats = client.statistics()
    assert isinstance(caught.value.__cause__, trio_llm.ServerError)
    assert caught.value.attempts == 2
    assert (stats.in_flight, stats.sent, stats.retried, stats.failed) == (0, 2, 1, 1)


@pytest.mark.parametrize("mode", MODES)
async def test_deadline_while_waiting_for_a_slot_says_so(
    mode: Mode, autojump_clock: trio.abc.Clock
) -> None:
    """A call queued behind a stalled one fails at its deadline, naming the slot it awaited."""
    async with client_for(Server(lambda body: None), max_concurrency=1) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(call, client, mode))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio_llm.RetryDeadlineExceeded, match="a concurrency slot"):
                await call(client, mode, retry=trio_llm.RetryPolicy(deadline=3.0))
            nursery.cancel_scope.cancel()
        assert client.statistics().sent == 1


@pytest.mark.parametrize("mode", MODES)
async def test_cancellation_leaves_nothing_held(mode: Mode, autojump_clock: trio.abc.Clock) -> None:
    """A call cancelled in flight holds no slot and no reservation, and counts as no outcome."""
    limit = trio_llm.RateLimit(requests_per_minute=6, tokens_per_minute=100_000)
    async with client_for(Server(lambda body: None), rate_limit=limit) as client:
        with trio.move_on_after(1.0):
            await call(client, mode)
        stats = client.statistics()
        rate = client._rate
        assert rate is not None
        limits = rate.statistics()
    assert (stats.in_flight, stats.sent, stats.succeeded, stats.failed) == (0, 1, 0, 0)
    assert (rate._in_flight_requests, rate._in_flight_tokens) == (0, 0)
    # Refunded: full again (without the refund, 5 + 0.1 after a second).
    assert limits.requests_available == pytest.approx(6.0)
    assert limits.tokens_available == pytest.approx(100_000)


@pytest.mark.parametrize("mode", MODES)
async def test_statistics_count_alike(mode: Mode, autojump_clock: trio.abc.Clock) -> None:
    """sent, retried, succeeded, failed and tokens count the same for chat and stream."""
    policy = trio_llm.RetryPolicy(attempts=2, wait_initial=0.0, wait_jitter=0.0)
    server = Server(answer("openai", status=500), answer("openai"), answer("openai", status=400))
    async with client_for(server, retry=policy) as client:
        await call(client, mode)
        with pytest.raises(trio_llm.BadRequestError):
            await call(client, mode)
        stats = client.statistics()
    assert (stats.sent, stats.retried, stats.succeeded, stats.failed) == (3, 1, 1, 1)
    assert (stats.prompt_tokens, stats.completion_tokens, stats.rate_limited) == (3, 1, 0)
    assert (stats.in_flight, stats.waiting) == (0, 0)


async def test_stream_and_chat_share_the_transport_path() -> None:
    """A stream goes through the client's own transport, reusing chat's pooled connection."""
    async with client_for(Server(answer("openai"))) as client:
        transport = client._direct
        assert isinstance(transport, trio_llm.TrioTransport)
        for mode in ["chat", "stream", "chat", "stream"]:
            await call(client, mode)
        (connections, idle, waiting), *_ = transport._statistics().values()
    assert (connections, idle, waiting) == (1, 1, 0)


def test_direct_path_only_for_own_transport_without_credentials() -> None:
    """Requests skip httpx2's client layer only on TrioTransport, and never with userinfo."""
    own = trio_llm.TrioTransport()
    url = "http://api.example.com/v1"
    assert direct_transport_for(own, url) is own
    assert direct_transport_for(httpx2.AsyncHTTPTransport(), url) is None
    assert direct_transport_for(None, url) is None
    assert direct_transport_for(own, "http://user:pw@api.example.com/v1") is None


def test_environment_proxy_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy variable for the URL's scheme applies, unless NO_PROXY names the host."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    url = "http://api.example.com/v1"
    assert not environment_proxy_for(url)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.com:3128")
    assert environment_proxy_for(url)
    assert not environment_proxy_for("https://api.example.com/v1")  # only http proxied
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert not environment_proxy_for(url)


def stream_reply(body: bytes) -> bytes:
    """A 200 event-stream response with ``body`` as its events."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


def overloaded_stream(provider: str, kind: str) -> bytes:
    """A stream that starts (framing only) and then reports an error of ``kind``."""
    if provider == "anthropic":
        start = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m"}
        framing = _event("message_start", message={**start, "content": [], "usage": {}})
        error = _event("error", error={"type": kind, "message": "Overloaded"})
    else:
        framing = _chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        error = b"data: " + json.dumps({"error": {"message": "Overloaded", "type": kind}}).encode()
        error += b"\n\n"
    return stream_reply(framing + error)


@pytest.mark.parametrize(
    ("provider", "kind"), [("anthropic", "overloaded_error"), ("openai", "server_error")]
)
async def test_an_error_event_before_the_reply_is_retried(
    provider: str, kind: str, autojump_clock: trio.abc.Clock
) -> None:
    """An error event before any content is retried as its status; no chunk of it leaks."""
    policy = trio_llm.RetryPolicy(attempts=2, wait_initial=0.0, wait_jitter=0.0)
    server = Server(lambda body: overloaded_stream(provider, kind), answer(provider))
    async with client_for(server, provider, retry=policy) as client:
        async with client.stream("hi") as stream:
            texts = [chunk.text async for chunk in stream]
        stats = client.statistics()
    assert "".join(texts) == "ok"
    assert stream.response.text == "ok"
    assert len(server.times) == 2
    assert (stats.sent, stats.retried, stats.succeeded, stats.failed) == (2, 1, 1, 0)


async def test_an_invalid_request_error_event_is_not_retried(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An error event that stands for a 400 raises BadRequestError at once."""
    policy = trio_llm.RetryPolicy(attempts=3, wait_initial=0.0, wait_jitter=0.0)
    server = Server(lambda body: overloaded_stream("anthropic", "invalid_request_error"))
    async with client_for(server, "anthropic", retry=policy) as client:
        with pytest.raises(trio_llm.BadRequestError, match="Overloaded"):
            async with client.stream("hi"):
                pass
    assert len(server.times) == 1


def endless_chunked(body: dict[str, Any]) -> bytes:
    """A chunked reply that keeps sending (here: far past any small limit)."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return head + b"400\r\n" + b"x" * 1024 + b"\r\n" + (b"400\r\n" + b"y" * 1024 + b"\r\n") * 64


def declared_huge(body: dict[str, Any]) -> bytes:
    """A reply that declares a body of 10 GB."""
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10000000000\r\n\r\n{"
    )


# Left mid-body, httpx2's own transport leaves httpcore2's body generator to the garbage
# collector (a ResourceWarning; see test_transport.py::test_break_while_the_reader_waits).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("own_transport", [True, False], ids=["own", "httpx2"])
@pytest.mark.parametrize("responder", [endless_chunked, declared_huge])
async def test_a_body_past_max_response_bytes_fails_the_call(
    responder: Responder, own_transport: bool
) -> None:
    """A reply larger than max_response_bytes fails at once with APIResponseError."""
    transport = None if own_transport else httpx2.AsyncHTTPTransport()
    timeouts = trio_llm.Timeouts(read=5.0)
    async with client_for(
        Server(responder), max_response_bytes=4096, transport=transport, timeouts=timeouts
    ) as client:
        with pytest.raises(trio_llm.APIResponseError, match="4,096-byte limit"):
            await client.chat("hi")
        assert client.statistics().in_flight == 0


async def test_a_stream_event_past_max_response_bytes_fails_the_stream() -> None:
    """One event larger than max_response_bytes ends the stream with an error."""
    huge = _chunk([{"index": 0, "delta": {"content": "z" * 10_000}}])
    server = Server(lambda body: stream_reply(huge))
    async with client_for(server, max_response_bytes=4096) as client:
        with pytest.raises(trio_llm.APIResponseError, match="4096"):
            async with client.stream("hi"):
                pass


def test_max_response_bytes_must_be_positive() -> None:
    """A size limit of 0 or a non-int is refused when the client opens."""
    for bad in (0, -1, 1.5, True):
        with pytest.raises(trio_llm.ConfigurationError, match="max_response_bytes"):
            trio.run(_open_with_limit, bad)


async def _open_with_limit(limit: Any) -> None:
    async with trio_llm.open_client(base_url="http://127.0.0.1:9/v1", max_response_bytes=limit):
        pass


async def test_phase_timeouts_that_cannot_fire_before_the_deadline_are_left_out() -> None:
    """Only phase limits shorter than what is left of the call's deadline reach the transport."""
    async with trio_llm.open_client(base_url="http://127.0.0.1:9/v1", model="m") as client:
        limits_before = client._requester._limits.before
        now = trio.current_time()
        defaults = trio_llm.Timeouts()  # connect 10, read 120, write 30, pool 60
        within_120 = limits_before(now + 120.0)
        assert (within_120.connect, within_120.write, within_120.pool) == (10.0, 30.0, 60.0)
        assert within_120.read is None  # a read timeout of 120 s cannot fire first
        within_20 = limits_before(now + 20.0)
        assert (within_20.connect, within_20.read, within_20.write, within_20.pool) == (
            defaults.connect,
            None,
            None,
            None,
        )
        assert limits_before(now + 1000.0).read == defaults.read
