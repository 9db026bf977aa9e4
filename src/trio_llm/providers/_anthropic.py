"""The Anthropic Messages API adapter (``POST /v1/messages``).

Callers speak one dialect, OpenAI's: messages with ``system`` / ``tool`` roles and
``tool_calls``, ``tools`` as functions, ``tool_choice``, ``stop``. This adapter translates
them into a Messages request, and the reply back into the same :class:`ChatResponse`
(``message.tool_calls`` with JSON-string arguments, OpenAI finish reasons, OpenAI usage
names). Anthropic-native fields (content blocks, tools with ``input_schema``, a
``system`` keyword) pass through unchanged, as do keywords neither API defines.

``response_format`` (``json_schema``, or ``json_object``: any object) becomes what the
Messages API offers for structured output: a tool, :data:`OUTPUT_TOOL`, whose
``input_schema`` is the schema, and a ``tool_choice`` that forces it. The reply's call
of that tool comes back as the reply's text (its input, as JSON) with finish reason
``"stop"``, as OpenAI returns structured output; streamed, its input arrives as content.

Streams are translated event by event into OpenAI-shaped ``chat.completion.chunk``
payloads, so the client aggregates them as it does OpenAI's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, final

from .._errors import ConfigurationError
from .._ratelimit import RateLimitLevel, RateLimitLevels
from .._types import ChatResponse, Choice, EmbeddingResponse, JSONObject, Usage
from ._base import Messages
from ._headers import parse_count, parse_limit, parse_rfc3339_delay, prefixed
from ._openai import as_messages

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_MAX_TOKENS", "OUTPUT_TOOL", "AnthropicProvider"]

#: The ``anthropic-version`` header sent with every request.
ANTHROPIC_VERSION: Final = "2023-06-01"

#: ``max_tokens`` when the caller gives none: the API requires one, OpenAI's does not.
DEFAULT_MAX_TOKENS: Final = 1024

_FINISH_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: The tool a ``response_format`` is sent as. The name is fixed, so a reply (streamed,
#: or read back from a batch) says by itself which call is the structured answer.
OUTPUT_TOOL: Final = "structured_output"

_TOOL_CHOICES: Final = {"auto": "auto", "required": "any", "any": "any", "none": "none"}

# The endpoints of a batch file this adapter can send: Messages bodies pass its
# translation unchanged, and OpenAI chat bodies are translated like any chat call.
_BATCH_URLS: Final = frozenset({"/v1/messages", "/v1/chat/completions"})


def finish_reason(stop_reason: object) -> str | None:
    """Map an Anthropic ``stop_reason`` to an OpenAI finish reason (others pass unchanged)."""
    if not isinstance(stop_reason, str):
        return None
    return _FINISH_REASONS.get(stop_reason, stop_reason)


def _usage(payload: object) -> JSONObject:
    """Return an OpenAI ``usage`` object for an Anthropic one.

    Cached input (written or read) is input too, so it counts in ``prompt_tokens``; the
    cache reads are also ``prompt_tokens_details.cached_tokens`` (OpenAI's name) and the
    cache writes ``cache_creation_input_tokens``, as :meth:`Usage.from_json` reads them.
    """
    if not isinstance(payload, Mapping):
        payload = {}
    counts = {}
    for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        value = payload.get(key)
        counts[key] = value if isinstance(value, int) and not isinstance(value, bool) else 0
    prompt = sum(counts.values())
    output = payload.get("output_tokens")
    completion = output if isinstance(output, int) and not isinstance(output, bool) else 0
    usage: JSONObject = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if counts["cache_read_input_tokens"]:
        usage["prompt_tokens_details"] = {"cached_tokens": counts["cache_read_input_tokens"]}
    if counts["cache_creation_input_tokens"]:
        usage["cache_creation_input_tokens"] = counts["cache_creation_input_tokens"]
    return usage


def _text_of(content: object) -> str:
    """Return the text of a string or of a list of text parts (OpenAI or Anthropic)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def _image_block(part: Mapping[str, Any]) -> JSONObject:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
        media_type, data = url[5:].split(";base64,", 1)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: object) -> list[Any]:
    """Return ``content`` as a list of Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TypeError(f"message content must be a string or a list, not {content!r:.80}")
    blocks: list[Any] = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "image_url":
            blocks.append(_image_block(part))
        elif isinstance(part, Mapping) and part.get("type") == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        else:
            blocks.append(part)  # already an Anthropic block (tool_use, document, ...)
    return blocks


def _tool_use(call: Mapping[str, Any]) -> JSONObject:
    """Translate an OpenAI ``tool_calls`` element into a ``tool_use`` block."""
    function = call.get("function")
    if not isinstance(function, Mapping):
        raise TypeError(f"a tool call needs a 'function' object, not {call!r:.80}")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise TypeError(f"tool call arguments are not JSON: {arguments!r:.80}") from exc
    if not isinstance(arguments, Mapping):
        arguments = {} if arguments is None else {"value": arguments}
    return {
        "type": "tool_use",
        "id": call.get("id"),
        "name": function.get("name"),
        "input": dict(arguments),
    }


def _convert_message(message: Mapping[str, Any]) -> JSONObject:
    """Translate one non-system message; a ``tool`` message becomes a ``tool_result``."""
    role = message["role"]
    content = message.get("content")
    if role == "tool":
        result: JSONObject = {
            "type": "tool_result",
            "tool_use_id": message.get("tool_call_id"),
            "content": content if isinstance(content, str) else _blocks(content),
        }
        return {"role": "user", "content": [result]}
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        blocks = _blocks(content) + [_tool_use(call) for call in calls]
        return {"role": "assistant", "content": blocks}
    if isinstance(content, list):
        return {"role": role, "content": _blocks(content)}
    return {"role": role, "content": content}


def split_system(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[JSONObject]]:
    """Lift ``system`` / ``developer`` messages out; translate and merge the rest.

    Consecutive messages of one role merge into one (the results of several tool calls
    must all be in the user turn after the calls).
    """
    system: list[str] = []
    converted: list[JSONObject] = []
    for message in messages:
        if message["role"] in ("system", "developer"):
            system.append(_text_of(message.get("content")))
            continue
        current = _convert_message(message)
        if converted and converted[-1]["role"] == current["role"]:
            previous = converted[-1]
            previous["content"] = _blocks(previous["content"]) + _blocks(current["content"])
        else:
            converted.append(current)
    return ("\n".join(system) if system else None), converted


def _tool(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, Mapping):
        return tool  # an Anthropic tool already (custom, or a server tool)
    converted: JSONObject = {
        "name": function.get("name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        converted["description"] = function["description"]
    return converted


def _tool_choice(choice: object) -> object:
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise TypeError(f"unknown tool_choice {choice!r}")
        return {"type": _TOOL_CHOICES[choice]}
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        return {"type": "tool", "name": name}
    return choice


def _output_tool(response_format: object) -> JSONObject | None:
    """Return the tool a ``response_format`` is sent as (``None`` for plain text)."""
    if not isinstance(response_format, Mapping):
        raise TypeError(f"response_format must be an object, not {response_format!r:.80}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        name, schema, description = "JSON object", {"type": "object"}, None
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise TypeError("response_format of type json_schema needs a 'json_schema' object")
        name = str(spec.get("name") or "response")
        schema = spec.get("schema") or {"type": "object"}
        description = spec.get("description")
    else:
        raise TypeError(f"unknown response_format type {kind!r}")
    return {
        "name": OUTPUT_TOOL,
        "description": description
        or f"Give your whole answer, a {name}, as this tool's input, and nothing else.",
        "input_schema": schema,
    }


def _apply_response_format(body: JSONObject, response_format: object) -> None:
    """Add the output tool; force it, or any tool when the caller gave tools of their own.

    A ``tool_choice`` the caller gave is kept as given.
    """
    tool = _output_tool(response_format)
    if tool is None:
        return
    tools = list(body.get("tools") or ())
    if any(isinstance(t, Mapping) and t.get("name") == OUTPUT_TOOL for t in tools):
        raise TypeError(f"a tool named {OUTPUT_TOOL!r} clashes with response_format's tool")
    body["tools"] = [*tools, tool]
    if "tool_choice" not in body:
        body["tool_choice"] = {"type": "any"} if tools else {"type": "tool", "name": OUTPUT_TOOL}


def _apply_params(body: JSONObject, params: Mapping[str, Any]) -> None:
    """Merge ``params`` into ``body``, translating the OpenAI names the API spells otherwise."""
    for key, value in params.items():
        if key == "max_completion_tokens":
            body["max_tokens"] = value
        elif key == "stop":
            if value is not None:
                body["stop_sequences"] = [value] if isinstance(value, str) else list(value)
        elif key == "tools":
            body["tools"] = [_tool(tool) for tool in value]
        elif key == "tool_choice":
            body["tool_choice"] = _tool_choice(value)
        elif key == "system":
            lifted = body.get("system")
            if lifted is None:
                body["system"] = value
            elif isinstance(value, str):
                body["system"] = f"{lifted}\n{value}"
            else:
                body["system"] = [{"type": "text", "text": lifted}, *value]
        elif key in ("parallel_tool_calls", "stream_options", "response_format"):
            continue  # handled below / OpenAI-only
        else:
            body[key] = value
    if params.get("response_format") is not None:
        _apply_response_format(body, params["response_format"])
    if params.get("parallel_tool_calls") is False:
        choice = body.get("tool_choice")
        choice = dict(choice) if isinstance(choice, Mapping) else {"type": "auto"}
        choice["disable_parallel_tool_use"] = True
        body["tool_choice"] = choice


def message_to_openai(payload: Mapping[str, Any]) -> tuple[str | None, JSONObject]:
    """Return the text and an OpenAI-shaped assistant message for a Messages reply.

    A call of :data:`OUTPUT_TOOL` is the reply's text: its input, as JSON.
    """
    texts: list[str] = []
    calls: list[JSONObject] = []
    thinking: list[str] = []
    output: str | None = None
    for block in payload.get("content") or ():
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and block.get("name") == OUTPUT_TOOL:
            output = json.dumps(block.get("input"), ensure_ascii=False)
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
                    },
                }
            )
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
    text = output if output is not None else "".join(texts) if texts else None
    message: JSONObject = {"role": "assistant", "content": text, "refusal": None}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return text, message


def _answered(payload: Mapping[str, Any]) -> bool:
    """Whether a Messages reply calls :data:`OUTPUT_TOOL`."""
    return any(
        isinstance(block, Mapping) and block.get("name") == OUTPUT_TOOL
        for block in payload.get("content") or ()
    )


def _rate_limit_level(fields: Mapping[str, str], kind: str) -> RateLimitLevel:
    """Return the ``requests`` or ``tokens`` level of ``anthropic-ratelimit-*`` headers.

    Without a combined ``tokens-*`` group, the tokens level is the ``input-tokens`` or
    ``output-tokens`` group with less remaining: the most restrictive counts.
    """
    groups = [kind]
    if kind == "tokens" and not any(name.startswith("tokens-") for name in fields):
        groups = ["input-tokens", "output-tokens"]
    best = RateLimitLevel()
    for group in groups:
        level = RateLimitLevel(
            limit=parse_limit(fields.get(f"{group}-limit")),
            remaining=parse_count(fields.get(f"{group}-remaining")),
            reset_seconds=parse_rfc3339_delay(fields.get(f"{group}-reset")),
        )
        if best.remaining is None or (
            level.remaining is not None and level.remaining < best.remaining
        ):
            best = level
    return best


# Anthropic's error types, as the statuses they come with.
_ERROR_STATUSES: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


@final
class _MessageStream:
    """Translate one stream's Messages events into ``chat.completion.chunk`` payloads."""

    __slots__ = ("_head", "_input", "_output", "_tools", "done")

    def __init__(self) -> None:
        self._head: JSONObject = {"id": "", "object": "chat.completion.chunk", "model": ""}
        self._input: object = None  # message_start's usage
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._output: object = None  # the content block index of the output tool's call
        self.done = False

    def _chunk(self, delta: JSONObject, finish: str | None = None) -> JSONObject:
        return {**self._head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def translate(self, event: str, payload: JSONObject) -> list[JSONObject]:
        kind = payload.get("type", event)
        if kind == "content_block_delta":  # nearly every event: one piece of a block
            delta = payload.get("delta")
            if not isinstance(delta, Mapping):
                return []
            delta_kind = delta.get("type")
            if delta_kind == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta_kind == "input_json_delta":
                if payload.get("index", 0) == self._output:
                    return [self._chunk({"content": delta.get("partial_json", "")})]
                call = {
                    "index": self._tools.get(payload.get("index", 0), 0),
                    "function": {"arguments": delta.get("partial_json", "")},
                }
                return [self._chunk({"tool_calls": [call]})]
            if delta_kind == "thinking_delta":
                return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
            return []  # signature_delta, citations_delta, ...
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, Mapping):
                self._head["id"] = str(message.get("id", ""))
                self._head["model"] = str(message.get("model", ""))
                self._input = message.get("usage")
            return [self._chunk({"role": "assistant"})]
        if kind == "content_block_start":
            block = payload.get("content_block")
            if not isinstance(block, Mapping):
                return []
            if block.get("type") == "tool_use" and block.get("name") == OUTPUT_TOOL:
                self._output = payload.get("index", 0)  # its input is the reply's content
                return []
            if block.get("type") == "tool_use":
                index = self._tools[payload.get("index", 0)] = len(self._tools)
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "message_delta":
            delta = payload.get("delta")
            stop = delta.get("stop_reason") if isinstance(delta, Mapping) else None
            # message_delta's usage is cumulative; input counts may come only at the start.
            usage = dict(self._input) if isinstance(self._input, Mapping) else {}
            if isinstance(payload.get("usage"), Mapping):
                usage.update((k, v) for k, v in payload["usage"].items() if v is not None)
            finish = finish_reason(stop)
            if finish == "tool_calls" and not self._tools and self._output is not None:
                finish = "stop"  # only the output tool was called
            chunk = self._chunk({}, finish)
            chunk["usage"] = _usage(usage)
            return [chunk]
        if kind == "message_stop":
            self.done = True
        return []  # ping, content_block_stop, message_stop, unknown events


