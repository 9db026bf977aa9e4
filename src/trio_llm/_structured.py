"""Structured output: ask for JSON matching a schema, check it, repair a bounded number of times.

:func:`chat_structured` sends ``response_format={"type": "json_schema", ...}`` (the
provider adapter translates it: Anthropic gets a forced tool call) and checks the reply
with a well-kept library for each kind of schema:

- a pydantic v2 model: ``model_validate_json`` (pydantic stays optional: see ``_schemas``);
- an attrs class, a dataclass or a ``TypedDict``: the schema from ``json_schema_for``,
  checked with ``jsonschema`` (Draft 2020-12, with format checks), then built with
  ``cattrs`` (which runs the class's own validators too);
- a JSON Schema dict: checked with ``jsonschema``; the result is the decoded value.

A reply that does not parse or match is answered with the library's own messages (the
path and the reason of each problem) as a new user message, at most ``max_repairs``
times; then :class:`~trio_llm.StructuredOutputError` carries the last raw text and the
problems of every attempt.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import attrs
import cattrs
import jsonschema
from cattrs.strategies import configure_union_passthrough
from cattrs.v import format_exception

from ._errors import StructuredOutputError
from ._schemas import is_record, json_schema_for, pydantic_model

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["chat_structured", "json_schema_for"]

T = TypeVar("T")

# Problems reported per reply: a long array of wrong items must not flood the next prompt.
_MAX_PROBLEMS = 10

_converter = cattrs.Converter()
# Unions of JSON scalars (int | str, ...) pass through as decoded; validated before.
configure_union_passthrough(int | float | str | bool | None, _converter)


class _Invalid(Exception):
    """A reply does not parse or match its schema: one message per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        shown = list(problems[:_MAX_PROBLEMS])
        if len(problems) > _MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
        super().__init__("; ".join(shown))
        self.problems = shown


@attrs.frozen
class _Target:
    """What a structured call asks for and how its replies are checked and built."""

    name: str
    json_schema: dict[str, Any]
    load: Callable[[str], Any]  # raises _Invalid


def _decode(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _Invalid([f"$: not valid JSON ({exc})"]) from None


def _checker(json_schema: Mapping[str, Any], *, given: bool) -> Callable[[str], Any]:
    """Return a function decoding a reply and validating it against ``json_schema``.

    Draft 2020-12, with format checks. A schema the caller ``given`` is checked against
    the metaschema first (it costs milliseconds, once: targets are cached); the ones
    built here are valid by construction.

    Raises:
        ValueError: ``json_schema`` is not a valid JSON Schema.
    """
    if given:
        try:
            jsonschema.Draft202012Validator.check_schema(json_schema)
        except jsonschema.SchemaError as exc:
            where = exc.json_path.replace("$", "schema", 1)
            raise ValueError(f"not a valid JSON Schema: {where}: {exc.message}") from None
    validator = jsonschema.Draft202012Validator(
        json_schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )

    def check(text: str) -> Any:
        value = _decode(text)
        problems = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(value)]
        if problems:
            raise _Invalid(problems)
        return value

    return check


def _cattrs_problem(exc: BaseException, tp: type | None) -> str:
    """cattrs' description of a problem, with the exception's own reason when it has one."""
    described = format_exception(exc, tp)
    reason = str(exc)
    return f"{described} ({reason})" if reason and reason not in described else described


def _record_loader(cls: type, json_schema: Mapping[str, Any]) -> Callable[[str], Any]:
    check = _checker(json_schema, given=False)

    def load(text: str) -> Any:
        value = check(text)
        try:
            return _converter.structure(value, cls)
        except Exception as exc:  # what the class (its validators) refused, wrapped by cattrs
            messages = cattrs.transform_error(exc, format_exception=_cattrs_problem)
            # cattrs words each as "<problem> @ <path>"; put the path first, as jsonschema's.
            split = (message.rpartition(" @ ") for message in messages)
            raise _Invalid([f"{path}: {problem}" for problem, _, path in split]) from None

    return load


