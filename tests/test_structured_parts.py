"""The parts of structured output: schemas from types, the official SDK's strictness rules,
the Anthropic mapping, the fake server's broken replies, and ``chat --schema``."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
from pathlib import Path
from typing import Any, Literal, TypedDict

import attrs
import httpx2
import pydantic
import pytest
from openai.lib._pydantic import _ensure_strict_json_schema, to_strict_json_schema

import trio_llm
from trio_llm._cli import main
from trio_llm._schemas import strict_json_schema
from trio_llm.providers._anthropic import OUTPUT_TOOL, AnthropicProvider
from trio_llm.testing import FakeLLMConfig, open_fake_llm
from trio_llm.testing._replies import json_from_schema

# --- schemas from attrs classes, dataclasses, TypedDicts -----------------------------------


@attrs.frozen
class Address:
    city: str
    zip_code: int | None


@attrs.frozen
class Person:
    name: str
    age: int
    height: float
    tags: list[str]
    kind: Literal["customer", "supplier"]
    active: bool
    address: Address


class Level(enum.Enum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Reading:
    level: Level
    notes: tuple[str, ...]
    hidden: int = dataclasses.field(default=0, init=False)


class Summary(TypedDict, total=False):
    title: str
    reading: Reading
    code: Literal[1, "one"]


def test_json_schema_for_attrs_class() -> None:
    """Attrs fields map to the strict subset: every property required, nested classes inline."""
    schema = trio_llm.json_schema_for(Person)
    assert schema["required"] == ["name", "age", "height", "tags", "kind", "active", "address"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["age"] == {"type": "integer"}
    assert props["height"] == {"type": "number"}
    assert props["active"] == {"type": "boolean"}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["kind"] == {"enum": ["customer", "supplier"], "type": "string"}
    assert props["address"]["properties"]["zip_code"] == {
        "anyOf": [{"type": "integer"}, {"type": "null"}]
    }


def test_json_schema_for_dataclass_and_typeddict() -> None:
    """Dataclasses (init fields only) and TypedDicts (every key required: strict mode)."""
    reading = trio_llm.json_schema_for(Reading)
    assert reading == {
        "type": "object",
        "properties": {
            "level": {"enum": [1, 2], "type": "integer"},
            "notes": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["level", "notes"],
        "additionalProperties": False,
    }
    summary = trio_llm.json_schema_for(Summary)
    assert summary["required"] == ["title", "reading", "code"]
    assert summary["properties"]["reading"] == reading
    assert summary["properties"]["code"] == {"enum": [1, "one"]}  # no single type


def test_json_schema_for_refuses_what_it_cannot_express() -> None:
    """Other classes, unsupported field types and recursion are TypeErrors."""

    @attrs.frozen
    class Bad:
        data: dict[str, int]

    @attrs.define
    class Node:
        child: Node | None

    with pytest.raises(TypeError, match="expected a pydantic model, an attrs class"):
        trio_llm.json_schema_for(dict)
    with pytest.raises(TypeError, match="expected a pydantic model, an attrs class"):
        trio_llm.json_schema_for("Person")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no JSON Schema for type"):
        trio_llm.json_schema_for(Bad)
    attrs.resolve_types(Node, localns={"Node": Node})
    with pytest.raises(TypeError, match="recursive"):
        trio_llm.json_schema_for(Node)


def test_json_schema_for_unresolvable_annotations() -> None:
    """A class whose annotations cannot be resolved gets a clear TypeError."""

    @attrs.frozen
    class Local:
        value: Missing  # type: ignore[name-defined]  # noqa: F821

    @dataclasses.dataclass
    class LocalData:
        value: Missing  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(TypeError, match="cannot resolve the annotations"):
        trio_llm.json_schema_for(Local)
    with pytest.raises(TypeError, match="cannot resolve the annotations"):
        trio_llm.json_schema_for(LocalData)


def test_locally_resolved_attrs_class() -> None:
    """An attrs class resolved with attrs.resolve_types works where get_type_hints cannot."""

    @attrs.frozen
    class Leg:
        to: Address
        hops: list[Leg2]

    @attrs.frozen
    class Leg2:
        city: str

    attrs.resolve_types(Leg2)
    attrs.resolve_types(Leg, localns={"Leg2": Leg2})
    schema = trio_llm.json_schema_for(Leg)
    assert schema["properties"]["hops"]["items"]["required"] == ["city"]


# --- the official SDK's strictness rules -----------------------------------------------------


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Place(pydantic.BaseModel):
    city: str
    zip_code: int | None = None


class Order(pydantic.BaseModel):
    """An order (a docstring becomes the description)."""

    id: int
    ship_to: Place = pydantic.Field(description="where it goes")  # $ref with a sibling
    bill_to: Place | None = None  # anyOf with a $ref, a None default
    extra: list[Place]
    colour: Colour
    count: int = 1  # a default that is not None stays
    kind: Literal["a", "b"] = "a"


class Tree(pydantic.BaseModel):
    label: str
    children: list[Tree] = []


@pytest.mark.parametrize("model", [Place, Order, Tree])
def test_pydantic_schemas_match_the_official_sdk(model: type[pydantic.BaseModel]) -> None:
    """json_schema_for(model) is what openai-python's parse() sends for it."""
    assert trio_llm.json_schema_for(model) == to_strict_json_schema(model)