@final
class AnthropicProvider:
    """Build and parse requests of the Anthropic Messages API."""

    name: Final = "anthropic"
    default_base_url: Final = "https://api.anthropic.com"
    base_url_env: Final = "ANTHROPIC_BASE_URL"
    api_key_env: Final = "ANTHROPIC_API_KEY"
    chat_path: Final = "/v1/messages"
    # The API has none; embeddings_body raises before this is used.
    embeddings_path: Final = ""

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        """Return the version header, and the key's (none without a key)."""
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def chat_body(
        self, prompt_or_messages: Messages, model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return a Messages request body.

        System messages are lifted into ``system``; tool calls and results become
        ``tool_use`` and ``tool_result`` blocks; ``max_tokens`` defaults to
        :data:`DEFAULT_MAX_TOKENS`. Other params pass through unchanged.
        """
        system, messages = split_system(as_messages(prompt_or_messages))
        body: JSONObject = {"model": model, "max_tokens": DEFAULT_MAX_TOKENS, "messages": messages}
        if system is not None:
            body["system"] = system
        _apply_params(body, params)
        return body

    def stream_body(
        self, prompt_or_messages: Messages, model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return a streamed Messages request body (usage is always in the events)."""
        body = self.chat_body(prompt_or_messages, model, params)
        body["stream"] = True
        return body

    def stream_translator(self) -> _MessageStream:
        """Return a translator of one stream's events."""
        return _MessageStream()

    def stream_content_started(self, event: str, payload: JSONObject) -> bool:
        """Whether an event carries part of the reply: a delta, a tool call, the end.

        ``message_start``, ``ping`` and the start of a text or thinking block are framing.
        """
        kind = payload.get("type", event)
        if kind == "content_block_start":
            block = payload.get("content_block")
            return isinstance(block, Mapping) and block.get("type") not in ("text", "thinking")
        return kind not in ("message_start", "ping")

    def stream_error_status(self, error: object) -> int:
        """The status of an error event's ``type`` (``overloaded_error``: 529; else 500)."""
        kind = error.get("type") if isinstance(error, Mapping) else None
        return _ERROR_STATUSES.get(str(kind), 500)

    def parse_chat(self, payload: dict[str, Any], request_id: str | None) -> ChatResponse:
        """Parse a Messages reply; ``raw`` keeps it as sent."""
        text, message = message_to_openai(payload)
        finish = finish_reason(payload.get("stop_reason"))
        if finish == "tool_calls" and "tool_calls" not in message and _answered(payload):
            finish = "stop"  # only the output tool was called: the answer is complete
        choice = Choice(index=0, text=text or "", message=message, finish_reason=finish)
        return ChatResponse(
            id=str(payload.get("id", "")),
            model=str(payload.get("model", "")),
            text=choice.text,
            message=message,
            finish_reason=finish,
            usage=Usage.from_json(_usage(payload.get("usage"))),
            choices=(choice,),
            raw=payload,
            request_id=request_id,
        )

    def embeddings_body(
        self, texts: str | Sequence[str], model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Refuse: the Anthropic API has no embeddings endpoint.

        Raises:
            ConfigurationError: always.
        """
        raise ConfigurationError(
            "the anthropic provider has no embeddings endpoint; "
            "use an OpenAI-compatible client for embed()"
        )

    def parse_embeddings(
        self, payload: dict[str, Any], request_id: str | None
    ) -> EmbeddingResponse:  # pragma: no cover - embeddings_body always raises
        """Never called: :meth:`embeddings_body` refuses first."""
        raise ConfigurationError("the anthropic provider has no embeddings endpoint")

    def request_id(self, headers: Mapping[str, str]) -> str | None:
        """Return the ``request-id`` header, or ``x-request-id`` (some proxies send that)."""
        return headers.get("request-id") or headers.get("x-request-id") or None

    def rate_limit_levels(self, headers: Mapping[str, str]) -> RateLimitLevels | None:
        """Read ``anthropic-ratelimit-{group}-{limit,remaining,reset}``.

        Groups: ``requests``, and ``tokens`` or else the tighter of ``input-tokens`` and
        ``output-tokens``. Resets are RFC 3339 times, converted with the wall clock. Token
        limits are per direction (``tokens_per_direction``). ``None`` when the response
        has no ``anthropic-ratelimit-*`` header.
        """
        fields = prefixed(headers, "anthropic-ratelimit-")
        if not fields:
            return None
        return RateLimitLevels(
            requests=_rate_limit_level(fields, "requests"),
            tokens=_rate_limit_level(fields, "tokens"),
            tokens_per_direction=True,
        )

    def accepts_batch_url(self, url: str) -> bool:
        """Return whether ``url`` is ``/v1/messages`` or ``/v1/chat/completions``."""
        return url in _BATCH_URLS
