"""Streamed chat replies: server-sent events through bounded memory channels.

One stream is one HTTP exchange in two phases:

1. :func:`start_exchange` takes a concurrency slot, sends the request and reads up to the
   first event. It is one attempt, the unit the retry policy repeats, and fails with the
   client's ordinary errors (:class:`APIStatusError`, :class:`APIConnectionError`,
   :class:`APITimeoutError`).
2. :meth:`_Exchange.pump` decodes the rest, aggregates it and sends each chunk into a
   memory channel. Once the caller may have seen output a failure is a
   :class:`StreamError` carrying the text so far, and nothing is retried.

:func:`open_chat_stream` runs the pump in a reader task inside its ``async with`` and hands
the consumer a :class:`ChatStream`; :func:`open_stream_many` runs several exchanges in
worker tasks that share one channel. In both, the channel holds at most ``_BUFFER`` chunks,
so a slow consumer stops the reader and, through TCP, the server.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias, final

import attrs
import httpx2
import trio

from . import _json
from ._config import RetryPolicy
from ._errors import (
    APIResponseError,
    APITimeoutError,
    LLMError,
    StreamError,
    error_from_response,
    error_from_transport,
)
from ._ratelimit import Reservation, estimate_tokens
from ._retry import call_with_retries
from ._sse import ServerSentEvent, SSEDecodeError, SSEDecoder
from ._types import ChatChunk, ChatResponse, JSONObject, Result

if TYPE_CHECKING:
    from ._client import Client
    from .providers._base import Messages

__all__ = [
    "ChatStream",
    "MultiChatStream",
    "StreamItem",
    "StreamStatistics",
    "open_chat_stream",
    "open_stream_many",
    "start_exchange",
]

logger = logging.getLogger("trio_llm")

# Chunks the reader may decode ahead of the consumer. Small, so memory stays bounded and a
# slow consumer is felt by the server at once; not zero, so that a fast consumer takes
# chunks without a task switch each (measured: 1.2-2.5 us per chunk against 7-10 us).
_BUFFER = 8

# A shielded close must not hang on a dead peer.
_CLOSE_GRACE = 5.0

# The end of the body normally follows [DONE] at once; a server that holds the response
# open past this loses the connection instead of keeping a task waiting.
_DRAIN_GRACE = 1.0

# Top-level fields of a chunk that do not belong in the aggregated completion.
_CHUNK_ONLY_FIELDS = frozenset({"choices", "usage", "object", "obfuscation"})

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
class _CallState:
    """One tool call being assembled from its deltas."""

    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name = ""
        self.arguments: list[str] = []


@final
class _ChoiceState:
    """One choice being assembled from its deltas."""

    __slots__ = ("calls", "content", "extras", "finish_reason", "has_content", "logprobs", "role")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.has_content = False  # a string content was sent ("" included): not None
        self.role: str | None = None
        self.finish_reason: str | None = None
        self.calls: dict[int, _CallState] = {}
        self.extras: dict[str, Any] = {}  # refusal, reasoning_content, ...: str parts or value
        self.logprobs: dict[str, Any] | None = None

    def merge(self, chunk: ChatChunk, choice: Mapping[str, Any]) -> None:
        delta = chunk.delta
        if chunk.text and len(delta) == 1:
            self.content.append(chunk.text)  # nearly every chunk: one piece of content
            self.has_content = True
        else:
            self._merge_delta(chunk)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            self._merge_logprobs(logprobs)

    def _merge_delta(self, chunk: ChatChunk) -> None:
        for key, value in chunk.delta.items():
            if key == "content":
                if isinstance(value, str):
                    self.has_content = True
                    if value:
                        self.content.append(value)
            elif key == "tool_calls":
                self._merge_calls(chunk.tool_calls)
            elif key == "role":
                if isinstance(value, str) and value:
                    self.role = value
            elif isinstance(value, str):
                parts = self.extras.get(key)
                if isinstance(parts, list):
                    parts.append(value)
                else:
                    self.extras[key] = [value]
            elif value is not None or key not in self.extras:
                self.extras[key] = value

    def _merge_calls(self, deltas: tuple[JSONObject, ...]) -> None:
        for position, delta in enumerate(deltas):
            index = delta.get("index")
            key = index if isinstance(index, int) else position
            call = self.calls.get(key)
            if call is None:
                call = self.calls[key] = _CallState()
            # The id and name come whole in the first delta of a call; some servers repeat
            # them in later deltas, so they are taken once, never concatenated.
            if call.id is None and isinstance(delta.get("id"), str) and delta["id"]:
                call.id = delta["id"]
            if isinstance(delta.get("type"), str):
                call.type = delta["type"]
            function = delta.get("function")
            if isinstance(function, dict):
                name = function.get("name")
                if not call.name and isinstance(name, str):
                    call.name = name
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    call.arguments.append(arguments)

    def _merge_logprobs(self, logprobs: dict[str, Any]) -> None:
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in logprobs.items():
            if isinstance(value, list):
                self.logprobs.setdefault(key, []).extend(value)
            elif key not in self.logprobs:
                self.logprobs[key] = value

    @property
    def text(self) -> str:
        return "".join(self.content)

    def to_json(self, index: int) -> JSONObject:
        message: JSONObject = {
            "role": self.role or "assistant",
            "content": self.text if self.has_content else None,
            "refusal": None,
        }
        for key, value in self.extras.items():
            message[key] = "".join(value) if isinstance(value, list) else value
        if self.calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type or "function",
                    "function": {"name": call.name, "arguments": "".join(call.arguments)},
                }
                for _, call in sorted(self.calls.items())
            ]
        return {
            "index": index,
            "message": message,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
        }


@final
class _Aggregate:
    """Turn ``chat.completion.chunk`` payloads into chunks and the final completion."""

    __slots__ = ("_choices", "_head", "_usage")

    def __init__(self) -> None:
        self._head: JSONObject | None = None
        self._choices: dict[int, _ChoiceState] = {}
        self._usage: object = None

    def add(self, payload: JSONObject) -> list[ChatChunk]:
        """Merge one event's payload; return its chunks, one per choice it carries."""
        if self._head is None:
            self._head = payload
        usage = payload.get("usage")
        if usage is not None:
            # The final chunk carries it with include_usage; some servers put a running
            # total on every chunk, so the last one wins.
            self._usage = usage
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices:
            return []  # the usage-only event that closes an include_usage stream
        chunks = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            chunk = ChatChunk.from_json(payload, choice)
            state = self._choices.get(chunk.index)
            if state is None:
                state = self._choices[chunk.index] = _ChoiceState()
            state.merge(chunk, choice)
            chunks.append(chunk)
        return chunks

    @property
    def finished(self) -> bool:
        """Whether every choice seen so far has its finish reason."""
        return bool(self._choices) and all(
            state.finish_reason is not None for state in self._choices.values()
        )

    def text_so_far(self) -> str:
        """Return the first choice's text received so far."""
        if not self._choices:
            return ""
        return self._choices[min(self._choices)].text

    def to_response(self) -> ChatResponse:
        """Build the completion, shaped as the non-streamed reply would be."""
        payload: JSONObject = {
            key: value for key, value in (self._head or {}).items() if key not in _CHUNK_ONLY_FIELDS
        }
        payload["object"] = "chat.completion"
        payload["choices"] = [
            state.to_json(index) for index, state in sorted(self._choices.items())
        ]
        payload["usage"] = self._usage
        return ChatResponse.from_json(payload)


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)[:300]
        details = [f"{key}={error[key]}" for key in ("type", "code") if error.get(key)]
        return f"{message} ({', '.join(details)})" if details else str(message)
    return str(error)[:300]