STRICTNESS_CASES: list[dict[str, Any]] = [
    {  # a single allOf is flattened; a None default dropped; definitions made strict too
        "type": "object",
        "properties": {
            "a": {"allOf": [{"$ref": "#/definitions/A"}], "description": "an A"},
            "b": {"type": "string", "default": None},
        },
        "definitions": {"A": {"type": "object", "properties": {"x": {"type": "string"}}}},
    },
    {  # several allOf members are each made strict
        "type": "object",
        "properties": {
            "c": {
                "allOf": [
                    {"type": "object", "properties": {"p": {"type": "integer"}}},
                    {"type": "object", "properties": {"q": {"type": "integer"}}},
                ]
            }
        },
    },
    {  # an object that says additionalProperties itself keeps it
        "type": "object",
        "properties": {"d": {"type": "object", "additionalProperties": True}},
    },
]


@pytest.mark.parametrize("schema", STRICTNESS_CASES)
def test_strict_json_schema_follows_the_official_sdk(schema: dict[str, Any]) -> None:
    """The strictness rules give what the SDK's own function gives; the input is untouched."""
    before = copy.deepcopy(schema)
    theirs = copy.deepcopy(schema)
    assert strict_json_schema(schema) == _ensure_strict_json_schema(theirs, path=(), root=theirs)
    assert schema == before


def test_strict_json_schema_refuses_refs_it_cannot_inline() -> None:
    """A $ref with siblings must be local and point to a schema."""
    remote = {"properties": {"a": {"$ref": "https://x/s.json", "description": "d"}}}
    with pytest.raises(ValueError, match="only local references"):
        strict_json_schema(remote)
    dangling = {"properties": {"a": {"$ref": "#/$defs/Nope", "description": "d"}}}
    with pytest.raises(ValueError, match="does not point to a schema"):
        strict_json_schema(dangling)


# --- the Anthropic mapping -------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "Point", "schema": SCHEMA}}
USER_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}


def body(**params: Any) -> dict[str, Any]:
    """The Messages body the Anthropic adapter builds for one prompt and ``params``."""
    return AnthropicProvider().chat_body("Hi", "claude-x", params)


