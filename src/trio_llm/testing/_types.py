"""What a generation request asks for and what the fake model answers, API-neutral.

The OpenAI and Anthropic front ends both parse their requests into a ``Generation`` and
render it in their own wire format, so one question gets the same answer through either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from ._replies import (
    MESSAGE_OVERHEAD,
    REPLY_OVERHEAD,
    call_id,
    count_tokens,
    json_from_schema,
    json_object_text,
    reply_pieces,
    split_tokens,
    tool_arguments,
)


class BadRequest(Exception):
    """A request the server refuses with 400 (or ``status``)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


@attrs.frozen
class ToolSpec:
    """The tool the fake model will call: its name, its parameter schema, whether forced."""

    name: str
    parameters: object
    forced: bool = False


@attrs.frozen
class ToolCall:
    """One tool call of a reply."""

    id: str
    name: str
    arguments: str


@attrs.frozen
class Choice:
    """One reply: either text (as token pieces) or a tool call."""

    index: int
    pieces: tuple[str, ...]
    tool_call: ToolCall | None
    finish_reason: str  # "stop", "length" or "tool_calls"

    @property
    def text(self) -> str:
        """The reply text (empty for a tool call)."""
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        """Tokens of the text, or of the tool call's arguments."""
        if self.tool_call is not None:
            return count_tokens(self.tool_call.arguments)
        return len(self.pieces)


@attrs.frozen
class Generation:
    """A parsed generation request with its deterministic answer."""

    model: str
    prompt_tokens: int
    choices: tuple[Choice, ...]
    stream: bool
    include_usage: bool

    @property
    def completion_tokens(self) -> int:
        """Completion tokens over all choices."""
        return sum(choice.completion_tokens for choice in self.choices)

    @property
    def longest(self) -> int:
        """Completion tokens of the longest choice (choices are generated side by side)."""
        return max((choice.completion_tokens for choice in self.choices), default=0)


def prompt_tokens(texts: Sequence[str]) -> int:
    """Count the prompt tokens of a conversation made of ``texts`` (one per message)."""
    return sum(count_tokens(text) + MESSAGE_OVERHEAD for text in texts) + REPLY_OVERHEAD


def build_choices(
    *,
    conversation: str,
    seed: int,
    n: int,
    max_tokens: int | None,
    tool: ToolSpec | None,
    response_format: str,
    schema: object = None,
    invalid: bool = False,
) -> tuple[Choice, ...]:
    """Answer ``conversation`` with ``n`` deterministic choices.

    Args:
        conversation: The conversation's text (message texts joined by newlines).
        seed: The server's seed.
        n: How many choices.
        max_tokens: Cut each text reply to this many tokens (finish reason ``"length"``).
        tool: Call this tool instead of answering with text.
        response_format: ``"text"``, ``"json_object"`` or ``"json_schema"``.
        schema: The JSON Schema for ``"json_schema"``.
        invalid: Break the schema of a structured reply (``"json_schema"``, or the
            arguments of a forced tool).
    """
    choices = []
    for index in range(n):
        if tool is not None:
            arguments = tool_arguments(
                tool.parameters,
                conversation,
                seed,
                f"{tool.name}:{index}",
                invalid=invalid and tool.forced,
            )
            call = ToolCall(
                call_id("call_", seed, index, tool.name, conversation), tool.name, arguments
            )
            choices.append(Choice(index, (), call, "tool_calls"))
            continue
        if response_format == "json_schema":
            schema_json = json.dumps(schema if isinstance(schema, dict) else {}, sort_keys=True)
            text = json_from_schema(schema_json, conversation, seed, str(index), invalid)
            pieces = split_tokens(text)
        elif response_format == "json_object":
            pieces = split_tokens(json_object_text(conversation, seed, index))
        else:
            pieces = reply_pieces(conversation, seed, index)
        finish = "stop"
        if max_tokens is not None and max_tokens < len(pieces):
            pieces = pieces[: max(0, max_tokens)]
            finish = "length"
        choices.append(Choice(index, pieces, None, finish))
    return tuple(choices)


def is_integer(value: object) -> bool:
    """Whether ``value`` is a JSON Schema integer (``5`` or ``5.0``, never a boolean)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def optional_int(payload: dict[str, Any], key: str) -> int | None:
    """Return ``payload[key]`` if it is an integer or absent/null; raise ``BadRequest`` else."""
    value = payload.get(key)
    if value is None:
        return None
    if not is_integer(value):
        raise BadRequest(f"Invalid type for '{key}': expected an integer.", key)
    return int(value)


def optional_bool(payload: dict[str, Any], key: str) -> bool:
    """Return ``payload[key]`` as a bool (absent/null is false); raise ``BadRequest`` else."""
    value = payload.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"Invalid type for '{key}': expected a boolean.", key)
    return value


def require_model(payload: dict[str, Any]) -> str:
    """Return the request's model name; raise ``BadRequest`` when missing or not a string."""
    model = payload.get("model")
    if model is None:
        raise BadRequest("You must provide a model parameter.", "model")
    if not isinstance(model, str):
        raise BadRequest("Invalid type for 'model': expected a string.", "model")
    return model
