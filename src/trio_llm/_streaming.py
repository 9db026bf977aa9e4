"""Streamed chat replies: server-sent events through bounded memory channels.

One stream is one request of the client's lifecycle (:mod:`trio_llm._attempt`), read in
two phases:

1. :func:`_open_reader` reads up to the first event. It is part of the attempt, the unit
   the retry policy repeats (:meth:`Requester.call`), and fails with the client's ordinary
   errors (:class:`APIStatusError`, :class:`APIConnectionError`, :class:`APITimeoutError`).
2. :meth:`_StreamReader.pump` decodes the rest, aggregates it and sends each chunk into a
   memory channel. Once the caller may have seen output a failure is a
   :class:`StreamError` carrying the text so far, and nothing is retried.

This module does no HTTP of its own: it reads the exchange the lifecycle opened.
:func:`open_chat_stream` runs the pump in a reader task inside its ``async with`` and hands
the consumer a :class:`ChatStream`; :func:`open_stream_many` runs several streams in
worker tasks that share one channel. In both, the channel holds at most ``_BUFFER`` chunks,
so a slow consumer stops the reader and, through TCP, the server.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias, final

import attrs
import trio

from . import _json
from ._aggregate import Aggregate
from ._attempt import Exchange, Requester
from ._config import RetryPolicy
from ._errors import LLMError, StreamError
from ._fanout import Worker, Workers, open_task_channel
from ._sse import ServerSentEvent, SSEDecodeError, SSEDecoder
from ._types import ChatChunk, ChatResponse, JSONObject, Result
from .providers._base import StreamTranslator

__all__ = [
    "ChatStream",
    "MultiChatStream",
    "StreamItem",
    "StreamStatistics",
    "open_chat_stream",
    "open_stream_many",
]

# Chunks the reader may decode ahead of the consumer. Small, so memory stays bounded and a
# slow consumer is felt by the server at once; not zero, so that a fast consumer takes
# chunks without a task switch each (measured: 1.2-2.5 us per chunk against 7-10 us).
_BUFFER = 8

# How long the body's end may lag [DONE] before the connection is dropped instead.
_DRAIN_GRACE = 1.0

StreamItem: TypeAlias = tuple[int, ChatChunk | Result[ChatResponse]]
"""What :class:`MultiChatStream` yields: ``(index, chunk)``, then ``(index, result)``."""


@final
@attrs.frozen(kw_only=True)
class StreamStatistics:
    """A snapshot of a stream's progress.

    Attributes:
        chunks_received: chunks the reader has decoded, including those waiting in the
            channel for the consumer.
        chunks_delivered: chunks the consumer has taken.
    """

    chunks_received: int
    chunks_delivered: int


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)[:300]
        details = [f"{key}={error[key]}" for key in ("type", "code") if error.get(key)]
        return f"{message} ({', '.join(details)})" if details else str(message)
    return str(error)[:300]


@final
class _StreamReader:
    """A streamed reply past its first event, and the reply being assembled."""

    __slots__ = (
        "_aggregate",
        "_decoder",
        "_events",
        "_exchange",
        "_finished",
        "_idle",
        "_saw_done",
        "_translator",
        "_url",
        "chunks_received",
        "error",
        "response",
    )

    def __init__(
        self,
        exchange: Exchange,
        decoder: SSEDecoder,
        events: list[ServerSentEvent],
        translator: StreamTranslator | None,
        idle: float | None,
    ) -> None:
        self._exchange = exchange
        self._url = exchange.request.url
        self._decoder = decoder
        self._events = events  # decoded by _open_reader, not yet delivered
        self._idle = idle
        self._saw_done = False
        self._finished = trio.Event()  # run() has returned
        self._aggregate = Aggregate()
        # Non-OpenAI events become chunk payloads through it (None for OpenAI's own).
        self._translator = translator
        self.chunks_received = 0
        self.error: StreamError | None = None
        self.response: ChatResponse | None = None

    async def aclose(self) -> None:
        """Close the exchange: its connection (unless read to the end) and its slot."""
        await self._exchange.aclose()

    def _fail(self, message: str, *, error_body: object = None) -> StreamError:
        return StreamError(
            message, text_so_far=self._aggregate.text_so_far(), error_body=error_body
        )

    def prime(self, channel: trio.MemorySendChannel[ChatChunk]) -> None:
        """Buffer the chunks of the first plain events, from the consumer's task.

        So the first chunk reaches the consumer without waiting for the reader task to be
        scheduled (measured: 0.1 to 0.2 ms sooner). Stops at anything the reader must
        handle (``[DONE]``, an error, a malformed event) and when the channel is full.
        """
        if self._translator is not None:
            return  # events of another API: the reader translates them
        room = _BUFFER - channel.statistics().current_buffer_used
        while self._events:
            event = self._events[0]
            if event.event != "message" or event.data[:1] != "{":
                return
            try:
                payload = _json.loads(event.data)
            except ValueError:
                return
            choices = payload.get("choices")  # a dict: the data starts with "{"
            if "error" in payload or not isinstance(choices, list) or len(choices) > room:
                return
            del self._events[0]
            for chunk in self._aggregate.add(payload):
                self.chunks_received += 1
                channel.send_nowait(chunk)
                room -= 1

    async def run(self, channel: trio.MemorySendChannel[ChatChunk]) -> None:
        """Pump into ``channel`` and close it; keep a :class:`StreamError` for the consumer.

        The consumer re-raises the error itself, so the reader's nursery never has one to
        wrap in an ``ExceptionGroup``.
        """
        async with channel:
            try:
                await self.pump(channel, None)
            except StreamError as exc:
                self.error = exc
            # Before closing the channel, so the consumer cannot leave (and cancel us)
            # while httpx2 finishes the body.
            await self.drain()
        self._finished.set()

    async def settle(self) -> None:
        """Give a reader whose reply is complete a moment to read the usage and ``[DONE]``.

        Called when the consumer leaves after the last finish reason, the common
        ``if chunk.finish_reason: break``: the call then counts as succeeded and the
        connection stays in the pool.
        """
        if self._aggregate.finished and not self._finished.is_set():
            with trio.move_on_after(_DRAIN_GRACE):
                await self._finished.wait()

    async def pump(self, channel: trio.MemorySendChannel[Any], index: int | None) -> None:
        """Deliver every chunk into ``channel``, then set :attr:`response`.

        Chunks are sent bare, or as ``(index, chunk)`` when ``index`` is given. Counts the
        outcome in the client's statistics.

        Raises:
            StreamError: an error event, a cut or idle connection, or a malformed event.
        """
        exchange = self._exchange
        try:
            await self._pump(channel, index)
        except StreamError:
            exchange.fail()
            raise
        self.response = self._aggregate.to_response(exchange.request_id)
        exchange.finish(self.response.usage)

    async def _pump(self, channel: trio.MemorySendChannel[Any], index: int | None) -> None:
        idle = self._idle
        # Moving a deadline costs about as much as parsing a chunk, so it moves lazily: at
        # most once per `slack` seconds, to a point at most `slack` past the exact one. The
        # timeout may fire up to 1/16 late, never early.
        slack = 0.0 if idle is None else idle / 16
        events = self._events
        self._events = []
        done = False
        with trio.CancelScope() as idle_scope:
            if idle is not None:
                idle_scope.deadline = trio.current_time() + idle
            if events:
                done = await self._deliver(events, channel, index, idle_scope, idle)
            while not done:
                try:
                    data = await self._exchange.receive_some()
                except LLMError as exc:
                    raise self._fail(
                        f"the stream from POST {self._url} was cut off: {exc}"
                    ) from exc
                if not data:
                    break
                try:
                    events = self._decoder.feed(data)
                except SSEDecodeError as exc:
                    raise self._fail(str(exc)) from exc
                # Reads that bring only keep-alive comments leave the deadline as it is.
                if events:
                    done = await self._deliver(events, channel, index, idle_scope, idle)
                    if idle is not None:
                        now = trio.current_time()
                        if idle_scope.deadline < now + idle:
                            idle_scope.deadline = now + idle + slack
        if idle_scope.cancelled_caught:
            raise self._fail(
                f"no event from POST {self._url} for stream_idle={idle}s; stream abandoned"
            )
        self._saw_done = done
        if not done and not self._aggregate.finished:
            raise self._fail(
                f"the stream from POST {self._url} ended without [DONE] or a finish reason"
            )

    async def _deliver(
        self,
        events: list[ServerSentEvent],
        channel: trio.MemorySendChannel[Any],
        index: int | None,
        idle_scope: trio.CancelScope,
        idle: float | None,
    ) -> bool:
        """Parse and send the chunks of ``events``; return whether ``[DONE]`` came."""
        translator = self._translator
        for event in events:
            data = event.data
            if data == "[DONE]":
                return True
            if not data or (translator is None and event.event not in ("message", "error")):
                continue  # empty pings and event types this API does not define
            try:
                payload = _json.loads(data)
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                raise self._fail(f"malformed event in the stream: {data[:200]!r}")
            error = payload.get("error")
            if error is not None or event.event == "error":
                error = payload if error is None else error
                raise self._fail(
                    f"the server reported an error mid-stream: {_error_message(error)}",
                    error_body=error,
                )
            payloads = (
                (payload,) if translator is None else translator.translate(event.event, payload)
            )
            for translated in payloads:
                for chunk in self._aggregate.add(translated):
                    self.chunks_received += 1
                    item = chunk if index is None else (index, chunk)
                    try:
                        channel.send_nowait(item)
                    except trio.WouldBlock:
                        # Waiting for the consumer is back-pressure, not server idleness.
                        idle_scope.deadline = math.inf
                        await channel.send(item)
                        if idle is not None:
                            idle_scope.deadline = trio.current_time() + idle
            if translator is not None and translator.done:
                return True  # the API's own end of stream (Anthropic's message_stop)
        return False

    async def drain(self) -> None:
        """Read the body's end after ``[DONE]``, so the connection goes back to the pool.

        Does nothing unless :meth:`pump` saw ``[DONE]``.
        """
        if not self._saw_done:
            return
        # Shielded: cancelling httpx2 while it finishes a body leaves its inner generators
        # to the garbage collector (with a ResourceWarning); this is brief and bounded.
        with trio.move_on_after(_DRAIN_GRACE, shield=True):
            try:
                while await self._exchange.receive_some():
                    pass
            except LLMError:
                pass  # the reply is complete; aclose() discards the connection


async def _open_reader(
    exchange: Exchange, translator: StreamTranslator | None, idle: float | None
) -> _StreamReader:
    """Read an open stream up to its first event; the end of one streamed attempt.

    Raises:
        APIResponseError: a success status with a JSON body, a malformed event, or a body
            with no event.
        APIConnectionError: the connection failed before the first event.
    """
    content_type = exchange.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        # A server that ignored "stream": true, or a proxy's error page.
        body = await exchange.read()
        raise exchange.bad_reply(
            f"is JSON, not an event stream: {body[:200].decode('utf-8', 'replace')!r}"
        )
    decoder = SSEDecoder()
    while data := await exchange.receive_some():
        try:
            events = decoder.feed(data)
        except SSEDecodeError as exc:
            raise exchange.bad_reply(f"is not an event stream: {exc}") from exc
        if events:
            return _StreamReader(exchange, decoder, events, translator, idle)
    raise exchange.bad_reply("ended before its first event")


async def _start(
    requester: Requester, url: str, body: JSONObject, retry: RetryPolicy | None
) -> _StreamReader:
    """Start one stream under ``retry``: attempts up to the first event."""
    request = requester.request(url, body, stream=True)
    idle = requester.timeouts.stream_idle

    async def first_event(exchange: Exchange) -> _StreamReader:
        return await _open_reader(exchange, requester.provider.stream_translator(), idle)

    return await requester.call(request, first_event, retry)


@final
class ChatStream:
    """The chunks of one streamed chat reply, read with ``async for``.

    Obtained from :func:`open_chat_stream` (``client.stream(...)``). Each iteration
    returns the next :class:`ChatChunk`; after the loop, :attr:`response` is the whole
    reply. A failure after the first event raises :class:`StreamError` from the loop.
    """

    __slots__ = ("_delivered", "_exchange", "_receive")

    def __init__(
        self, receive: trio.MemoryReceiveChannel[ChatChunk], exchange: _StreamReader
    ) -> None:
        self._receive = receive
        self._exchange = exchange
        self._delivered = 0

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> ChatChunk:
        """Return the next chunk.

        A cancellation point always, and a schedule point when it has to wait: chunks
        already buffered are taken without a task switch.

        Raises:
            StopAsyncIteration: the reply is complete.
            StreamError: the stream failed (error event, cut connection, idle timeout).

        Cancellation: either a chunk is returned, or ``Cancelled`` is raised and the chunk
        stays in the stream.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            chunk: ChatChunk | None = self._receive.receive_nowait()
        except trio.WouldBlock:
            try:
                chunk = await self._receive.receive()
            except trio.EndOfChannel:
                chunk = None
        except trio.EndOfChannel:
            chunk = None
        if chunk is None:
            # Raised here, outside the handlers, so a StreamError keeps its own cause.
            error = self._exchange.error
            if error is not None:
                raise error
            raise StopAsyncIteration
        self._delivered += 1
        return chunk

    @property
    def response(self) -> ChatResponse:
        """The reply aggregated from every chunk, shaped as a non-streamed reply.

        Text per choice, finish reasons, tool calls assembled from their deltas and the
        usage of the final chunk. Available once the loop has ended, or after the block
        when the loop was left at the last chunk (the last finish reason).

        Raises:
            RuntimeError: the reply is incomplete, or chunks remain unread.
        """
        response = self._exchange.response
        if response is None or self._delivered < self._exchange.chunks_received:
            raise RuntimeError("stream.response is available once the stream is read to the end")
        return response

    def statistics(self) -> StreamStatistics:
        """Return how many chunks were received and how many the consumer has taken."""
        return StreamStatistics(
            chunks_received=self._exchange.chunks_received, chunks_delivered=self._delivered
        )


