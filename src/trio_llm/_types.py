"""Result types: frozen attrs classes parsed from wire payloads with ``from_json``.

Each keeps the decoded payload in ``raw``, so fields the model does not name (logprobs,
system_fingerprint, provider extensions) are never lost.
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar, final

import attrs

__all__ = [
    "ChatChunk",
    "ChatResponse",
    "Choice",
    "EmbeddingResponse",
    "Result",
    "Usage",
    "set_cost",
]

T = TypeVar("T")

JSONObject = dict[str, Any]


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _count(value: object) -> int:
    """A token count: a negative one is malformed, read as missing (0)."""
    return max(_int(value), 0)


@final
@attrs.frozen(kw_only=True)
class Usage:
    """Token counts the server reported for one request.

    Attributes:
        prompt_tokens: tokens of the prompt, those read from or written to the
            provider's prompt cache included.
        completion_tokens: tokens of the reply (reasoning tokens included).
        total_tokens: both.
        cache_read_tokens: of ``prompt_tokens``, those read from the prompt cache
            (OpenAI's ``prompt_tokens_details.cached_tokens``, Anthropic's
            ``cache_read_input_tokens``).
        cache_write_tokens: of ``prompt_tokens``, those written to the prompt cache
            (Anthropic's ``cache_creation_input_tokens``).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @classmethod
    def from_json(cls, payload: object) -> Usage:
        """Parse an OpenAI ``usage`` object (missing, ``null`` or negative gives zeros).

        Cache writes are read from ``cache_creation_input_tokens`` (Anthropic's name, which
        the Anthropic adapter and some OpenAI-compatible proxies put there).
        """
        if not isinstance(payload, Mapping):
            return cls()
        prompt = _count(payload.get("prompt_tokens"))
        completion = _count(payload.get("completion_tokens"))
        total = _count(payload.get("total_tokens")) or prompt + completion
        details = payload.get("prompt_tokens_details")
        read = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
        write = _count(payload.get("cache_creation_input_tokens"))
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total,
            cache_read_tokens=read,
            cache_write_tokens=write,
        )


@final
@attrs.frozen(kw_only=True)
class Choice:
    """One alternative of a chat reply (``n`` > 1 asks for several).

    Attributes:
        index: position among the choices.
        text: the message content (``""`` when the model only called tools).
        message: the message object as sent: ``role``, ``content``, ``tool_calls``, ...
        finish_reason: ``"stop"``, ``"length"``, ``"tool_calls"``, ``"content_filter"``, ...
    """

    index: int
    text: str
    message: JSONObject
    finish_reason: str | None

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> Choice:
        """Parse one element of an OpenAI ``choices`` array."""
        message = payload.get("message")
        if not isinstance(message, dict):
            message = {}
        content = message.get("content")
        return cls(
            index=_int(payload.get("index")),
            text=content if isinstance(content, str) else "",
            message=message,
            finish_reason=payload.get("finish_reason"),
        )


@final
@attrs.frozen(kw_only=True)
class ChatResponse:
    """A chat completion.

    Attributes:
        id: the server's completion id.
        model: the model that answered.
        text: the first choice's content (``""`` if it only called tools).
        message: the first choice's message object, tool calls included.
        finish_reason: the first choice's finish reason.
        usage: token counts.
        choices: every choice, for ``n`` > 1.
        raw: the whole decoded payload.
        request_id: the server's id for the request (the provider's header), if it sent one.
        cost: what the call cost in USD (the model's list price, or the client's
            ``prices``), ``None`` when unknown (see ``docs/howto-cost.md``); ``0.0`` for
            a reply from the client's response cache: nothing was spent. Not compared.
        cached: ``True`` for a reply from the client's response cache, ``False`` for one
            from the server. Not compared: a cached reply equals the one it replays.
        endpoint: the name of the endpoint that answered (:attr:`Endpoint.name`; for a
            client opened with ``base_url=``, its host and port; for a cached reply, the
            one that answered the stored reply). Not compared by ``==``.
    """

    id: str
    model: str
    text: str
    message: JSONObject
    finish_reason: str | None
    usage: Usage
    choices: tuple[Choice, ...]
    raw: JSONObject = attrs.field(repr=False)
    request_id: str | None = None
    cost: float | None = attrs.field(default=None, eq=False)
    cached: bool = attrs.field(default=False, eq=False)
    endpoint: str | None = attrs.field(default=None, eq=False)

    @property
    def tool_calls(self) -> list[JSONObject]:
        """The first choice's tool calls (``[]`` when there are none), as sent."""
        calls = self.message.get("tool_calls")
        return list(calls) if isinstance(calls, list) else []

    @classmethod
    def from_json(cls, payload: JSONObject, *, request_id: str | None = None) -> ChatResponse:
        """Parse an OpenAI ``chat.completion`` object."""
        raw_choices = payload.get("choices")
        choices = tuple(Choice.from_json(c) for c in (raw_choices or ()) if isinstance(c, Mapping))
        first = choices[0] if choices else Choice(index=0, text="", message={}, finish_reason=None)
        return cls(
            id=str(payload.get("id", "")),
            model=str(payload.get("model", "")),
            text=first.text,
            message=first.message,
            finish_reason=first.finish_reason,
            usage=Usage.from_json(payload.get("usage")),
            choices=choices,
            raw=payload,
            request_id=request_id,
        )


_NO_CALLS: tuple[JSONObject, ...] = ()


