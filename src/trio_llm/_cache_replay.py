"""A cached chat reply replayed as a stream: the same text, finish reasons and usage.

:class:`ReplayReader` stands in for :class:`~trio_llm._stream_reader.StreamReader` when a
streamed call is answered from the cache: it has the same methods, so ``client.stream``
and ``stream_many`` run it as they run a reader of the server's events. Each choice of the
stored reply becomes one chunk carrying its whole message and its finish reason; once
they are delivered, ``response`` is the stored reply itself (``cached=True``, its usage
included). Nothing is held: no slot, no connection.
"""

from __future__ import annotations

from typing import Any, final

import trio

from ._stream_reader import BUFFER
from ._types import ChatChunk, ChatResponse, JSONObject

__all__ = ["ReplayReader", "replay_chunks"]


def replay_chunks(reply: ChatResponse) -> list[ChatChunk]:
    """Return the chunks of ``reply``: one per choice, each its whole message."""
    head: JSONObject = {
        "id": reply.id,
        "object": "chat.completion.chunk",
        "created": reply.raw.get("created", 0),
        "model": reply.model,
    }
    chunks = []
    for choice in reply.choices:
        delta = {name: value for name, value in choice.message.items() if value is not None}
        calls = delta.get("tool_calls")
        if isinstance(calls, list):  # a delta's tool calls say which call they extend
            delta["tool_calls"] = [
                {**call, "index": position} if isinstance(call, dict) else call
                for position, call in enumerate(calls)
            ]
        entry = {"index": choice.index, "delta": delta, "finish_reason": choice.finish_reason}
        chunks.append(ChatChunk.from_json({**head, "choices": [entry]}, entry))
    return chunks


@final
class ReplayReader:
    """A stored reply delivered as the chunks of a stream (see the module's docstring)."""

    __slots__ = ("_chunks", "_reply", "chunks_received", "error", "response")

    def __init__(self, reply: ChatResponse) -> None:
        self._reply = reply
        self._chunks = replay_chunks(reply)
        self.chunks_received = 0
        self.error: None = None
        self.response: ChatResponse | None = None

    def prime(self, channel: trio.MemorySendChannel[ChatChunk]) -> None:
        """Buffer the first chunks from the consumer's task (as many as fit)."""
        room = BUFFER - channel.statistics().current_buffer_used
        while self.chunks_received < len(self._chunks) and room > 0:
            channel.send_nowait(self._chunks[self.chunks_received])
            self.chunks_received += 1
            room -= 1
        self._check_end()

    async def run(self, channel: trio.MemorySendChannel[ChatChunk]) -> None:
        """Deliver the other chunks into ``channel``, then close it."""
        async with channel:
            await self.pump(channel, None)

    async def pump(self, channel: trio.MemorySendChannel[Any], index: int | None) -> None:
        """Deliver every chunk not yet delivered (as ``(index, chunk)`` with ``index``)."""
        chunks = self._chunks
        while self.chunks_received < len(chunks):
            chunk = chunks[self.chunks_received]
            await channel.send(chunk if index is None else (index, chunk))
            self.chunks_received += 1
        self._check_end()

    def _check_end(self) -> None:
        # Complete once every chunk is in the channel: the consumer may leave at the last
        # one (``if chunk.finish_reason: break``) before the task that ran this resumes.
        if self.chunks_received == len(self._chunks):
            self.response = self._reply

    async def settle(self) -> None:
        """Nothing to wait for: a replay has no connection to finish reading."""

    async def drain(self) -> None:
        """Nothing to read: see :meth:`settle`."""

    async def aclose(self) -> None:
        """Nothing to close: a replay holds no slot and no connection."""
