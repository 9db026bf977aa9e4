"""A streamed chat reply put back together: chunks in, the whole completion out.

Each ``chat.completion.chunk`` payload (OpenAI's, or another provider's events translated
to them) becomes one :class:`ChatChunk` per choice, and is merged into the completion a
non-streamed request would have returned: text per choice, finish reasons, tool calls
assembled from their deltas, log probabilities, and the final usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

from ._types import ChatChunk, ChatResponse, JSONObject

__all__ = ["Aggregate"]

# Top-level fields of a chunk that do not belong in the aggregated completion.
_CHUNK_ONLY_FIELDS = frozenset({"choices", "usage", "object", "obfuscation"})


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
class Aggregate:
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

    def to_response(self, request_id: str | None = None) -> ChatResponse:
        """Build the completion, shaped as the non-streamed reply would be."""
        payload: JSONObject = {
            key: value for key, value in (self._head or {}).items() if key not in _CHUNK_ONLY_FIELDS
        }
        payload["object"] = "chat.completion"
        payload["choices"] = [
            state.to_json(index) for index, state in sorted(self._choices.items())
        ]
        payload["usage"] = self._usage
        return ChatResponse.from_json(payload, request_id=request_id)
