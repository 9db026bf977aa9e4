"""Deterministic content of the fake server: tokens, reply texts, JSON values, embeddings.

The fake tokenizer: a token is a run of word characters or a single other non-space
character (the regular expression ``\\w+|[^\\w\\s]``). ``"Hello, world!"`` is four tokens.
A prompt costs the tokens of each message's text plus ``MESSAGE_OVERHEAD`` per message, plus
``REPLY_OVERHEAD`` once (the primed assistant turn), as in OpenAI's own token counting recipe.

Everything here is a pure function of its arguments (texts hashed with BLAKE2b, never the
salted built-in ``hash``), cached, so the same question always gets the same answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
import struct
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
MESSAGE_OVERHEAD = 3
REPLY_OVERHEAD = 3
MIN_REPLY_TOKENS = 8
MAX_REPLY_TOKENS = 40

_DETERMINERS = ("the", "a", "each", "every", "some", "this", "our", "one")
_ADJECTIVES = (
    "quick", "careful", "useful", "small", "large", "early", "later", "simple", "steady",
    "patient", "clear", "bright", "quiet", "eager", "honest", "gentle",
)  # fmt: skip
_NOUNS = (
    "model", "answer", "question", "token", "stream", "server", "client", "request", "reply",
    "system", "network", "signal", "value", "result", "example", "detail", "reason", "method",
    "pattern", "message", "context", "memory", "task", "nursery", "channel", "deadline",
)  # fmt: skip
_VERBS = (
    "sends", "reads", "keeps", "makes", "finds", "checks", "builds", "returns", "holds",
    "shapes", "follows", "carries", "opens", "closes", "waits for", "writes",
)  # fmt: skip
_PREPOSITIONS = ("to", "in", "with", "for", "from", "over", "near", "after")
_CONJUNCTIONS = ("and", "but", "so", "while", "because", "then")
# One sentence walks this pattern of word classes (and may stop early).
_PATTERN = (
    _DETERMINERS, _ADJECTIVES, _NOUNS, _VERBS, _DETERMINERS, _NOUNS, _PREPOSITIONS,
    _DETERMINERS, _ADJECTIVES, _NOUNS, _CONJUNCTIONS, _DETERMINERS, _NOUNS, _VERBS,
)  # fmt: skip
_VOCABULARY = tuple(word for words in (_NOUNS, _ADJECTIVES, _VERBS) for word in words)


def count_tokens(text: str) -> int:
    """Return the number of fake tokens in ``text``."""
    return len(TOKEN_PATTERN.findall(text))


@lru_cache(maxsize=4096)
def split_tokens(text: str) -> tuple[str, ...]:
    """Split ``text`` into pieces of one token each, whose concatenation is ``text``.

    Each piece carries the whitespace before its token; trailing whitespace joins the last.
    """
    pieces: list[str] = []
    start = 0
    for match in TOKEN_PATTERN.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        if pieces:
            pieces[-1] += text[start:]
        else:
            pieces.append(text[start:])
    return tuple(pieces)


def _rng(*parts: object) -> random.Random:
    digest = hashlib.blake2b(
        "\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_VOCABULARY).split(" ")[0] for _ in range(count))


@lru_cache(maxsize=8192)
def reply_pieces(conversation: str, seed: int, index: int = 0) -> tuple[str, ...]:
    """Return the full reply to ``conversation`` as token pieces (see ``split_tokens``).

    The reply is 8 to 40 tokens of sentence-like words ending with a period. ``index`` tells
    the choices of one request apart (choice 0 is the reply a single-choice request gets).
    """
    rng = _rng("reply", seed, index, conversation)
    length = rng.randint(MIN_REPLY_TOKENS, MAX_REPLY_TOKENS)
    pieces: list[str] = []
    slot = 0
    while len(pieces) < length - 1:
        remaining = length - 1 - len(pieces)
        # End the sentence here? Only after a noun, never leaving room for a one-word sentence.
        ended = slot >= len(_PATTERN) or (_PATTERN[slot - 1] is _NOUNS and rng.random() < 0.3)
        if slot >= 4 and remaining >= 3 and ended:
            pieces.append(".")
            slot = 0
            continue
        words = _PATTERN[slot % len(_PATTERN)]
        if words is _CONJUNCTIONS and remaining >= 2 and rng.random() < 0.5:
            pieces.append(",")
            remaining -= 1
        if remaining:
            for word in rng.choice(words).split(" ")[:remaining]:
                if slot == 0:
                    word = word.capitalize()
                pieces.append(" " + word if pieces else word)
        slot += 1
    pieces.append(".")
    return tuple(pieces[:length])


@lru_cache(maxsize=2048)
def json_object_text(conversation: str, seed: int, index: int = 0) -> str:
    """Return the JSON-mode reply: a JSON object string built from the plain reply."""
    text = "".join(reply_pieces(conversation, seed, index))
    confidence = _rng("confidence", seed, index, conversation).randint(50, 99)
    return json.dumps({"answer": text, "confidence": confidence})


def call_id(prefix: str, *parts: object) -> str:
    """Return a deterministic identifier such as ``call_<24 hex digits>``."""
    digest = hashlib.blake2b(
        "\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=12
    ).hexdigest()
    return f"{prefix}{digest}"


@lru_cache(maxsize=2048)
def json_from_schema(
    schema_json: str, conversation: str, seed: int, salt: str, invalid: bool = False
) -> str:
    """Return a JSON text that conforms to the JSON Schema ``schema_json`` (deterministic).

    Supports ``type`` (or a list of types), ``properties``/``required``, ``items``/
    ``prefixItems``, ``enum``, ``const``, ``anyOf``/``oneOf`` (the first), ``allOf`` (merged),
    local ``$ref``, numeric bounds and ``multipleOf``, string lengths and common formats.
    ``pattern`` is not honoured. Objects get their required properties, or all of them when
    the schema lists none as required.

    With ``invalid``, the same value with its first leaf (following the first key or item
    down) replaced by one of another JSON type: a reply that breaks the schema wherever
    the schema constrains that leaf.
    """
    try:
        schema = json.loads(schema_json)
    except ValueError:
        schema = {}
    builder = _SchemaValues(schema, _rng("json", seed, salt, conversation))
    try:
        value = builder.value(schema, 0)
    except (ArithmeticError, ValueError, TypeError, RecursionError):
        # A schema nobody can satisfy (or that is not a schema): any JSON will do.
        value = {}
    return json.dumps(_broken(value) if invalid else value, allow_nan=False)


def _broken(value: Any) -> Any:
    """Return ``value`` with its first leaf replaced by a value of another JSON type."""
    if isinstance(value, dict) and value:
        first = next(iter(value))
        return {**value, first: _broken(value[first])}
    if isinstance(value, list) and value:
        return [_broken(value[0]), *value[1:]]
    if isinstance(value, str):
        return 12345
    if isinstance(value, bool):
        return "not a boolean"
    if isinstance(value, (int, float)):
        return "not a number"
    return "none"  # null, or an empty object or array


_MAX_DEPTH = 8
_FORMATS: Mapping[str, str] = {
    "date-time": "2024-05-17T12:00:00Z",
    "date": "2024-05-17",
    "time": "12:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "duration": "P1D",
}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return None
    return float(value)


def _count(value: object, default: int) -> int:
    number = _number(value)
    if number is None or number < 0:
        return default
    return int(min(number, 64))


class _SchemaValues:
    """Build one value for a schema from a seeded PRNG; robust to schemas that make no sense."""

    def __init__(self, root: object, rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def _resolve(self, schema: Mapping[str, Any], depth: int) -> Mapping[str, Any]:
        seen = 0
        while isinstance(schema.get("$ref"), str) and seen < _MAX_DEPTH:
            target: object = self.root
            ref: str = schema["$ref"]
            if not ref.startswith("#"):
                return {}
            for part in ref[1:].split("/"):
                if not part:
                    continue
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, Mapping):
                    target = target.get(part)
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    target = None
            if not isinstance(target, Mapping):
                return {}
            schema = target
            seen += 1
        return schema

    def value(self, schema: object, depth: int) -> Any:
        if depth > 4 * _MAX_DEPTH:
            return None
        if schema is True or not isinstance(schema, Mapping):
            return {} if depth == 0 else "value"
        schema = self._resolve(schema, depth)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self.rng.choice(enum)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list):
                usable = [o for o in options if isinstance(o, Mapping)]
                if usable:
                    non_null = [o for o in usable if o.get("type") != "null"]
                    return self.value((non_null or usable)[0], depth + 1)
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and all_of:
            schema = self._merge(schema, all_of, depth)
        kind = self._type(schema, depth)
        if depth > _MAX_DEPTH and kind in ("object", "array"):
            return {} if kind == "object" else []
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._float(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _merge(
        self, schema: Mapping[str, Any], parts: Sequence[object], depth: int
    ) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        properties: dict[str, Any] = dict(merged.get("properties") or {})
        required: list[Any] = list(merged.get("required") or [])
        for part in parts:
            if not isinstance(part, Mapping):
                continue
            part = self._resolve(part, depth)
            for key, val in part.items():
                if key == "properties" and isinstance(val, Mapping):
                    properties.update(val)
                elif key == "required" and isinstance(val, list):
                    required.extend(val)
                else:
                    merged.setdefault(key, val)
        if properties:
            merged["properties"] = properties
        if required:
            merged["required"] = required
        return merged

    @staticmethod
    def _type(schema: Mapping[str, Any], depth: int) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            names = [k for k in kind if isinstance(k, str)]
            kind = next((k for k in names if k != "null"), names[0] if names else None)
        if isinstance(kind, str):
            return kind
        if isinstance(schema.get("properties"), Mapping):
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        return "object" if depth == 0 else "string"

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        if not isinstance(properties, Mapping):
            return {}
        required = schema.get("required")
        if isinstance(required, list) and required:
            names = [name for name in required if isinstance(name, str)]
        else:
            names = [name for name in properties if isinstance(name, str)]
        return {name: self.value(properties.get(name, {}), depth + 1) for name in names}

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        out: list[Any] = []
        if isinstance(prefix, list):
            out = [self.value(item, depth + 1) for item in prefix]
        low = _count(schema.get("minItems"), 0)
        high = _count(schema.get("maxItems"), max(low, 3))
        size_low = min(max(low, 1), high)
        size_high = max(size_low, min(high, max(low, 3)))
        size = max(len(out), self.rng.randint(size_low, size_high))
        items = schema.get("items")
        item_schema = items if isinstance(items, Mapping) else {}
        while len(out) < size:
            out.append(self.value(item_schema, depth + 1))
        return out

    def _bounds(self, schema: Mapping[str, Any]) -> tuple[float | None, float | None, bool, bool]:
        low, high = _number(schema.get("minimum")), _number(schema.get("maximum"))
        low_open = high_open = False
        exclusive_low, exclusive_high = (
            schema.get("exclusiveMinimum"),
            schema.get("exclusiveMaximum"),
        )
        if exclusive_low is True:
            low_open = True
        elif _number(exclusive_low) is not None:
            low, low_open = _number(exclusive_low), True
        if exclusive_high is True:
            high_open = True
        elif _number(exclusive_high) is not None:
            high, high_open = _number(exclusive_high), True
        return low, high, low_open, high_open

    def _integer(self, schema: Mapping[str, Any]) -> int:
        low, high, low_open, high_open = self._bounds(schema)
        lo = -(10**15) if low is None else math.floor(low) + 1 if low_open else math.ceil(low)
        hi = 10**15 if high is None else math.ceil(high) - 1 if high_open else math.floor(high)
        if low is None and high is None:
            lo, hi = 0, 100
        elif low is None:
            lo = hi - 100
        elif high is None:
            hi = lo + 100
        if lo > hi:
            return int(lo)
        step = _number(schema.get("multipleOf"))
        if step is not None and step >= 1 and step == int(step):
            first, last = math.ceil(lo / step), math.floor(hi / step)
            if first <= last:
                return int(self.rng.randint(first, last) * step)
        return self.rng.randint(int(lo), int(hi))

    def _float(self, schema: Mapping[str, Any]) -> float:
        low, high, _, _ = self._bounds(schema)
        if low is None and high is None:
            low, high = 0.0, 100.0
        elif low is None:
            low = high - 100.0  # type: ignore[operator]
        elif high is None:
            high = low + 100.0
        assert low is not None
        assert high is not None
        if low >= high:
            return low
        value = round(self.rng.uniform(low, high), 2)
        if not (math.isfinite(value) and low < value < high):
            value = low / 2 + high / 2
        step = _number(schema.get("multipleOf"))
        if step is not None and step > 0:
            candidate = math.ceil(low / step) * step
            if low <= candidate <= high:
                value = candidate
        return value

    def _string(self, schema: Mapping[str, Any]) -> str:
        fmt = schema.get("format")
        text = _FORMATS.get(fmt, "") if isinstance(fmt, str) else ""
        if not text:
            text = _words(self.rng, self.rng.randint(1, 3))
        low = _count(schema.get("minLength"), 0)
        high = _number(schema.get("maxLength"))
        if len(text) < low:
            text = text + "x" * (low - len(text))
        if high is not None and high >= 0 and len(text) > high:
            text = text[: int(high)]
        return text


def tool_arguments(
    parameters: object, conversation: str, seed: int, salt: str, invalid: bool = False
) -> str:
    """Return the JSON arguments of a call to a tool whose parameter schema is ``parameters``.

    With ``invalid``, arguments that break the schema (see ``json_from_schema``).
    """
    if not isinstance(parameters, Mapping) or not parameters:
        return "{}"
    schema_json = json.dumps(parameters, sort_keys=True)
    return json_from_schema(schema_json, conversation, seed, salt, invalid)


@lru_cache(maxsize=8192)
def embedding(text: str, seed: int, dimensions: int) -> tuple[float, ...]:
    """Return a deterministic unit-length vector for ``text``."""
    rng = _rng("embedding", seed, text)
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    return tuple(v / norm for v in values)


@lru_cache(maxsize=8192)
def embedding_base64(text: str, seed: int, dimensions: int) -> str:
    """Return ``embedding(...)`` as base64 of little-endian float32 values."""
    vector = embedding(text, seed, dimensions)
    return base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