@final
class _Exchange:
    """A streamed HTTP response past its first event, and the reply being assembled."""

    __slots__ = (
        "_aggregate",
        "_client",
        "_decoder",
        "_events",
        "_finished",
        "_iterator",
        "_reservation",
        "_response",
        "_saw_done",
        "_slot",
        "_translator",
        "_url",
        "chunks_received",
        "error",
        "response",
    )

    def __init__(
        self,
        client: Client,
        url: str,
        response: httpx2.Response,
        iterator: AsyncGenerator[bytes, None],
        decoder: SSEDecoder,
        events: list[ServerSentEvent],
        reservation: Reservation | None,
    ) -> None:
        self._client = client
        self._reservation = reservation
        self._url = url
        self._response = response
        self._iterator = iterator
        self._decoder = decoder
        self._events = events  # decoded by start_exchange, not yet delivered
        self._slot = True  # start_exchange took a concurrency slot for this exchange
        self._saw_done = False
        self._finished = trio.Event()  # run() has returned
        self._aggregate = _Aggregate()
        # Non-OpenAI events become chunk payloads through it (None for OpenAI's own).
        self._translator = client._provider.stream_translator()
        self.chunks_received = 0
        self.error: StreamError | None = None
        self.response: ChatResponse | None = None

    async def aclose(self) -> None:
        """Close the response (and its connection, unless it was read to the end).

        Releases the concurrency slot; call it from the task that started the exchange.
        """
        try:
            # Shielded: this runs on the way out of a cancelled scope too, and a half-read
            # connection must be closed rather than left for the pool.
            with trio.move_on_after(_CLOSE_GRACE, shield=True):
                await self._iterator.aclose()
                await self._response.aclose()
        finally:
            if self._reservation is not None:
                self._reservation.keep()  # no usage came (left early, failed): the estimate
            if self._slot:
                self._slot = False
                self._client._limiter.release()

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
        try:
            await self._pump(channel, index)
        except StreamError:
            self._client._failed += 1
            raise
        self.response = self._aggregate.to_response()
        usage = self.response.usage
        self._client._count_usage(usage)
        if self._reservation is not None and usage.total_tokens:
            self._reservation.reconcile(usage.total_tokens)

    async def _pump(self, channel: trio.MemorySendChannel[Any], index: int | None) -> None:
        idle = self._client._timeouts.stream_idle
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
                    data = await self._iterator.__anext__()
                except StopAsyncIteration:
                    break
                except httpx2.HTTPError as exc:
                    raise self._fail(
                        f"the stream from POST {self._url} was cut off: "
                        f"{type(exc).__name__}: {exc or 'connection lost'}"
                    ) from exc
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
                async for _ in self._iterator:
                    pass
            except httpx2.HTTPError:
                pass  # the reply is complete; aclose() discards the connection


