"""OpenAI wire format: parse chat/embedding requests, render responses and SSE chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from ._replies import count_tokens, embedding, embedding_base64, split_tokens
from ._types import (
    BadRequest,
    Choice,
    Generation,
    ToolSpec,
    build_choices,
    is_integer,
    optional_bool,
    optional_int,
    prompt_tokens,
    require_model,
)

ROLES = frozenset({"developer", "system", "user", "assistant", "tool", "function"})
MAX_CHOICES = 128
DEFAULT_DIMENSIONS = 32
# The real API refuses more dimensions than a model has (400), but the published schema
# documents no 400 for embeddings, and the fake server is fuzzed against it: cap instead.
MAX_DIMENSIONS = 8192
MAX_EMBEDDING_INPUTS = 2048
MODEL_CREATED = 1_700_000_000
TOOL_FRAGMENT_TOKENS = 4

_json_string = lru_cache(maxsize=8192)(json.dumps)


def content_text(content: object) -> str | None:
    """Return the text of a message's content (string or content parts); None if invalid.

    Text parts are concatenated; other parts (images, audio, files) carry no text.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                return None
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)
    return None


def _tool(payload: dict[str, Any]) -> ToolSpec | None:
    tools = payload.get("tools")
    choice = payload.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    functions: dict[str, object] = {}
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        function = tool.get("function")
        if tool.get("type") == "function" and isinstance(function, dict):
            name = function.get("name")
            if isinstance(name, str) and name not in functions:
                functions[name] = function.get("parameters")
    wanted: str | None = None
    if isinstance(choice, dict):
        named = choice.get("function")
        allowed = choice.get("allowed_tools")
        if choice.get("type") == "function" and isinstance(named, dict):
            wanted = named.get("name") if isinstance(named.get("name"), str) else None
        elif choice.get("type") == "allowed_tools" and isinstance(allowed, dict):
            for entry in allowed.get("tools") or ():
                function = entry.get("function") if isinstance(entry, dict) else None
                if isinstance(function, dict) and isinstance(function.get("name"), str):
                    wanted = function["name"]
                    break
        elif choice.get("type") == "custom":
            return None
    if wanted is not None:
        forced = isinstance(choice, dict) and choice.get("type") == "function"
        return ToolSpec(wanted, functions.get(wanted), forced=forced)
    if functions:
        name = next(iter(functions))
        return ToolSpec(name, functions[name])
    return None


def _response_format(payload: dict[str, Any]) -> tuple[str, object]:
    fmt = payload.get("response_format")
    if not isinstance(fmt, dict):
        return "text", None
    kind = fmt.get("type")
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        return "json_schema", spec.get("schema") if isinstance(spec, dict) else None
    return "text", None


def parse_chat(payload: dict[str, Any], seed: int, invalid_replies: int = 0) -> Generation:
    """Parse a ``POST /v1/chat/completions`` body and answer it.

    A structured reply (``json_schema``, or a forced tool's arguments) breaks its schema
    while the conversation has fewer than ``invalid_replies`` assistant turns.

    Raises:
        BadRequest: A required field is missing or has the wrong type.
    """
    model = require_model(payload)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of messages.", "messages")
    texts = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{position}] must be an object.", f"messages[{position}]")
        if message.get("role") not in ROLES:
            raise BadRequest(
                f"messages[{position}].role must be one of {', '.join(sorted(ROLES))}.",
                f"messages[{position}].role",
            )
        text = content_text(message.get("content"))
        if text is None:
            raise BadRequest(
                f"messages[{position}].content must be a string or an array of content parts.",
                f"messages[{position}].content",
            )
        texts.append(text)
    n = optional_int(payload, "n")
    if n is None:
        n = 1
    if not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"'n' must be between 1 and {MAX_CHOICES}.", "n")
    max_tokens = optional_int(payload, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = optional_int(payload, "max_tokens")
    stream = optional_bool(payload, "stream")
    options = payload.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    response_format, schema = _response_format(payload)
    choices = build_choices(
        conversation="\n".join(texts),
        seed=seed,
        n=n,
        max_tokens=max_tokens,
        tool=_tool(payload),
        response_format=response_format,
        schema=schema,
        invalid=sum(m["role"] == "assistant" for m in messages) < invalid_replies,
    )
    return Generation(
        model=model,
        prompt_tokens=prompt_tokens(texts),
        choices=choices,
        stream=stream,
        include_usage=include_usage and stream,
    )


def _usage(generation: Generation) -> dict[str, int]:
    completion = generation.completion_tokens
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": generation.prompt_tokens + completion,
    }


def _message(choice: Choice) -> dict[str, Any]:
    if choice.tool_call is None:
        return {"role": "assistant", "content": choice.text, "refusal": None}
    call = choice.tool_call
    return {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
        ],
    }


def chat_body_rest(generation: Generation, fingerprint: str) -> bytes:
    """Render a ``chat.completion`` object without its ``id`` and ``created`` fields.

    The result starts with ``{`` and has at least one field; see ``with_identity``.
    """
    payload = {
        "object": "chat.completion",
        "model": generation.model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": choice.index,
                "message": _message(choice),
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
            for choice in generation.choices
        ],
        "usage": _usage(generation),
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def with_identity(rest: bytes, object_id: str, created: int | None = None) -> bytes:
    """Prepend ``"id"`` (and ``"created"``) to a JSON object rendered without them."""
    head = b'{"id":"' + object_id.encode() + b'",'
    if created is not None:
        head += b'"created":' + str(created).encode() + b","
    return head + rest[1:]


