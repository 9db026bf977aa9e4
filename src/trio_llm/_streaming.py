"""Streamed chat replies: server-sent events through bounded memory channels.

One stream is one request of the client's lifecycle (:mod:`trio_llm._attempt`), read in
two phases:

1. :func:`_open_reader` reads up to the first event. It is part of the attempt, the unit
   the retry policy repeats (:meth:`Requester.call`), and fails with the client's ordinary
   errors (:class:`APIStatusError`, :class:`APIConnectionError`, :class:`APITimeoutError`).
2. :meth:`StreamReader.pump` decodes the rest, aggregates it and sends each chunk into a
   memory channel. Once the caller may have seen output a failure is a
   :class:`StreamError` carrying the text so far, and nothing is retried.

This module does no HTTP of its own: it reads the exchange the lifecycle opened.
:func:`open_chat_stream` runs the pump in a reader task inside its ``async with`` and hands
the consumer a :class:`ChatStream`; :func:`open_stream_many` runs several streams in
worker tasks that share one channel. In both, the channel holds at most ``_BUFFER`` chunks,
so a slow consumer stops the reader and, through TCP, the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias, final

import attrs
import trio

from ._attempt import Request, Requester
from ._cache import CachedReply
from ._cache_replay import ReplayReader
from ._config import RetryPolicy
from ._errors import LLMError
from ._fanout import Worker, Workers, open_task_channel
from ._stream_reader import BUFFER as _BUFFER
from ._stream_reader import StreamReader, start_stream
from ._types import ChatChunk, ChatResponse, Result
from .providers._base import Provider

__all__ = [
    "ChatStream",
    "MultiChatStream",
    "StreamItem",
    "StreamStatistics",
    "open_chat_stream",
    "open_stream_many",
]

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


@final
class ChatStream:
    """The chunks of one streamed chat reply, read with ``async for``.

    Obtained from :func:`open_chat_stream` (``client.stream(...)``). Each iteration
    returns the next :class:`ChatChunk`; after the loop, :attr:`response` is the whole
    reply. A failure after the first event raises :class:`StreamError` from the loop.
    """

    __slots__ = ("_delivered", "_exchange", "_receive")

    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[ChatChunk],
        exchange: StreamReader | ReplayReader,
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


def _replay(entry: CachedReply, provider: Provider) -> ReplayReader:
    """Replay a reply from the client's response cache as a stream (a request with a key)."""
    return ReplayReader(entry.chat_response(provider))


@asynccontextmanager
async def open_chat_stream(
    requester: Requester, request: Request, retry: RetryPolicy | None
) -> AsyncIterator[ChatStream]:
    """Send a streamed chat request; yield its chunks as a :class:`ChatStream`.

    The request goes through the client's lifecycle (``requester``): it waits for the rate
    limit and a concurrency slot, and holds the slot until the block is left. A reader
    task inside the block decodes the events; it stays at most a few chunks ahead of the
    consumer. ``Client.stream`` is the public way in.

    Args:
        requester: the client's request lifecycle.
        request: the streamed request (``requester.request(STREAM, ...)``).
        retry: the policy of the attempts up to the first event (its deadline bounds
            them, not the stream; a failure before it may go to another endpoint);
            ``None`` makes one attempt.

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
    reader = await start_stream(requester, request, retry, _replay)
    del request

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
    request: Request,
    index: int,
    channel: trio.MemorySendChannel[Any],
    retry: RetryPolicy | None,
) -> Result[ChatResponse]:
    try:
        reader = await start_stream(requester, request, retry, _replay)
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
    requester: Requester, requests: Sequence[Request], retry: RetryPolicy | None
) -> AsyncIterator[MultiChatStream]:
    """Stream several chat replies at once, multiplexed into one :class:`MultiChatStream`.

    The streams run on the fan-out workers (:class:`trio_llm._fanout.Workers`): at most
    the client's ``max_concurrency`` are open at once (fewer when other tasks hold slots).
    A failed stream does not stop the others: its error arrives as its ``(index, result)``
    item. All items pass through one small channel, so a slow consumer slows every stream.
    ``Client.stream_many`` is the public way in.

    Args:
        requester: the client's request lifecycle.
        requests: one streamed request per reply.
        retry: each stream's policy up to its first event, as for
            :func:`open_chat_stream`.

    Cancellation: leaving the block early, by ``break``, an exception or a cancelled
    scope, closes every open stream and starts no more.
    """
    results: list[Result[ChatResponse] | None] = [None] * len(requests)
    limit = int(requester.limiter.total_tokens)

    def fill(nursery: trio.Nursery, send: trio.MemorySendChannel[StreamItem]) -> None:
        def new_worker() -> Worker[Request]:
            clone = send.clone()

            async def stream(index: int, request: Request) -> None:
                result = await _stream_one(requester, request, index, clone, retry)
                results[index] = result
                await clone.send((index, result))

            return stream, clone

        Workers(new_worker, limit).start(nursery, requests, spawner=send)

    async with open_task_channel(fill, _BUFFER) as receive:
        yield MultiChatStream(receive, results)