def test_response_format_becomes_a_forced_tool() -> None:
    """json_schema: one tool with the schema, forced; its description from the format."""
    sent = body(response_format=FORMAT)
    assert "response_format" not in sent
    assert sent["tools"] == [
        {
            "name": OUTPUT_TOOL,
            "description": "Give your whole answer, a Point, as this tool's input, "
            "and nothing else.",
            "input_schema": SCHEMA,
        }
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": OUTPUT_TOOL}
    spec = {"name": "Point", "schema": SCHEMA, "description": "D"}
    described = {"type": "json_schema", "json_schema": spec}
    assert body(response_format=described)["tools"][0]["description"] == "D"


def test_response_format_with_tools_and_other_kinds() -> None:
    """With the caller's tools: any tool must be called; text: nothing; json_object: any object."""
    sent = body(response_format=FORMAT, tools=[USER_TOOL])
    assert [tool["name"] for tool in sent["tools"]] == ["lookup", OUTPUT_TOOL]
    assert sent["tool_choice"] == {"type": "any"}
    kept = body(response_format=FORMAT, tools=[USER_TOOL], tool_choice="auto")
    assert kept["tool_choice"] == {"type": "auto"}
    single = body(response_format=FORMAT, parallel_tool_calls=False)
    assert single["tool_choice"] == {
        "type": "tool",
        "name": OUTPUT_TOOL,
        "disable_parallel_tool_use": True,
    }
    assert "tools" not in body(response_format={"type": "text"})
    assert body(response_format={"type": "json_object"})["tools"][0]["input_schema"] == {
        "type": "object"
    }
    unnamed = body(response_format={"type": "json_schema", "json_schema": {}})
    assert unnamed["tools"][0]["input_schema"] == {"type": "object"}


@pytest.mark.parametrize(
    ("response_format", "tools", "message"),
    [
        ("json", None, "response_format must be an object"),
        ({"type": "grammar"}, None, "unknown response_format type 'grammar'"),
        ({"type": "json_schema"}, None, "needs a 'json_schema' object"),
        (FORMAT, [{"name": OUTPUT_TOOL, "input_schema": SCHEMA}], "clashes"),
    ],
)
def test_response_format_refusals(response_format: Any, tools: Any, message: str) -> None:
    """What cannot be sent as a forced tool is a TypeError before anything is sent."""
    with pytest.raises(TypeError, match=message):
        body(response_format=response_format, **({"tools": tools} if tools else {}))


def test_output_tool_call_beside_other_calls() -> None:
    """The output tool's input is the text; the caller's tool calls stay tool calls."""
    reply = {
        "id": "msg_1",
        "model": "claude-x",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"x": 1}},
            {"type": "tool_use", "id": "toolu_2", "name": OUTPUT_TOOL, "input": {"x": 2}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    parsed = AnthropicProvider().parse_chat(reply, None)
    assert parsed.text == '{"x": 2}'
    assert parsed.finish_reason == "tool_calls"
    assert [call["function"]["name"] for call in parsed.message["tool_calls"]] == ["lookup"]


# --- the fake server's broken replies -----------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "broken"),
    [
        ({"type": "boolean"}, "not a boolean"),
        ({"type": "number", "minimum": 1, "maximum": 2}, "not a number"),
        ({"type": "null"}, "none"),
        ({"type": "object"}, "none"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 2}, [12345]),
    ],
)
def test_broken_values_change_the_type_of_the_first_leaf(schema: Any, broken: Any) -> None:
    """invalid=True replaces the first leaf by another JSON type; the rest stays."""
    text = json_from_schema(json.dumps(schema), "conversation", 0, "salt", invalid=True)
    value = json.loads(text)
    valid = json.loads(json_from_schema(json.dumps(schema), "conversation", 0, "salt"))
    if isinstance(broken, list):
        assert value[:1] == broken
        assert value[1:] == valid[1:]
    else:
        assert value == broken


async def test_fake_server_breaks_forced_tools_only() -> None:
    """OpenAI: a forced function's arguments break while repairs are due; auto ones never."""
    request = {
        "model": "m",
        "messages": [{"role": "user", "content": "Look it up."}],
        "tools": [USER_TOOL],
    }
    forced = {**request, "tool_choice": {"type": "function", "function": {"name": "lookup"}}}
    config = FakeLLMConfig(invalid_structured_replies=1)
    async with open_fake_llm(config) as server, httpx2.AsyncClient() as http:
        url = server.base_url + "/chat/completions"

        async def arguments(payload: dict[str, Any]) -> Any:
            reply = (await http.post(url, json=payload)).json()
            call = reply["choices"][0]["message"]["tool_calls"][0]
            return json.loads(call["function"]["arguments"])

        assert (await arguments(forced))["x"] == "not a number"
        assert isinstance((await arguments(request))["x"], int)
        answered = {
            **forced,
            "messages": [*forced["messages"], {"role": "assistant", "content": "{}"}],
        }
        assert isinstance((await arguments(answered))["x"], int)


# --- chat --schema ------------------------------------------------------------------------------


def write_schema(tmp_path: Path, schema: object) -> str:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema), encoding="utf-8")
    return str(path)


def test_chat_schema_prints_the_validated_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """chat --schema FILE prints the JSON value that matched the schema."""
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["yes", "no"]}, "score": {"type": "number"}},
        "required": ["label", "score"],
        "additionalProperties": False,
    }
    assert main(["chat", "--simulate", "--schema", write_schema(tmp_path, schema), "Judge."]) == 0
    value = json.loads(capsys.readouterr().out)
    assert value["label"] in ("yes", "no")
    assert isinstance(value["score"], float)


@pytest.mark.parametrize(
    ("schema", "extra", "status", "message"),
    [
        (None, [], 2, "No such file"),
        ([1], [], 2, "a JSON Schema is an object"),
        ({"type": 5}, [], 2, "not a valid JSON Schema: schema.type"),
        ({"type": "object"}, ["--stream"], 2, "--schema and --stream cannot be combined"),
        ({"type": "object"}, ["--max-tokens", "1"], 1, "StructuredOutputError: no valid"),
    ],
)
def test_chat_schema_failures(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    schema: object,
    extra: list[str],
    status: int,
    message: str,
) -> None:
    """A missing or bad schema file is a usage error; replies that never match, a failure."""
    path = str(tmp_path / "missing.json") if schema is None else write_schema(tmp_path, schema)
    assert main(["chat", "--simulate", "--schema", path, *extra, "Judge."]) == status
    err = capsys.readouterr().err
    assert message in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
