"""JSON Schemas for the types a structured reply can take, in OpenAI's strict-mode subset.

Strict mode (``response_format={"type": "json_schema", ..., "strict": True}``) wants
every object closed (``additionalProperties: false``) with every property listed in
``required``; an optional value is a union with ``null``. Two sources:

- a pydantic v2 model: its own ``model_json_schema()``, made strict by the rules
  openai-python's ``to_strict_json_schema`` applies (``$defs`` made strict too, a
  single-member ``allOf`` flattened, ``None`` defaults dropped, a ``$ref`` with sibling
  keys inlined). pydantic is optional: a class can only be a model if pydantic is
  already imported, so it is looked up in ``sys.modules``, never imported here.
- an attrs class, a dataclass or a ``TypedDict``: built here from the type hints
  (``str``, ``int``, ``float``, ``bool``, ``list[...]``, ``tuple[X, ...]``,
  ``Literal[...]``, an ``Enum``, ``X | None`` and nested records, inlined).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

import attrs

__all__ = ["is_record", "json_schema_for", "pydantic_model", "strict_json_schema"]

_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def pydantic_model(tp: object) -> Any:
    """Return ``tp`` if it is a pydantic ``BaseModel`` subclass, else ``None``.

    Never imports pydantic: a class cannot be a model unless pydantic is imported already.
    """
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(tp, type):
        return None
    return tp if issubclass(tp, pydantic.BaseModel) else None


def is_record(tp: object) -> bool:
    """Whether ``tp`` is an attrs class, a dataclass or a ``TypedDict``."""
    return isinstance(tp, type) and (
        attrs.has(tp) or dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)
    )


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:
        # attrs.resolve_types() may have resolved them with names get_type_hints cannot see.
        if attrs.has(cls):
            resolved = {field.name: field.type for field in attrs.fields(cls)}
            if not any(tp is None or isinstance(tp, str) for tp in resolved.values()):
                return resolved
        raise TypeError(
            f"cannot resolve the annotations of {cls.__qualname__} ({exc}); define it at "
            "module level or call attrs.resolve_types() on it first"
        ) from exc


def _fields(cls: type) -> list[str]:
    """The names a record is built from, in order."""
    if attrs.has(cls):
        return [field.name for field in attrs.fields(cls) if field.init]
    if dataclasses.is_dataclass(cls):
        return [field.name for field in dataclasses.fields(cls) if field.init]
    return list(_hints(cls))  # a TypedDict: every key (strict mode requires them all)


def _schema_for_record(cls: type, seen: tuple[type, ...]) -> dict[str, Any]:
    if cls in seen:
        raise TypeError(f"{cls.__qualname__} refers to itself; recursive schemas are not supported")
    hints = _hints(cls)
    properties = {name: _schema_for_type(hints[name], (*seen, cls)) for name in _fields(cls)}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _enum_schema(values: Sequence[object]) -> dict[str, Any]:
    kinds = {_SCALARS.get(type(value)) for value in values}
    schema: dict[str, Any] = {"enum": list(values)}
    if len(kinds) == 1 and None not in kinds:
        schema["type"] = kinds.pop()
    return schema


def _schema_for_type(tp: Any, seen: tuple[type, ...]) -> dict[str, Any]:
    if tp is type(None) or tp is None:
        return {"type": "null"}
    if is_record(tp):
        return _schema_for_record(tp, seen)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_schema([member.value for member in tp])
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, Sequence) or (origin is tuple and len(args) == 2 and args[1] is ...):
        return {"type": "array", "items": _schema_for_type(args[0] if args else Any, seen)}
    if origin is Literal:
        return _enum_schema(args)
    if origin is Union or origin is types.UnionType:
        return {"anyOf": [_schema_for_type(arg, seen) for arg in args]}
    raise TypeError(
        f"no JSON Schema for type {tp!r}: use str, int, float, bool, list[...], "
        "Literal[...], an Enum, Optional[...] or a nested attrs class, dataclass or TypedDict"
    )


def json_schema_for(tp: type) -> dict[str, Any]:
    """Return the strict JSON Schema that structured output sends for ``tp``.

    ``tp`` is a pydantic v2 model (its ``model_json_schema()``, made strict), or an attrs
    class, a dataclass or a ``TypedDict`` whose fields are ``str``, ``int``, ``float``,
    ``bool``, ``list[...]``, ``tuple[X, ...]``, ``Literal[...]``, an ``Enum``,
    ``X | None`` or nested records of these kinds.

    Raises:
        TypeError: ``tp`` is none of these, or a field has a type with no schema.
    """
    model = pydantic_model(tp)
    if model is not None:
        return strict_json_schema(model.model_json_schema())
    if not is_record(tp):
        raise TypeError(
            f"expected a pydantic model, an attrs class, a dataclass or a TypedDict, got {tp!r}"
        )
    return _schema_for_record(tp, ())


def strict_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``schema`` that OpenAI's strict mode accepts (see the module doc).

    Raises:
        ValueError: a ``$ref`` with sibling keys does not point inside the schema.
    """
    root = copy.deepcopy(schema)
    return _strict(root, root)


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"cannot inline $ref {ref!r}: only local references are supported")
    target: Any = root
    for part in ref[2:].split("/"):
        target = target.get(part) if isinstance(target, dict) else None
    if not isinstance(target, dict):
        raise ValueError(f"$ref {ref!r} does not point to a schema object")
    return target


def _strict(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Make ``node`` (part of ``root``) strict, in place; return it."""
    for key in ("$defs", "definitions"):
        for sub in (node.get(key) or {}).values():
            _strict(sub, root)
    if node.get("type") == "object":
        node.setdefault("additionalProperties", False)
    properties = node.get("properties")
    if isinstance(properties, dict):
        node["required"] = list(properties)
        for sub in properties.values():
            _strict(sub, root)
    if isinstance(node.get("items"), dict):
        _strict(node["items"], root)
    for sub in node.get("anyOf") or ():
        _strict(sub, root)
    all_of = node.get("allOf")
    if isinstance(all_of, list):
        if len(all_of) == 1:
            node.update(_strict(node.pop("allOf")[0], root))
        else:
            for sub in all_of:
                _strict(sub, root)
    if "default" in node and node["default"] is None:
        del node["default"]  # nullable already says it; strict mode refuses defaults
    ref = node.get("$ref")
    if isinstance(ref, str) and len(node) > 1:
        # A $ref may not have siblings (a description, say): inline the target under them.
        merged = {**_resolve(root, ref), **node}
        del merged["$ref"]
        node.clear()
        node.update(merged)
        return _strict(node, root)
    return node
