"""The fake server's HTTP/1.1 side: one ``h11`` state machine per connection, on trio sockets.

Each connection is one task: read a request (head and body), let ``App`` decide the reply,
then send it. A reply that waits (latency, generation pace, a stall) or streams runs next to
a reader task that watches the socket, so a client that leaves is noticed at once and its
handler cancelled; bytes that reader sees (a pipelined next request) go to ``h11`` for the
next cycle. Replies sent at once skip the reader: a failed write tells the same story.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from http import HTTPStatus
from typing import Any, final

import h11
import trio

from ._app import MESSAGES, App, Reply, body_limit, endpoint_of
from ._batch_store import RouteHold
from ._config import FakeLLMConfig
from ._stats import FakeLLMStats

logger = logging.getLogger("trio_llm.testing")

_MAX_HEAD = 64 * 1024
_RECEIVE_SIZE = 64 * 1024
_MAX_BUFFERED = 1024 * 1024
_DRAIN_SECONDS = 1.0
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


@final
class FakeLLMServer:
    """A running fake LLM server.

    Attributes:
        config: The behaviour; replace it (``attrs.evolve``) to change a running server.
            Each request reads it once, when it arrives.
        host: The address the server listens on.
        port: The port it listens on.
        stats: Live counters of what the server did.
    """

    def __init__(self, config: FakeLLMConfig, *, host: str, port: int) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.stats = FakeLLMStats()
        self._app = App(self)

    def hold(self, route: str, *, partial: float | None = None) -> RouteHold:
        """Hold the answers of one route until ``release()`` (for crash and resume tests).

        ``route`` is ``"METHOD /template"``, the template as counted in
        ``stats.requests_by_endpoint``: ``"POST /v1/batches"``, ``"POST /v1/files"``,
        ``"GET /v1/files/{file_id}/content"``, ``"POST /v1/messages/batches"``... A held
        request has had its effect (the batch exists); only its answer waits, after sending
        its head and ``partial`` of its body when given (whole lines). ``await
        hold.wait_arrived()`` waits for one to arrive.

        Raises:
            ValueError: The route is unknown or already held, or ``partial`` is not in [0, 1).
        """
        return self._app.batches.hold(route, partial)

    @property
    def openai_batches(self) -> list[dict[str, Any]]:
        """The OpenAI batch objects, oldest first, as ``GET /v1/batches/{id}`` shows them."""
        return [batch.to_json() for batch in self._app.batches.batches.values()]

    @property
    def message_batches(self) -> list[dict[str, Any]]:
        """The Anthropic message batch objects, oldest first, as their retrieve shows them."""
        return [
            batch.to_json(self.root_url) for batch in self._app.batches.message_batches.values()
        ]

    @property
    def root_url(self) -> str:
        """The server's URL without ``/v1`` (the base URL Anthropic clients expect)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in ``/v1``."""
        return self.root_url + "/v1"

    def __repr__(self) -> str:
        return f"<FakeLLMServer {self.base_url}>"