async def start_exchange(client: Client, url: str, content: bytes, estimate: int = 0) -> _Exchange:
    """Make one streamed HTTP attempt, up to its first server-sent event.

    This is the unit the retry policy repeats: nothing has reached the caller yet. It
    waits for the client's rate limiter (``estimate`` tokens) and for one of its
    concurrency slots, and returns holding the slot until :meth:`_Exchange.aclose` (a
    failed attempt releases it, so backoff waits hold none). The rate reservation is
    settled as for a plain call: refunded if no response came or on a 429, corrected
    with the stream's usage at its end.

    Raises:
        APIStatusError: the server answered with an error status (a subclass names it).
        APIConnectionError: no response or no event arrived (the connection failed).
        APITimeoutError: a connect/read timeout, or ``stream_idle`` before the first event.
        APIResponseError: a success status with a JSON body, or a body with no event.

    Cancellation: the request is abandoned, its connection closed, its slot released and
    its rate reservation refunded if nothing was sent.
    """
    rate = client._rate
    reservation = await rate.acquire(estimate) if rate is not None else None
    try:
        await client._limiter.acquire()
    except BaseException:
        if reservation is not None:
            reservation.refund()
        raise
    try:
        return await _start_exchange(client, url, content, reservation)
    except BaseException:
        client._limiter.release()
        raise


