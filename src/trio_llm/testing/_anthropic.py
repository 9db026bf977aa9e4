"""Anthropic Messages wire format: parse ``POST /v1/messages``, render messages and events."""

from __future__ import annotations

import json
from typing import Any

from ._replies import split_tokens
from ._types import (
    BadRequest,
    Choice,
    Generation,
    ToolSpec,
    build_choices,
    optional_bool,
    optional_int,
    prompt_tokens,
    require_model,
)

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
TOOL_FRAGMENT_TOKENS = 4


def _blocks_text(content: object) -> str | None:
    """Return the text of a string or of content blocks (text and tool results); None if invalid."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = []
    for block in content:
        if not isinstance(block, dict):
            return None
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_result":
            inner = block.get("content")
            texts.append(_blocks_text(inner) or "" if inner is not None else "")
    return "".join(texts)


def _tool(payload: dict[str, Any]) -> ToolSpec | None:
    tools = payload.get("tools")
    choice = payload.get("tool_choice")
    if not isinstance(tools, list) or not tools:
        return None
    if isinstance(choice, dict) and choice.get("type") == "none":
        return None
    schemas: dict[str, object] = {}
    for tool in tools:
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            schemas.setdefault(tool["name"], tool.get("input_schema"))
    if isinstance(choice, dict) and choice.get("type") == "tool":
        name = choice.get("name")
        if isinstance(name, str):
            return ToolSpec(name, schemas.get(name), forced=True)
    if schemas:
        name = next(iter(schemas))
        return ToolSpec(name, schemas[name])
    return None


def parse_messages(payload: dict[str, Any], seed: int, invalid_replies: int = 0) -> Generation:
    """Parse a ``POST /v1/messages`` body and answer it.

    The conversation's text is the system prompt (if any) followed by the messages' texts,
    so an OpenAI request with the same system and user texts gets the same reply. A
    forced tool's arguments break its schema while the conversation has fewer than
    ``invalid_replies`` assistant turns.

    Raises:
        BadRequest: A required field is missing or has the wrong type.
    """
    model = require_model(payload)
    max_tokens = optional_int(payload, "max_tokens")
    if max_tokens is None or max_tokens < 1:
        raise BadRequest("max_tokens: an integer >= 1 is required.", "max_tokens")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty array of messages is required.", "messages")
    texts = []
    system = payload.get("system")
    if system is not None:
        system_text = _blocks_text(system)
        if system_text is None:
            raise BadRequest("system: a string or an array of text blocks is expected.", "system")
        texts.append(system_text)
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise BadRequest(
                f"messages.{position}.role: 'user' or 'assistant' is required.",
                f"messages.{position}.role",
            )
        text = _blocks_text(message.get("content"))
        if text is None:
            raise BadRequest(
                f"messages.{position}.content: a string or an array of blocks is required.",
                f"messages.{position}.content",
            )
        texts.append(text)
    choices = build_choices(
        conversation="\n".join(texts),
        seed=seed,
        n=1,
        max_tokens=max_tokens,
        tool=_tool(payload),
        response_format="text",
        invalid=sum(m["role"] == "assistant" for m in messages) < invalid_replies,
    )
    return Generation(
        model=model,
        prompt_tokens=prompt_tokens(texts),
        choices=choices,
        stream=optional_bool(payload, "stream"),
        include_usage=False,
    )


def _block(choice: Choice) -> dict[str, Any]:
    call = choice.tool_call
    if call is None:
        return {"type": "text", "text": choice.text}
    arguments = json.loads(call.arguments)
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.name,
        "input": arguments if isinstance(arguments, dict) else {"value": arguments},
    }


def message_body_rest(generation: Generation) -> bytes:
    """Render a Messages API ``message`` object without its ``id``."""
    choice = generation.choices[0]
    payload = {
        "type": "message",
        "role": "assistant",
        "model": generation.model,
        "content": [_block(choice)],
        "stop_reason": STOP_REASONS[choice.finish_reason],
        "stop_sequence": None,
        "usage": {
            "input_tokens": generation.prompt_tokens,
            "output_tokens": generation.completion_tokens,
        },
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    data = json.dumps({"type": kind, **payload}, separators=(",", ":"))
    return b"event: " + kind.encode() + b"\ndata: " + data.encode() + b"\n\n"


def message_events(
    generation: Generation, message_id: str, seconds_per_token: float
) -> list[tuple[float, bytes]]:
    """Render the SSE events of a streamed message, each with the pause before it."""
    choice = generation.choices[0]
    start: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": generation.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": generation.prompt_tokens, "output_tokens": 0},
    }
    events = [(0.0, _event("message_start", {"message": start}))]
    call = choice.tool_call
    if call is None:
        block: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [(1, {"type": "text_delta", "text": piece}) for piece in choice.pieces]
    else:
        block = {**_block(choice), "input": {}}
        pieces = split_tokens(call.arguments)
        deltas = []
        for first in range(0, len(pieces), TOOL_FRAGMENT_TOKENS):
            group = pieces[first : first + TOOL_FRAGMENT_TOKENS]
            deltas.append(
                (len(group), {"type": "input_json_delta", "partial_json": "".join(group)})
            )
    events.append((0.0, _event("content_block_start", {"index": 0, "content_block": block})))
    events.append((0.0, _event("ping", {})))
    for tokens, delta in deltas:
        events.append(
            (
                tokens * seconds_per_token,
                _event("content_block_delta", {"index": 0, "delta": delta}),
            )
        )
    events.append((0.0, _event("content_block_stop", {"index": 0})))
    events.append(
        (
            0.0,
            _event(
                "message_delta",
                {
                    "delta": {
                        "stop_reason": STOP_REASONS[choice.finish_reason],
                        "stop_sequence": None,
                    },
                    "usage": {"output_tokens": generation.completion_tokens},
                },
            ),
        )
    )
    events.append((0.0, _event("message_stop", {})))
    return events


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Return the Anthropic error type for an HTTP status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(message: str, kind: str) -> bytes:
    """Render an Anthropic error object."""
    payload = {"type": "error", "error": {"type": kind, "message": message}}
    return json.dumps(payload, separators=(",", ":")).encode()