class _Exchange:
    """One connection: its h11 state and what happened to the current request."""

    __slots__ = ("abort", "complete", "conn", "gone", "server", "status", "stream")

    def __init__(self, server: FakeLLMServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self.gone = False
        self.abort = False
        self.complete = False
        self.status: int | None = None

    def _bytes(self, event: h11.Response | h11.Data | h11.EndOfMessage) -> bytes:
        data = self.conn.send(event)
        assert data is not None
        return data

    def _head(self, reply: Reply, headers: list[tuple[bytes, bytes]]) -> bytes:
        self.status = status = reply.status
        by_status = self.server.stats.requests_by_status
        by_status[status] = by_status.get(status, 0) + 1
        response = h11.Response(
            status_code=status, headers=headers, reason=_REASONS.get(status, b"")
        )
        return self._bytes(response)

    async def next_event(self) -> object:
        """Return the next h11 event, reading from the socket as needed."""
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await self.stream.receive_some(_RECEIVE_SIZE))

    async def run(self) -> None:
        """Serve requests until the connection closes or cannot be reused."""
        conn = self.conn
        while True:
            event = await self.next_event()
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed: the client is done
            if not await self.exchange(event):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def exchange(self, request: h11.Request) -> bool:
        """Answer one request; return whether the connection may serve another."""
        server = self.server
        stats = server.stats
        started = trio.current_time()
        path, endpoint = endpoint_of(request.target)
        stats.total_requests += 1
        stats.requests_by_endpoint[endpoint] = stats.requests_by_endpoint.get(endpoint, 0) + 1
        stats.in_flight += 1
        stats.peak_concurrency = max(stats.peak_concurrency, stats.in_flight)
        self.gone = self.abort = self.complete = False
        self.status = None
        fault: str | None = None
        try:
            limit = body_limit(endpoint)
            body = await self._read_body(request, limit)
            if body is None:
                reply = server._app.error(
                    server.config,
                    413,
                    f"Request body too large (limit {limit} bytes).",
                    anthropic=endpoint == MESSAGES,
                )
                reply.headers.append((b"connection", b"close"))
                await self._send_whole(reply)
                await self._drain()
                return False
            reply = server._app.handle(request.method, request.target, request.headers, body)
            fault = reply.fault
            if reply.immediate:
                await self._send_whole(reply)
            else:
                await self._deliver(reply)
            if self.abort:
                stats.injected_disconnects += 1
                return False
            if self.gone:
                stats.disconnects += 1
                return False
            if reply.status == 200:
                stats.prompt_tokens += reply.prompt_tokens
                stats.completion_tokens += reply.completion_tokens
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.gone = True
            stats.disconnects += 1
            return False
        finally:
            stats.in_flight -= 1
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "%s %s %s %.1fms%s%s",
                    request.method.decode("latin-1"),
                    path,
                    self.status if self.status is not None else "-",
                    (trio.current_time() - started) * 1000,
                    f" fault={fault}" if fault else "",
                    " client-gone" if self.gone else "",
                )

    async def _read_body(self, request: h11.Request, limit: int) -> bytes | None:
        """Read the request body; None when it is larger than ``limit`` bytes."""
        for name, value in request.headers:
            if name == b"content-length" and int(value) > limit:
                return None
        if self.conn.they_are_waiting_for_100_continue:
            continue_ = h11.InformationalResponse(status_code=100, headers=[])
            await self.stream.send_all(self.conn.send(continue_) or b"")
        parts: list[bytes] = []
        size = 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    return None
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise h11.RemoteProtocolError("request body ended unexpectedly")

    async def _drain(self) -> None:
        """Half-close, then discard what the client still sends for a while.

        Closing a socket with unread data makes the kernel reset the connection, and a
        reset can destroy the response before the client reads it.
        """
        await self.stream.send_eof()
        with trio.move_on_after(_DRAIN_SECONDS):
            while await self.stream.receive_some(_RECEIVE_SIZE):
                pass

    async def _send_whole(self, reply: Reply) -> None:
        body = reply.body
        headers = [*reply.headers, (b"content-length", str(len(body)).encode())]
        data = self._head(reply, headers)
        if body:
            data += self._bytes(h11.Data(data=body))
        data += self._bytes(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def _deliver(self, reply: Reply) -> None:
        """Act out a reply that waits or streams, while watching for the client leaving."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, nursery.cancel_scope)
            try:
                await self._act(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.gone = True
            nursery.cancel_scope.cancel()

    async def _watch(self, scope: trio.CancelScope) -> None:
        """Read until the client closes; then mark it gone and cancel the handler."""
        try:
            while True:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    break
                self.conn.receive_data(data)
                if len(self.conn.trailing_data[0]) > _MAX_BUFFERED:
                    # A client that floods us while we answer: stop reading, keep answering.
                    await trio.sleep_forever()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if not self.complete:  # a client may read its whole answer and leave at once
            self.gone = True
            scope.cancel()

    async def _send_held(self, reply: Reply, hold: RouteHold) -> None:
        """Send the head and part of the body (whole lines), wait for the hold, then the rest."""
        body = reply.body
        assert hold.partial is not None
        cut = body.rfind(b"\n", 0, int(len(body) * hold.partial)) + 1
        headers = [*reply.headers, (b"content-length", str(len(body)).encode())]
        data = self._head(reply, headers)
        if cut:
            data += self._bytes(h11.Data(data=body[:cut]))
        await self.stream.send_all(data)
        await hold.pass_through()
        data = self._bytes(h11.Data(data=body[cut:])) if cut < len(body) else b""
        await self.stream.send_all(data + self._bytes(h11.EndOfMessage()))
        self.complete = True

    async def _act(self, reply: Reply) -> None:
        stream = self.stream
        events = reply.events
        if reply.stall:
            await trio.sleep_forever()
        if reply.latency:
            await trio.sleep(reply.latency)
        if reply.hold is not None:
            if reply.hold.partial is not None and events is None:
                await self._send_held(reply, reply.hold)
                return
            await reply.hold.pass_through()
        if events is None:
            if reply.generation:
                await trio.sleep(reply.generation)
            if not reply.disconnect:
                await self._send_whole(reply)
                self.complete = True
                return
            body = reply.body
            headers = [*reply.headers, (b"content-length", str(len(body)).encode())]
            data = self._head(reply, headers) + self._bytes(h11.Data(data=body[: len(body) // 2]))
            await stream.send_all(data)
            self.abort = True
            return
        await stream.send_all(self._head(reply, reply.headers))
        cut = max(1, len(events) // 2) if reply.disconnect else len(events)
        for pause, event in events[:cut]:
            if pause:
                await trio.sleep(pause)
            await stream.send_all(self._bytes(h11.Data(data=event)))
        if reply.disconnect:
            self.abort = True
            return
        await stream.send_all(self._bytes(h11.EndOfMessage()))
        self.complete = True

    async def reject(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a malformed request with 400 (or h11's hint) and give up the connection."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint
        reply = self.server._app.error(
            self.server.config, status, f"Malformed HTTP request: {exc}", anthropic=False
        )
        reply.headers.append((b"connection", b"close"))
        logger.info("malformed request: %s %s", status, exc)
        try:
            await self._send_whole(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass


async def _serve_connection(server: FakeLLMServer, stream: trio.SocketStream) -> None:
    exchange = _Exchange(server, stream)
    try:
        await exchange.run()
    except h11.RemoteProtocolError as exc:
        await exchange.reject(exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        # One broken connection must not take the server down; the traceback is the report.
        logger.exception("fake LLM server: unexpected error; closing the connection")
    finally:
        await trio.aclose_forcefully(stream)


async def serve_fake_llm(
    config: FakeLLMConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[FakeLLMServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a fake LLM server until cancelled.

    Use it with ``await nursery.start(serve_fake_llm, config)``, which returns the
    ``FakeLLMServer`` once it is listening (``port=0`` picks a free port).

    Args:
        config: The server's behaviour (default: ``FakeLLMConfig()``, no faults).
        host: The address to listen on (an IP address, or a name that resolves to one).
        port: The port to listen on; 0 picks a free one.
        task_status: Reports the ``FakeLLMServer`` once listening.

    Raises:
        ValueError: ``port`` is outside 0-65535.

    Cancellation stops the server: the listening socket and every connection are closed and
    every connection task has finished when this returns.
    """
    if not 0 <= port <= 65535:
        # The address lookup would wrap it (70000 listens on 4464).
        raise ValueError(f"port must be 0 to 65535, not {port}")
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0:
        # A name like "localhost" may give one socket per address family, each with its
        # own free port: keep the first, the one the server reports.
        for extra in listeners[1:]:
            await trio.aclose_forcefully(extra)
        del listeners[1:]
    try:
        bound_port = listeners[0].socket.getsockname()[1]
        server = FakeLLMServer(config or FakeLLMConfig(), host=host, port=bound_port)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    trio.serve_listeners,
                    partial(_serve_connection, server),
                    listeners,
                    handler_nursery=nursery,
                )
            )
            server._app.batches.nursery = nursery
            task_status.started(server)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


@asynccontextmanager
async def open_fake_llm(
    config: FakeLLMConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[FakeLLMServer]:
    """Run a fake LLM server for the duration of an ``async with`` block.

    Args:
        config: The server's behaviour (default: ``FakeLLMConfig()``, no faults).
        host: The address to listen on.
        port: The port to listen on; 0 picks a free one.

    Yields:
        The running server (``server.base_url``, ``server.stats``, ``server.config``).

    Leaving the block (normally, by an exception or by cancellation) stops the server: the
    port is closed and no connection task outlives the block.
    """
    async with trio.open_nursery() as nursery:
        server: FakeLLMServer = await nursery.start(
            partial(serve_fake_llm, config, host=host, port=port)
        )
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