def _location(loc: Sequence[int | str]) -> str:
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def _model_loader(model: Any) -> Callable[[str], Any]:
    import pydantic  # imported already (model is a pydantic class): this costs nothing

    def load(text: str) -> Any:
        try:
            return model.model_validate_json(text)
        except pydantic.ValidationError as exc:
            raise _Invalid(
                [f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)]
            ) from None

    return load


def _name(name: str) -> str:
    """A ``json_schema`` name as OpenAI accepts it: ``[A-Za-z0-9_-]``, at most 64."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "response"


def _target(schema: object) -> _Target:
    """Return how to ask for and check ``schema`` (cached: checking a JSON Schema costs ms).

    Raises:
        TypeError: ``schema`` is not a kind of schema that is supported.
        ValueError: a JSON Schema dict is not a valid JSON Schema.
    """
    if isinstance(schema, Mapping):
        try:
            text = json.dumps(schema)  # the cache key; the key order is kept, as sent
        except (TypeError, ValueError) as exc:
            raise TypeError(f"a JSON Schema dict must be JSON: {exc}") from None
        return _dict_target(text)
    if isinstance(schema, type):
        return _class_target(schema)
    raise _unsupported(schema)


@functools.lru_cache(maxsize=256)
def _dict_target(text: str) -> _Target:
    json_schema = json.loads(text)
    name = _name(str(json_schema.get("title") or "response"))
    return _Target(name, json_schema, _checker(json_schema, given=True))


@functools.lru_cache(maxsize=256)
def _class_target(cls: type) -> _Target:
    model = pydantic_model(cls)
    if model is not None:
        return _Target(_name(cls.__name__), json_schema_for(cls), _model_loader(model))
    if is_record(cls):
        json_schema = json_schema_for(cls)
        return _Target(_name(cls.__name__), json_schema, _record_loader(cls, json_schema))
    raise _unsupported(cls)


def _unsupported(schema: object) -> TypeError:
    return TypeError(
        "schema must be a pydantic model, an attrs class, a dataclass, a TypedDict or a "
        f"JSON Schema dict, not {schema!r}"
    )


def _repair_request(target: _Target, problem: _Invalid) -> str:
    listed = "\n".join(f"- {line}" for line in problem.problems)
    return (
        f"That reply does not match the {target.name} schema:\n{listed}\n"
        "Reply again with the whole corrected JSON value, and nothing else."
    )


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
    "schema": ..., "strict": True}}`` (through the Anthropic provider, a forced tool call
    whose input is the reply). If the reply is not valid JSON or does not match the
    schema, the reply and the problems (each with its path, as the validating library
    words it) are sent back, as an assistant message and a user message, and the model
    asked again, at most ``max_repairs`` times.

    Args:
        client: the client to call.
        prompt_or_messages: a prompt string or a list of messages, as for ``client.chat``.
        schema: a pydantic v2 model (the result is an instance, from
            ``model_validate_json``); an attrs class, a dataclass or a ``TypedDict`` (an
            instance, or a dict for a ``TypedDict``, built with cattrs); or a JSON Schema
            dict, sent as given (the result is the decoded JSON value).
        max_repairs: how many times a bad reply is sent back for repair (0: none).
        **params: other ``client.chat`` arguments (``model``, ``temperature``, ...).

    Raises:
        StructuredOutputError: the last reply still did not parse or match the schema
            (``raw_text`` holds it, ``errors`` the problems of every attempt).
        TypeError: ``schema`` is none of the kinds above, or a field type has no JSON
            Schema.
        ValueError: a JSON Schema dict is not valid, or ``max_repairs`` is negative.
        LLMError: any error ``client.chat`` raises.

    Cancellation: the request in flight is cancelled; nothing is returned.
    """
    if max_repairs < 0:
        raise ValueError(f"max_repairs must be at least 0, got {max_repairs}")
    target = _target(schema)
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": target.name, "schema": target.json_schema, "strict": True},
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
            return target.load(text)
        except _Invalid as exc:
            errors.append(str(exc))
            messages = [
                *messages,
                {"role": "assistant", "content": text},
                {"role": "user", "content": _repair_request(target, exc)},
            ]
    raise StructuredOutputError(
        f"no valid {target.name} after {max_repairs + 1} attempt(s); last problem: {errors[-1]}",
        raw_text=text,
        errors=errors,
    )