@asynccontextmanager
async def open_chat_stream(
    requester: Requester, url: str, body: JSONObject, retry: RetryPolicy | None
) -> AsyncIterator[ChatStream]:
    """Send a streamed chat request (``body``); yield its chunks as a :class:`ChatStream`.

    The request goes through the client's lifecycle (``requester``): it waits for the rate
    limit and a concurrency slot, and holds the slot until the block is left. A reader
    task inside the block decodes the events; it stays at most a few chunks ahead of the
    consumer. ``Client.stream`` is the public way in.

    Args:
        requester: the client's request lifecycle.
        url: the chat endpoint.
        body: the request body, ``"stream": true`` and the provider's usage option set.
        retry: the policy of the attempts up to the first event (its deadline bounds
            them, not the stream); ``None`` makes one attempt.

    Raises:
        APIStatusError: from ``async with``: the server answered with an error status,
            not retried or the attempts ran out.
        APIConnectionError: from ``async with``: no response or no first event arrived
            (``APITimeoutError`` for a timeout or ``stream_idle`` before the first event).
        RetryDeadlineExceeded: from ``async with``: the retry deadline passed before the
            first event.
        StreamError: from the ``async for``: the stream failed after its first event.

    Cancellation: leaving the block early, by ``break``, an exception or a cancelled
    scope, stops the reader and closes the response at once; the connection is closed,
    never returned to the pool half-read, and the concurrency slot released. A cancelled
    stream counts as neither succeeded nor failed.
    """
    reader = await _start(requester, url, body, retry)
    del body

    def fill(nursery: trio.Nursery, send: trio.MemorySendChannel[ChatChunk]) -> None:
        reader.prime(send)
        nursery.start_soon(reader.run, send)

    try:
        async with open_task_channel(fill, _BUFFER) as receive:
            yield ChatStream(receive, reader)
            await reader.settle()
    finally:
        await reader.aclose()


