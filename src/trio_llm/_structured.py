"""Structured output: ask for JSON matching a schema, validate it, repair a bounded number of times.

:func:`chat_structured` sends ``response_format={"type": "json_schema", ...}`` built from an
attrs class (or taken from a JSON Schema dict), parses the reply, validates it, and builds
the attrs instance. A reply that is not valid JSON or does not match is answered with the
error as a new user message, at most ``max_repairs`` times; then
:class:`~trio_llm.StructuredOutputError` carries the last raw text.

The schema subset is the one OpenAI's strict mode accepts: ``object`` (every property
required, no others), ``array``, ``string``, ``integer``, ``number``, ``boolean``,
``null``, ``enum``, ``const`` and ``anyOf``. Validation is done here, without a
JSON Schema library, for exactly that subset; other keywords are sent but not checked.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, overload

import attrs

from ._errors import StructuredOutputError

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["chat_structured", "json_schema_for"]

T = TypeVar("T")

_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "array": (list,),
    "object": (dict,),
}


class _Invalid(Exception):
    """A reply does not match the schema: ``path`` says where."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path or '$'}: {problem}")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:
        # attrs.resolve_types() may have resolved them with names get_type_hints cannot see.
        resolved = {field.name: field.type for field in attrs.fields(cls)}
        if not any(tp is None or isinstance(tp, str) for tp in resolved.values()):
            return resolved
        raise TypeError(
            f"cannot resolve the annotations of {cls.__qualname__} ({exc}); define it at "
            "module level or call attrs.resolve_types() on it first"
        ) from exc


def _is_union(origin: object) -> bool:
    return origin is Union or origin is types.UnionType


def _schema_for_type(tp: Any, seen: tuple[type, ...]) -> dict[str, Any]:
    if tp is type(None) or tp is None:
        return {"type": "null"}
    if isinstance(tp, type) and attrs.has(tp):
        return _schema_for_class(tp, seen)
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, Sequence) or (origin is tuple and len(args) == 2 and args[1] is ...):
        return {"type": "array", "items": _schema_for_type(args[0] if args else Any, seen)}
    if origin is Literal:
        kinds = {_SCALARS.get(type(a)) for a in args}
        schema: dict[str, Any] = {"enum": list(args)}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
        return schema
    if _is_union(origin):
        return {"anyOf": [_schema_for_type(a, seen) for a in args]}
    raise TypeError(
        f"no JSON Schema for type {tp!r}: use str, int, float, bool, list[...], "
        "Literal[...], Optional[...] or a nested attrs class"
    )


def _schema_for_class(cls: type, seen: tuple[type, ...]) -> dict[str, Any]:
    if cls in seen:
        raise TypeError(f"{cls.__qualname__} refers to itself; recursive schemas are not supported")
    hints = _hints(cls)
    properties = {
        field.name: _schema_for_type(hints[field.name], (*seen, cls))
        for field in attrs.fields(cls)
        if field.init
    }
    return {
        "type": "object",
        "properties": properties,
        # OpenAI's strict mode wants every property listed and no others allowed.
        "required": list(properties),
        "additionalProperties": False,
    }


def json_schema_for(cls: type) -> dict[str, Any]:
    """Return the JSON Schema (OpenAI strict-mode subset) of an attrs class.

    Fields may be ``str``, ``int``, ``float``, ``bool``, ``list[...]``, ``Literal[...]``,
    ``X | None`` (``Optional``) or nested attrs classes.

    Raises:
        TypeError: ``cls`` is not an attrs class, or a field has a type with no schema.
    """
    if not (isinstance(cls, type) and attrs.has(cls)):
        raise TypeError(f"expected an attrs class, got {cls!r}")
    return _schema_for_class(cls, ())