async def _start_exchange(
    client: Client, url: str, content: bytes, reservation: Reservation | None
) -> _Exchange:
    http = client._http
    rate = client._rate
    idle = client._timeouts.stream_idle
    request = http.build_request(
        "POST", url, content=content, headers={"accept": "text/event-stream"}
    )
    response: httpx2.Response | None = None
    iterator: AsyncGenerator[bytes, None] | None = None
    client._sent += 1
    try:
        with trio.move_on_after(math.inf if idle is None else idle):
            try:
                response = await http.send(request, stream=True)
                status = response.status_code
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("POST %s -> %d (stream)", url, status)
                if status >= 400:
                    body = await response.aread()
                    error = error_from_response(
                        status, response.headers, body, reason=response.reason_phrase
                    )
                    if reservation is not None:
                        reservation.refund() if status == 429 else reservation.reconcile(0)
                    if rate is not None:
                        # After the refund, as in Client._post_json: the server's
                        # remaining count is the truth from here on.
                        rate.update_from_headers(response.headers)
                    if status == 429:
                        client._rate_limited += 1
                        if rate is not None and error.retry_after:
                            rate.pause(error.retry_after)  # every task of the client waits
                    raise error
                if rate is not None:
                    rate.update_from_headers(response.headers)
                content_type = response.headers.get("content-type", "")
                if content_type.startswith("application/json"):
                    # A server that ignored "stream": true, or a proxy's error page.
                    body = await response.aread()
                    raise APIResponseError(
                        f"HTTP {status} from POST {url} is JSON, not an event stream: "
                        f"{body[:200].decode('utf-8', 'replace')!r}",
                        status_code=status,
                        request_id=response.headers.get("x-request-id"),
                    )
                iterator = response.aiter_bytes()
                decoder = SSEDecoder()
                async for data in iterator:
                    events = decoder.feed(data)
                    if events:
                        return _Exchange(
                            client, url, response, iterator, decoder, events, reservation
                        )
                raise APIResponseError(
                    f"HTTP {status} from POST {url}: the stream ended before its first event",
                    status_code=status,
                    request_id=response.headers.get("x-request-id"),
                )
            except httpx2.HTTPError as exc:
                raise error_from_transport(exc, method="POST", url=url) from exc
            except SSEDecodeError as exc:
                raise APIResponseError(
                    f"POST {url}: {exc}",
                    status_code=response.status_code if response is not None else 0,
                    request_id=None,
                ) from exc
        raise APITimeoutError(
            f"no event from POST {url} within stream_idle={idle}s", method="POST", url=url
        )
    except BaseException:
        if response is None:
            # Nothing was answered: the server most likely never counted the request.
            if reservation is not None:
                reservation.refund()
        else:
            if reservation is not None:
                reservation.keep()  # answered (unless settled above): the server counted it
            with trio.move_on_after(_CLOSE_GRACE, shield=True):
                if iterator is not None:
                    await iterator.aclose()
                await response.aclose()
        raise


async def _start_with_retries(
    client: Client, body: JSONObject, retry: RetryPolicy | None
) -> _Exchange:
    """Start an exchange under ``retry``; count a final failure in the statistics."""
    url = client._base_url + client._provider.chat_path
    content = _encode(body)
    estimate = estimate_tokens(body) if client._rate is not None else 0
    try:
        return await call_with_retries(
            # Not bounded: the deadline's cancel scope ends the attempt.
            lambda _deadline_at: start_exchange(client, url, content, estimate),
            retry,
            label=f"POST {url} (stream)",
            on_retry=client._note_retry,
        )
    except LLMError:
        client._failed += 1
        raise


def _request(
    client: Client, prompt_or_messages: Messages, model: str | None, params: Mapping[str, Any]
) -> JSONObject:
    # The provider asks for usage in its own way (OpenAI: stream_options.include_usage).
    return client._provider.stream_body(prompt_or_messages, client._resolve_model(model), params)


def _encode(body: JSONObject) -> bytes:
    return _json.dumps(body)