@final
class MultiChatStream:
    """The chunks of several streamed replies, multiplexed; read with ``async for``.

    Obtained from :func:`open_stream_many` (``client.stream_many(...)``). Each iteration
    returns a :data:`StreamItem`: ``(index, chunk)`` for a :class:`ChatChunk` of the
    prompt at ``index``, and after a prompt's last chunk exactly one ``(index, result)``,
    a :class:`Result` holding its aggregated :class:`ChatResponse` or the error that ended
    it. Chunks of one prompt come in order; prompts interleave as the server sends.
    """

    __slots__ = ("_ended", "_receive", "_results")

    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[StreamItem],
        results: list[Result[ChatResponse] | None],
    ) -> None:
        self._receive = receive
        self._results = results
        self._ended = False

    def __aiter__(self) -> MultiChatStream:
        return self

    async def __anext__(self) -> StreamItem:
        """Return the next ``(index, chunk)`` or ``(index, result)``.

        Raises:
            StopAsyncIteration: every prompt has its result.

        Cancellation: either an item is returned, or ``Cancelled`` is raised and the item
        stays in the stream.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            pass
        except trio.EndOfChannel:
            self._ended = True
            raise StopAsyncIteration from None
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            self._ended = True
            raise StopAsyncIteration from None

    @property
    def results(self) -> list[Result[ChatResponse]]:
        """Every prompt's outcome, in input order.

        Raises:
            RuntimeError: the streams have not been read to their end.
        """
        if not self._ended:
            raise RuntimeError("results are available once every stream is read to the end")
        return [result for result in self._results if result is not None]


async def _stream_one(
    requester: Requester,
    url: str,
    body: JSONObject,
    index: int,
    channel: trio.MemorySendChannel[Any],
    retry: RetryPolicy | None,
) -> Result[ChatResponse]:
    try:
        reader = await _start(requester, url, body, retry)
        try:
            await reader.pump(channel, index)
            await reader.drain()
        finally:
            await reader.aclose()
    except LLMError as exc:
        return Result(ok=False, error=exc)
    assert reader.response is not None
    return Result(ok=True, value=reader.response)


@asynccontextmanager
async def open_stream_many(
    requester: Requester, url: str, bodies: Sequence[JSONObject], retry: RetryPolicy | None
) -> AsyncIterator[MultiChatStream]:
    """Stream several chat replies at once, multiplexed into one :class:`MultiChatStream`.

    The streams run on the fan-out workers (:class:`trio_llm._fanout.Workers`): at most
    the client's ``max_concurrency`` are open at once (fewer when other tasks hold slots).
    A failed stream does not stop the others: its error arrives as its ``(index, result)``
    item. All items pass through one small channel, so a slow consumer slows every stream.
    ``Client.stream_many`` is the public way in.

    Args:
        requester: the client's request lifecycle.
        url: the chat endpoint.
        bodies: one streamed request body per reply.
        retry: each stream's policy up to its first event, as for
            :func:`open_chat_stream`.

    Cancellation: leaving the block early, by ``break``, an exception or a cancelled
    scope, closes every open stream and starts no more.
    """
    results: list[Result[ChatResponse] | None] = [None] * len(bodies)
    limit = int(requester.limiter.total_tokens)

    def fill(nursery: trio.Nursery, send: trio.MemorySendChannel[StreamItem]) -> None:
        def new_worker() -> Worker[JSONObject]:
            clone = send.clone()

            async def stream(index: int, body: JSONObject) -> None:
                result = await _stream_one(requester, url, body, index, clone, retry)
                results[index] = result
                await clone.send((index, result))

            return stream, clone

        Workers(new_worker, limit).start(nursery, bodies, spawner=send)

    async with open_task_channel(fill, _BUFFER) as receive:
        yield MultiChatStream(receive, results)
