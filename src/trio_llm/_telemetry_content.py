"""What a call's span records of its prompts and replies, when it may record them.

Only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` is ``true`` (the variable
other GenAI instrumentations read): the semantic conventions' ``gen_ai.input.messages``,
``gen_ai.system_instructions`` and ``gen_ai.output.messages``, from an OpenAI or Anthropic
request body and a parsed reply (:mod:`trio_llm._telemetry`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

from . import _json
from ._types import Choice

__all__ = ["CAPTURE_CONTENT_ENV", "capture_content", "input_messages", "output_message"]

#: Read per call; "true" records prompts and replies.
CAPTURE_CONTENT_ENV: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def capture_content() -> bool:
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() in ("true", "1", "yes")


def _parts(content: object) -> list[dict[str, Any]]:
    """The semantic conventions' message parts of an OpenAI or Anthropic ``content``."""
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    if isinstance(content, Sequence):
        for part in content:
            if not isinstance(part, Mapping):
                continue
            if isinstance(part.get("text"), str):
                parts.append({"type": "text", "content": part["text"]})
            else:
                parts.append({"type": str(part.get("type", "unknown"))})
    return parts


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    """OpenAI-style ``tool_calls`` as the semantic conventions' ``tool_call`` parts."""
    parts: list[dict[str, Any]] = []
    for call in calls or ():
        if isinstance(call, Mapping):
            function = call.get("function") or {}
            parts.append(
                {
                    "type": "tool_call",
                    "id": call.get("id"),
                    "name": function.get("name"),
                    "arguments": function.get("arguments"),
                }
            )
    return parts


def input_messages(body: Mapping[str, Any]) -> dict[str, str]:
    """``gen_ai.input.messages`` (and ``gen_ai.system_instructions``) of a request body."""
    attributes: dict[str, str] = {}
    messages = body.get("messages")
    if isinstance(messages, list):
        converted = []
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            parts = _parts(message.get("content")) + _tool_calls(message.get("tool_calls"))
            converted.append({"role": str(message.get("role", "user")), "parts": parts})
        attributes["gen_ai.input.messages"] = _json.dumps(converted).decode()
    system = body.get("system")
    if system is not None:
        attributes["gen_ai.system_instructions"] = _json.dumps(_parts(system)).decode()
    return attributes


def output_message(choice: Choice) -> dict[str, Any]:
    parts = _parts(choice.text) if choice.text else []
    parts += _tool_calls(choice.message.get("tool_calls"))
    return {"role": "assistant", "parts": parts, "finish_reason": choice.finish_reason or ""}