def _validate(value: Any, schema: Mapping[str, Any], path: str) -> None:
    """Check ``value`` against the strict-mode subset of JSON Schema; raise :class:`_Invalid`."""
    if "const" in schema and value != schema["const"]:
        raise _Invalid(path, f"expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise _Invalid(path, f"expected one of {schema['enum']!r}, got {value!r}")
    options = schema.get("anyOf")
    if isinstance(options, list):
        problems = []
        for option in options:
            try:
                _validate(value, option, path)
                break
            except _Invalid as exc:
                problems.append(str(exc))
        else:
            raise _Invalid(path, "matches none of the allowed shapes: " + "; ".join(problems))
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        allowed = tuple(t for k in kinds for t in _JSON_TYPES.get(k, (object,)))
        # bool is an int subclass in Python, but not a JSON number.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise _Invalid(path, f"expected {' or '.join(kinds)}, got {json.dumps(value)[:60]}")
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        missing = [name for name in schema.get("required") or () if name not in value]
        if missing:
            raise _Invalid(path, f"missing required field(s) {', '.join(missing)}")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                raise _Invalid(path, f"unexpected field(s) {', '.join(extra)}")
        for name, sub in properties.items():
            if name in value:
                _validate(value[name], sub, f"{path}.{name}" if path else name)
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            _validate(item, schema["items"], f"{path}[{index}]")


def _structure(value: Any, tp: Any) -> Any:
    """Build attrs instances from already-validated JSON, following the type hints."""
    if isinstance(tp, type) and attrs.has(tp) and isinstance(value, dict):
        hints = _hints(tp)
        return tp(**{name: _structure(item, hints[name]) for name, item in value.items()})
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, list) and args:
        if origin is tuple:
            return tuple(_structure(item, args[0]) for item in value)
        return [_structure(item, args[0]) for item in value]
    if _is_union(origin):
        # Pick the member the value validates against (validated before, so one does).
        for member in args:
            try:
                _validate(value, _schema_for_type(member, ()), "")
            except _Invalid:
                continue
            return _structure(value, member)
    return value


def _response_format(schema: type | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(schema, Mapping):
        json_schema = dict(schema)
        name = str(json_schema.get("title") or "response")
    else:
        json_schema = json_schema_for(schema)
        name = schema.__name__
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64], json_schema


def _parse(text: str, json_schema: Mapping[str, Any]) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _Invalid("", f"not valid JSON ({exc})") from None
    _validate(value, json_schema, "")
    return value


@overload
async def chat_structured(
    client: Client,
    prompt_or_messages: str | Sequence[Mapping[str, Any]],
    schema: type[T],
    *,
    max_repairs: int = 2,
    **params: Any,
) -> T: ...


@overload
async def chat_structured(
    client: Client,
    prompt_or_messages: str | Sequence[Mapping[str, Any]],
    schema: Mapping[str, Any],
    *,
    max_repairs: int = 2,
    **params: Any,
) -> Any: ...


async def chat_structured(
    client: Client,
    prompt_or_messages: str | Sequence[Mapping[str, Any]],
    schema: type[Any] | Mapping[str, Any],
    *,
    max_repairs: int = 2,
    **params: Any,
) -> Any:
    """Ask for a reply matching ``schema``; return it parsed, validated and built.

    Sends ``response_format={"type": "json_schema", "json_schema": {"name": ...,
    "schema": ..., "strict": True}}``. If the reply is not valid JSON or does not match
    the schema, the reply and the problem are sent back (as an assistant message and a
    user message) and the model asked again, at most ``max_repairs`` times.

    Args:
        client: the client to call.
        prompt_or_messages: a prompt string or a list of messages, as for ``client.chat``.
        schema: an attrs class (the result is an instance of it) or a JSON Schema dict
            (the result is the decoded JSON value).
        max_repairs: how many times a bad reply is sent back for repair (0: none).
        **params: other ``client.chat`` arguments (``model``, ``temperature``, ...).

    Raises:
        StructuredOutputError: the last reply still did not parse or match the schema
            (``raw_text`` holds it, ``errors`` every problem found).
        TypeError: ``schema`` is not an attrs class or a mapping, or a field type has no
            JSON Schema.
        LLMError: any error ``client.chat`` raises.

    Cancellation: the request in flight is cancelled; nothing is returned.
    """
    if max_repairs < 0:
        raise ValueError(f"max_repairs must be at least 0, got {max_repairs}")
    if not isinstance(schema, Mapping) and not (isinstance(schema, type) and attrs.has(schema)):
        raise TypeError(f"schema must be an attrs class or a JSON Schema dict, not {schema!r}")
    name, json_schema = _response_format(schema)
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": json_schema, "strict": True},
    }
    if isinstance(prompt_or_messages, str):
        messages: list[Mapping[str, Any]] = [{"role": "user", "content": prompt_or_messages}]
    else:
        messages = list(prompt_or_messages)
    errors: list[str] = []
    text = ""
    for _attempt in range(max_repairs + 1):
        reply = await client.chat(messages, response_format=response_format, **params)
        text = reply.text
        try:
            value = _parse(text, json_schema)
        except _Invalid as exc:
            errors.append(str(exc))
            messages = [
                *messages,
                {"role": "assistant", "content": text},
                {
                    "role": "user",
                    "content": f"That reply is invalid: {exc}. Reply again with only a JSON "
                    f"value that matches the schema {json.dumps(json_schema)}.",
                },
            ]
            continue
        return value if isinstance(schema, Mapping) else _structure(value, schema)
    raise StructuredOutputError(
        f"no valid {name} after {max_repairs + 1} attempt(s); last problem: {errors[-1]}",
        raw_text=text,
        errors=errors,
    )
