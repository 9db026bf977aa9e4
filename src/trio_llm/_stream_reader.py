"""One streamed reply read from its exchange: server-sent events to chunks.

The reading half of :mod:`trio_llm._streaming`. :func:`start_stream` makes the attempts
(the client's lifecycle, :mod:`trio_llm._attempt`) up to the start of the reply
(:func:`open_reader`); :class:`StreamReader` then decodes the rest, aggregates it
(:mod:`trio_llm._aggregate`) and sends each chunk into a memory channel. Once the caller
may have seen output a failure is a :class:`StreamError` carrying the text so far, and
nothing is retried. This module does no HTTP of its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, final

import trio

from . import _json
from ._aggregate import Aggregate
from ._attempt import Exchange, Request, Requester
from ._config import RetryPolicy
from ._errors import LLMError, StreamError
from ._routing import set_chat_endpoint
from ._sse import DEFAULT_MAX_EVENT_SIZE as MAX_EVENT_SIZE
from ._sse import ServerSentEvent, SSEDecodeError, SSEDecoder
from ._types import ChatChunk, ChatResponse
from .providers._base import Provider, StreamTranslator

if TYPE_CHECKING:
    from ._cache import CachedReply
    from ._cache_replay import ReplayReader

__all__ = ["BUFFER", "StreamReader", "open_reader", "start_stream"]

# Chunks the reader may decode ahead of the consumer. Small, so memory stays bounded and a
# slow consumer is felt by the server at once; not zero, so that a fast consumer takes
# chunks without a task switch each (measured: 1.2-2.5 us per chunk against 7-10 us).
BUFFER: Final = 8

# How long the body's end may lag [DONE] before the connection is dropped instead.
_DRAIN_GRACE: Final = 1.0


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)[:300]
        details = [f"{key}={error[key]}" for key in ("type", "code") if error.get(key)]
        return f"{message} ({', '.join(details)})" if details else str(message)
    return str(error)[:300]


@final
class StreamReader:
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
        self._url = exchange.request.shown_url
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
        room = BUFFER - channel.statistics().current_buffer_used
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
        except StreamError as exc:
            exchange.fail(exc)
            raise
        response = self._aggregate.to_response(exchange.request_id)
        set_chat_endpoint(response, exchange.route.name)
        self.response = exchange.finish(response, response.raw)

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
                    # The error names the request already.
                    raise self._fail(f"the stream was cut off: {exc}") from exc
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


async def open_reader(exchange: Exchange, provider: Provider, idle: float | None) -> StreamReader:
    """Read an open stream up to the start of the reply; the end of one streamed attempt.

    Events before the first that carries part of the reply (a role-only chunk, Anthropic's
    ``message_start``) are kept for the reader. An error event among them is raised as
    the status it stands for (Anthropic's ``overloaded_error`` as a 529), so the retry
    policy treats it as it would the status: nothing has reached the caller yet.

    Raises:
        APIStatusError: an error event before the reply started.
        APIResponseError: a success status with a JSON body, a malformed event, or a body
            with no event.
        APIConnectionError: the connection failed before the reply started.
    """
    content_type = exchange.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        # A server that ignored "stream": true, or a proxy's error page.
        body = await exchange.read()
        raise exchange.bad_reply(
            f"is JSON, not an event stream: {body[:200].decode('utf-8', 'replace')!r}"
        )
    exchange.request.waiting_for = "the start of the reply"
    limit = exchange.max_response_bytes
    decoder = SSEDecoder(max_event_size=min(limit, MAX_EVENT_SIZE) if limit else MAX_EVENT_SIZE)
    events: list[ServerSentEvent] = []
    while data := await exchange.receive_some():
        try:
            new = decoder.feed(data)
        except SSEDecodeError as exc:
            raise exchange.bad_reply(f"is not an event stream: {exc}") from exc
        events += new
        if any(_starts_reply(event, provider, exchange) for event in new):
            return StreamReader(exchange, decoder, events, provider.stream_translator(), idle)
    if events:  # framing only, then the end: the reader says how it ended
        return StreamReader(exchange, decoder, events, provider.stream_translator(), idle)
    raise exchange.bad_reply("ended before its first event")


def _starts_reply(event: ServerSentEvent, provider: Provider, exchange: Exchange) -> bool:
    """Whether ``event`` starts the reply or ends the stream; raise it if it is an error."""
    data = event.data
    if data == "[DONE]":
        return True
    if not data:
        return False
    try:
        payload = _json.loads(data)
    except ValueError:
        return True  # malformed: the reader reports it
    if not isinstance(payload, dict):
        return True
    error = payload.get("error")
    if error is not None or event.event == "error":
        error = payload if error is None else error
        raise exchange.error_event(provider.stream_error_status(error), error)
    return provider.stream_content_started(event.event, payload)


async def start_stream(
    requester: Requester,
    request: Request,
    retry: RetryPolicy | None,
    replay: Callable[[CachedReply, Provider], ReplayReader] | None = None,
) -> StreamReader | ReplayReader:
    """Start one stream under ``retry``: attempts up to the first event.

    ``request`` is a :data:`~trio_llm._routing.STREAM` request of ``requester``. With
    ``replay`` and a request with a cache key, a hit in the client's response cache is
    replayed, with no attempt, and a reply streamed to its end is stored.
    """
    idle = requester.timeouts.stream_idle

    async def first_event(exchange: Exchange) -> StreamReader | ReplayReader:
        return await open_reader(exchange, exchange.provider, idle)

    return await requester.call(request, first_event, retry, replay)