@final
@attrs.frozen(kw_only=True)
class ChatChunk:
    """One streamed delta of one choice of a chat reply.

    Attributes:
        text: the content delta (``""`` when this delta carries none).
        index: the choice it belongs to (``0`` unless ``n`` > 1).
        finish_reason: set on the choice's last delta (``"stop"``, ``"length"``, ...).
        tool_calls: tool-call deltas as sent, each with an ``index`` and parts of a call
            (``id``, ``function.name``, a fragment of ``function.arguments``).
        delta: the choice's ``delta`` object as sent (``role``, ``refusal``, provider
            extensions such as ``reasoning_content``).
        raw: the whole decoded event (shared by the chunks of one event).
    """

    text: str
    index: int = 0
    finish_reason: str | None = None
    tool_calls: tuple[JSONObject, ...] = ()
    delta: JSONObject = attrs.field(factory=dict, repr=False)
    raw: JSONObject = attrs.field(factory=dict, repr=False)

    @classmethod
    def from_json(cls, payload: JSONObject, choice: Mapping[str, Any] | None = None) -> ChatChunk:
        """Parse a choice of an OpenAI ``chat.completion.chunk`` event.

        Args:
            payload: the decoded event.
            choice: the element of ``payload["choices"]`` to parse; the first by default.
        """
        if choice is None:
            choices = payload.get("choices")
            first = choices[0] if isinstance(choices, list) and choices else None
            choice = first if isinstance(first, Mapping) else {}
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        content = delta.get("content")
        calls = delta.get("tool_calls")
        finish = choice.get("finish_reason")
        # Built field by field rather than through __init__: one chunk is made per
        # streamed token, and this takes half the time (the class has no validators or
        # converters to skip; tests/test_streaming.py checks both ways agree).
        chunk = _new_object(ChatChunk)
        _set_text(chunk, content if isinstance(content, str) else "")
        _set_index(chunk, _int(choice.get("index")))
        _set_finish_reason(chunk, finish if isinstance(finish, str) else None)
        _set_tool_calls(
            chunk,
            tuple(c for c in calls if isinstance(c, dict))
            if isinstance(calls, list)
            else _NO_CALLS,
        )
        _set_delta(chunk, delta)
        _set_raw(chunk, payload)
        return chunk


# The slots' own setters, for ChatChunk.from_json.
_new_object = object.__new__
_set_text = ChatChunk.__dict__["text"].__set__
_set_index = ChatChunk.__dict__["index"].__set__
_set_finish_reason = ChatChunk.__dict__["finish_reason"].__set__
_set_tool_calls = ChatChunk.__dict__["tool_calls"].__set__
_set_delta = ChatChunk.__dict__["delta"].__set__
_set_raw = ChatChunk.__dict__["raw"].__set__


def _decode_base64_floats(data: str) -> list[float]:
    values = array.array("f")
    values.frombytes(base64.b64decode(data))
    if sys.byteorder == "big":  # the wire format is little-endian float32
        values.byteswap()
    return values.tolist()


@final
@attrs.frozen(kw_only=True)
class EmbeddingResponse:
    """Embedding vectors, one per input text, in input order.

    Attributes:
        vectors: one list of floats per input (base64 payloads are decoded).
        model: the model that answered.
        usage: token counts.
        raw: the whole decoded payload.
        request_id: the server's id for the request (the provider's header), if it sent one.
        cost: what the call cost in USD, ``None`` when unknown, ``0.0`` from the cache
            (as ``ChatResponse.cost``; not compared).
        cached: ``True`` for a reply from the client's response cache (not compared).
        endpoint: the name of the endpoint that answered, as for :class:`ChatResponse`.
    """

    vectors: list[list[float]] = attrs.field(repr=lambda v: f"<{len(v)} vectors>")
    model: str
    usage: Usage
    raw: JSONObject = attrs.field(repr=False)
    request_id: str | None = None
    cost: float | None = attrs.field(default=None, eq=False)
    cached: bool = attrs.field(default=False, eq=False)
    endpoint: str | None = attrs.field(default=None, eq=False)

    @classmethod
    def from_json(cls, payload: JSONObject, *, request_id: str | None = None) -> EmbeddingResponse:
        """Parse an OpenAI embeddings ``list`` object (float or base64 encoding)."""
        items: Sequence[Any] = payload.get("data") or ()
        ordered = sorted(
            (item for item in items if isinstance(item, Mapping)),
            key=lambda item: _int(item.get("index")),
        )
        vectors = []
        for item in ordered:
            embedding = item.get("embedding")
            if isinstance(embedding, str):
                vectors.append(_decode_base64_floats(embedding))
            else:
                vectors.append([float(x) for x in embedding or ()])
        return cls(
            vectors=vectors,
            model=str(payload.get("model", "")),
            usage=Usage.from_json(payload.get("usage")),
            raw=payload,
            request_id=request_id,
        )


# The cost slots' own setters, for set_cost.
_COST_SETTERS = {
    ChatResponse: ChatResponse.__dict__["cost"].__set__,
    EmbeddingResponse: EmbeddingResponse.__dict__["cost"].__set__,
}


def set_cost(reply: ChatResponse | EmbeddingResponse, cost: float) -> None:
    """Give a reply its cost, once priced; only before anyone else holds the reply.

    The request lifecycle prices a reply right after parsing it (``Exchange.finish``);
    setting the slot there, as ``ChatChunk.from_json`` builds its chunks, spares copying
    every field of every reply with ``attrs.evolve``.
    """
    _COST_SETTERS[type(reply)](reply, cost)


@final
@attrs.frozen(kw_only=True)
class Result(Generic[T]):
    """The outcome of one item of a fan-out: a value, or the error it raised.

    Attributes:
        ok: ``True`` if the item succeeded.
        value: the item's value when ``ok``, else ``None``.
        error: the exception the item raised when not ``ok``, else ``None``.
    """

    ok: bool
    value: T | None = None
    error: Exception | None = None

    def unwrap(self) -> T:
        """Return the value, or raise the item's error."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]