@final
class ChatStream:
    """The chunks of one streamed chat reply, read with ``async for``.

    Obtained from :func:`open_chat_stream` (``client.stream(...)``). Each iteration
    returns the next :class:`ChatChunk`; after the loop, :attr:`response` is the whole
    reply. A failure after the first event raises :class:`StreamError` from the loop.
    """

    __slots__ = ("_delivered", "_exchange", "_receive")

    def __init__(self, receive: trio.MemoryReceiveChannel[ChatChunk], exchange: _Exchange) -> None:
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
    client: Client,
    prompt_or_messages: Messages,
    *,
    model: str | None = None,
    retry: RetryPolicy | None = None,
    **params: Any,
) -> AsyncIterator[ChatStream]:
    """Send a chat request with ``"stream": true``; yield its chunks as a :class:`ChatStream`.

    The request waits for the client's rate limit and a concurrency slot, and holds the
    slot until the block is left. ``stream_options: {"include_usage": true}`` is added
    unless the caller's own ``stream_options`` say otherwise. A reader task inside the
    block decodes the events; it stays at most a few chunks ahead of the consumer.

    Args:
        client: the client to send through.
        prompt_or_messages: a string (one user message) or a list of message objects.
        model: the model; defaults to the client's.
        retry: the policy of the attempts up to the first event (its deadline bounds
            them, not the stream); ``None`` makes one attempt. ``Client.stream`` passes
            the client's.
        **params: other request fields (``max_tokens``, ``tools``, ...), passed unchanged.

    Raises:
        APIStatusError: from ``async with``: the server answered with an error status,
            not retried or the attempts ran out.
        APIConnectionError: from ``async with``: no response or no first event arrived
            (``APITimeoutError`` for a timeout or ``stream_idle`` before the first event).
        RetryDeadlineExceeded: from ``async with``: the retry deadline passed before the
            first event.
        StreamError: from the ``async for``: the stream failed after its first event.
        ConfigurationError: no model was given here or to the client.

    Cancellation: leaving the block early, by ``break``, an exception or a cancelled
    scope, stops the reader and closes the response at once; the connection is closed,
    never returned to the pool half-read, and the concurrency slot released. A cancelled
    stream counts as neither succeeded nor failed.
    """
    body = _request(client, prompt_or_messages, model, params)
    exchange = await _start_with_retries(client, body, retry)
    send, receive = trio.open_memory_channel[ChatChunk](_BUFFER)
    try:
        stream = ChatStream(receive, exchange)
        body_error: BaseException | None = None
        exchange.prime(send)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exchange.run, send)
            try:
                yield stream
                await exchange.settle()
            except BaseException as exc:
                # Re-raised below, outside the nursery, so the caller gets their own
                # exception and not an ExceptionGroup around it.
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
    finally:
        # Closed only now: a reader still running (cancelled but not yet at a checkpoint)
        # may send into the channel, and must not meet a closed one.
        receive.close()
        await exchange.aclose()


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
    client: Client,
    body: JSONObject,
    index: int,
    channel: trio.MemorySendChannel[Any],
    retry: RetryPolicy | None,
) -> Result[ChatResponse]:
    try:
        exchange = await _start_with_retries(client, body, retry)
        try:
            await exchange.pump(channel, index)
            await exchange.drain()
        finally:
            await exchange.aclose()
    except LLMError as exc:
        return Result(ok=False, error=exc)
    return Result(ok=True, value=exchange.response)


async def _stream_worker(
    client: Client,
    jobs: Iterator[tuple[int, JSONObject]],
    channel: trio.MemorySendChannel[StreamItem],
    results: list[Result[ChatResponse] | None],
    retry: RetryPolicy | None,
) -> None:
    # Workers share one iterator: taking the next job is synchronous, so no two take the
    # same one, and a fixed set of workers keeps every slot busy without a task per prompt.
    async with channel:
        for index, body in jobs:
            result = await _stream_one(client, body, index, channel, retry)
            results[index] = result
            await channel.send((index, result))


@asynccontextmanager
async def open_stream_many(
    client: Client,
    prompts: Iterable[Messages],
    *,
    model: str | None = None,
    retry: RetryPolicy | None = None,
    **params: Any,
) -> AsyncIterator[MultiChatStream]:
    """Stream several chat replies at once, multiplexed into one :class:`MultiChatStream`.

    At most ``client.max_concurrency`` streams are open at once (fewer when other tasks
    hold slots). A failed stream does not stop the others: its error arrives as its
    ``(index, result)`` item. All items pass through one small channel, so a slow
    consumer slows every stream.

    Args:
        client: the client to send through.
        prompts: strings or message lists, one per reply (read into a list at once).
        model: the model; defaults to the client's.
        retry: each stream's policy up to its first event, as for
            :func:`open_chat_stream`; ``Client.stream_many`` passes the client's.
        **params: other request fields, passed unchanged to every request.

    Raises:
        ConfigurationError: no model was given here or to the client.
        TypeError: a prompt is not a string or a list of messages.

    Cancellation: leaving the block early, by ``break``, an exception or a cancelled
    scope, closes every open stream and starts no more.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts, not one string")
    resolved = client._resolve_model(model)
    bodies = [_request(client, prompt, resolved, params) for prompt in prompts]
    results: list[Result[ChatResponse] | None] = [None] * len(bodies)
    send, receive = trio.open_memory_channel[StreamItem](_BUFFER)
    stream = MultiChatStream(receive, results)
    jobs = iter(enumerate(bodies))
    body_error: BaseException | None = None
    with receive:  # closed after the nursery, as in open_chat_stream
        async with trio.open_nursery() as nursery:
            async with send:
                for _ in range(min(len(bodies), client.max_concurrency)):
                    nursery.start_soon(_stream_worker, client, jobs, send.clone(), results, retry)
            try:
                yield stream
            except BaseException as exc:
                body_error = exc  # re-raised outside the nursery, as in open_chat_stream
            finally:
                nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