def _steps(choice: Choice) -> list[tuple[int, str]]:
    """Return the deltas after the first one, each as (tokens, delta JSON)."""
    if choice.tool_call is None:
        return [(1, '{"content":' + _json_string(piece) + "}") for piece in choice.pieces]
    pieces = split_tokens(choice.tool_call.arguments)
    out = []
    for start in range(0, len(pieces), TOOL_FRAGMENT_TOKENS):
        group = pieces[start : start + TOOL_FRAGMENT_TOKENS]
        fragment = json.dumps(
            {"tool_calls": [{"index": 0, "function": {"arguments": "".join(group)}}]},
            separators=(",", ":"),
        )
        out.append((count_tokens("".join(group)), fragment))
    return out


def _first_delta(choice: Choice) -> str:
    call = choice.tool_call
    if call is None:
        return '{"role":"assistant","content":""}'
    return json.dumps(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
            ],
        },
        separators=(",", ":"),
    )


def chat_events(
    generation: Generation,
    completion_id: str,
    created: int,
    fingerprint: str,
    seconds_per_token: float,
) -> list[tuple[float, bytes]]:
    """Render the SSE events of a streamed chat completion, each with the pause before it.

    Choices advance side by side: one step sends the next delta of every unfinished choice.
    """
    head = (
        '{"id":"' + completion_id + '","object":"chat.completion.chunk","created":'
        + str(created) + ',"model":' + _json_string(generation.model)
        + ',"system_fingerprint":"' + fingerprint + '","choices":['
    )  # fmt: skip
    tail = '],"usage":null}' if generation.include_usage else "]}"

    def event(index: int, delta: str, finish: str | None) -> bytes:
        reason = "null" if finish is None else '"' + finish + '"'
        choice = f'{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{reason}}}'
        return b"data: " + (head + choice + tail).encode() + b"\n\n"

    events = [
        (0.0, event(choice.index, _first_delta(choice), None)) for choice in generation.choices
    ]
    steps = [_steps(choice) for choice in generation.choices]
    for position in range(max(map(len, steps), default=0)):
        pause = max(s[position][0] for s in steps if position < len(s)) * seconds_per_token
        for choice, choice_steps in zip(generation.choices, steps, strict=True):
            if position < len(choice_steps):
                events.append((pause, event(choice.index, choice_steps[position][1], None)))
                pause = 0.0
    events.extend((0.0, event(c.index, "{}", c.finish_reason)) for c in generation.choices)
    if generation.include_usage:
        usage = json.dumps(_usage(generation), separators=(",", ":"))
        events.append((0.0, b"data: " + (head + '],"usage":' + usage + "}").encode() + b"\n\n"))
    events.append((0.0, b"data: [DONE]\n\n"))
    return events


def _embedding_items(raw: object) -> Iterator[tuple[str, int]]:
    """Yield (hash key, tokens) for each input; raise ``BadRequest`` when malformed."""
    invalid = BadRequest(
        "'input' must be a string, an array of strings, an array of integers "
        "or an array of arrays of integers.",
        "input",
    )
    if isinstance(raw, str):
        yield raw, count_tokens(raw)
        return
    if not isinstance(raw, list) or not raw or len(raw) > MAX_EMBEDDING_INPUTS:
        raise invalid
    if all(is_integer(x) for x in raw):
        yield "\x00tokens:" + ",".join(str(int(x)) for x in raw), len(raw)
        return
    for item in raw:
        if isinstance(item, str):
            yield item, count_tokens(item)
        elif isinstance(item, list) and item and all(is_integer(x) for x in item):
            yield "\x00tokens:" + ",".join(str(int(x)) for x in item), len(item)
        else:
            raise invalid


def parse_embeddings(payload: dict[str, Any], seed: int) -> tuple[bytes, int]:
    """Answer a ``POST /v1/embeddings`` body; return the JSON body and the prompt tokens.

    Raises:
        BadRequest: A required field is missing or has the wrong type.
    """
    model = require_model(payload)
    if "input" not in payload:
        raise BadRequest("You must provide an input parameter.", "input")
    items = list(_embedding_items(payload["input"]))
    dimensions = optional_int(payload, "dimensions")
    if dimensions is None:
        dimensions = DEFAULT_DIMENSIONS
    if dimensions < 1:
        raise BadRequest("'dimensions' must be at least 1.", "dimensions")
    dimensions = min(dimensions, MAX_DIMENSIONS)
    encoding = payload.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    vector = embedding_base64 if encoding == "base64" else embedding
    tokens = sum(count for _, count in items)
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector(key, seed, dimensions)}
            for index, (key, _) in enumerate(items)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json.dumps(body, separators=(",", ":")).encode(), tokens


def model_object(name: str) -> dict[str, Any]:
    """Describe one model."""
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "trio-llm"}


def models_body(models: tuple[str, ...]) -> bytes:
    """Render ``GET /v1/models``."""
    payload = {"object": "list", "data": [model_object(name) for name in models]}
    return json.dumps(payload, separators=(",", ":")).encode()


def error_body(message: str, kind: str, param: str | None, code: str | None) -> bytes:
    """Render an OpenAI error object."""
    payload = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json.dumps(payload, separators=(",", ":")).encode()
