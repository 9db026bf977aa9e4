"""Structured output end to end: every schema kind, both providers, repairs, the final error.

Each call goes over real sockets to the fake server; ``Recorder`` keeps the body of every
request on its way there (the wire format: OpenAI's, or Anthropic's Messages), so the
tests read what the server received: the schema, the forced tool, the repair messages.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, Literal, TypedDict

import attrs
import httpx2
import pydantic
import pytest

import trio_llm
from trio_llm.providers._anthropic import OUTPUT_TOOL
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

PROVIDERS = ["openai", "anthropic"]


class Recorder(httpx2.AsyncBaseTransport):
    """trio-llm's own transport, keeping the decoded body of each request it sends."""

    def __init__(self) -> None:
        self.inner = trio_llm.TrioTransport()
        self.bodies: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.bodies.append(json.loads(request.content))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def open_recorded(
    provider: str, config: FakeLLMConfig | None = None
) -> AsyncIterator[tuple[trio_llm.Client, list[dict[str, Any]]]]:
    """Yield a client of ``provider`` on a fake server of ``config``, and its bodies."""
    async with open_fake_llm(config or FakeLLMConfig()) as server:
        recorder = Recorder()
        async with (
            recorder,
            trio_llm.open_client(
                base_url=server.root_url if provider == "anthropic" else server.base_url,
                api_key="sk-test",
                model="fake-model",
                provider=provider,
                transport=recorder,
            ) as client,
        ):
            yield client, recorder.bodies


@pytest.fixture
async def recorded(provider: str) -> AsyncIterator[tuple[trio_llm.Client, list[dict[str, Any]]]]:
    async with open_recorded(provider) as pair:
        yield pair


@pytest.fixture
async def repairing(provider: str) -> AsyncIterator[tuple[trio_llm.Client, list[dict[str, Any]]]]:
    """A client on a server whose first structured reply of each conversation is invalid."""
    async with open_recorded(provider, FakeLLMConfig(invalid_structured_replies=1)) as pair:
        yield pair


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last message of a request body, in either wire format."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content)


def sent_schema(provider: str, body: dict[str, Any]) -> dict[str, Any]:
    """The schema a request asked for: response_format's, or the forced tool's."""
    if provider == "anthropic":
        [tool] = body["tools"]
        return dict(tool["input_schema"])
    return dict(body["response_format"]["json_schema"]["schema"])


# --- the schema kinds -------------------------------------------------------------------


class Address(pydantic.BaseModel):
    city: str
    zip_code: int | None = None


class Customer(pydantic.BaseModel):
    """A customer, with addresses (a nested model: the schema has $defs)."""

    name: str
    home: Address = pydantic.Field(description="where they live")
    others: list[Address]
    tier: Literal["gold", "silver"]


@attrs.frozen
class Stop:
    city: str
    minutes: float


@attrs.frozen
class Route:
    name: str
    stops: list[Stop]
    backup: Stop | None
    kind: Literal["bus", "train"]
    tags: tuple[str, ...]


class Shade(enum.Enum):
    LIGHT = "light"
    DARK = "dark"


@dataclasses.dataclass
class Paint:
    name: str
    shade: Shade
    litres: int


class Totals(TypedDict):
    name: str
    counts: list[int]


VERDICT: dict[str, Any] = {
    "title": "Verdict of the judge",
    "type": "object",
    "properties": {
        "label": {"enum": ["yes", "no"]},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "contact": {"type": "string", "format": "email"},
    },
    "required": ["label", "score", "contact"],
    "additionalProperties": False,
}


async def test_pydantic_model(
    provider: str, recorded: tuple[trio_llm.Client, list[dict[str, Any]]]
) -> None:
    """A pydantic model: its strict schema ($defs included) is sent; the reply is a model."""
    client, bodies = recorded
    customer = await trio_llm.chat_structured(client, "Invent a customer.", Customer)
    again = await trio_llm.chat_structured(client, "Invent a customer.", Customer)
    assert isinstance(customer, Customer)
    assert isinstance(customer.home, Address)
    assert all(isinstance(other, Address) for other in customer.others)
    assert customer == again  # the fake server is deterministic
    schema = sent_schema(provider, bodies[0])
    assert schema == trio_llm.json_schema_for(Customer)
    assert schema["$defs"]["Address"]["additionalProperties"] is False
    assert schema["$defs"]["Address"]["required"] == ["city", "zip_code"]
    assert schema["properties"]["others"]["items"] == {"$ref": "#/$defs/Address"}


async def test_attrs_class(recorded: tuple[trio_llm.Client, list[dict[str, Any]]]) -> None:
    """An attrs class: validated by jsonschema, built by cattrs (nested, floats, tuples)."""
    client, _ = recorded
    route = await trio_llm.chat_structured(client, "Plan a route.", Route)
    assert isinstance(route, Route)
    assert route.stops
    assert all(isinstance(stop, Stop) and isinstance(stop.minutes, float) for stop in route.stops)
    assert route.backup is None or isinstance(route.backup, Stop)
    assert route.kind in ("bus", "train")
    assert isinstance(route.tags, tuple)


async def test_dataclass_and_typeddict(
    recorded: tuple[trio_llm.Client, list[dict[str, Any]]],
) -> None:
    """A dataclass (with an Enum) becomes an instance; a TypedDict a dict."""
    client, _ = recorded
    paint = await trio_llm.chat_structured(client, "A paint.", Paint)
    assert isinstance(paint, Paint)
    assert isinstance(paint.shade, Shade)
    totals = await trio_llm.chat_structured(client, "Totals.", Totals)
    assert isinstance(totals, dict)
    assert set(totals) == {"name", "counts"}
    assert all(isinstance(count, int) for count in totals["counts"])


async def test_json_schema_dict(
    provider: str, recorded: tuple[trio_llm.Client, list[dict[str, Any]]]
) -> None:
    """A JSON Schema dict is sent as given, named from its title; the result is the value."""
    client, bodies = recorded
    value = await trio_llm.chat_structured(client, [{"role": "user", "content": "Judge."}], VERDICT)
    assert value["label"] in ("yes", "no")
    assert value["contact"] == "user@example.com"
    assert sent_schema(provider, bodies[0]) == VERDICT
    if provider == "openai":
        assert bodies[0]["response_format"]["json_schema"]["name"] == "Verdict_of_the_judge"
        assert bodies[0]["response_format"]["json_schema"]["strict"] is True
    else:
        assert "Verdict_of_the_judge" in bodies[0]["tools"][0]["description"]


async def test_a_changed_dict_schema_is_sent_as_changed(
    provider: str, recorded: tuple[trio_llm.Client, list[dict[str, Any]]]
) -> None:
    """Checkers are cached by the schema's content: a dict changed in place is not stale."""
    client, bodies = recorded
    schema = copy.deepcopy(VERDICT)
    first = await trio_llm.chat_structured(client, "Judge.", schema)
    schema["properties"]["label"] = {"enum": ["maybe"]}
    second = await trio_llm.chat_structured(client, "Judge.", schema)
    assert first["label"] in ("yes", "no")
    assert second["label"] == "maybe"
    assert sent_schema(provider, bodies[1])["properties"]["label"] == {"enum": ["maybe"]}


async def test_prompt_run_structured(
    recorded: tuple[trio_llm.Client, list[dict[str, Any]]],
) -> None:
    """Prompt.run_structured fills the template and returns what chat_structured does."""
    client, _ = recorded
    prompt = trio_llm.Prompt("Invent a {kind}.", system="Reply in JSON.", temperature=0)
    customer = await prompt.run_structured(client, Customer, kind="customer")
    direct = await trio_llm.chat_structured(
        client, prompt.messages(kind="customer"), Customer, temperature=0
    )
    assert customer == direct


# --- repairs and the final error ----------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        (Customer, "$.name: Input should be a valid string"),
        (Route, "$.name: 12345 is not of type 'string'"),
        (VERDICT, "$.label: 12345 is not one of ['yes', 'no']"),
    ],
)
async def test_repair_sends_the_precise_error(
    repairing: tuple[trio_llm.Client, list[dict[str, Any]]], schema: Any, problem: str
) -> None:
    """A reply that breaks the schema goes back with the library's path and reason."""
    client, bodies = repairing
    value = await trio_llm.chat_structured(client, "Invent one.", schema)
    assert value is not None
    assert len(bodies) == 2
    first, repair = bodies
    assert repair["messages"][: len(first["messages"])] == first["messages"]
    assistant = repair["messages"][-2]
    assert assistant["role"] == "assistant"
    assert next(iter(json.loads(assistant["content"]).values())) == 12345  # the bad reply
    assert problem in last_user_text(repair)
    # The repair asks for the same schema again.
    assert repair.get("response_format") == first.get("response_format")
    assert repair.get("tools") == first.get("tools")


async def test_exhausted_repairs_raise_with_every_error(provider: str) -> None:
    """After max_repairs bad replies: StructuredOutputError, the last text, every error."""
    config = FakeLLMConfig(invalid_structured_replies=5)
    async with open_recorded(provider, config) as (client, bodies):
        with pytest.raises(trio_llm.StructuredOutputError, match="after 3 attempt") as info:
            await trio_llm.chat_structured(client, "Plan a route.", Route, max_repairs=2)
    error = info.value
    assert isinstance(error, trio_llm.LLMError)
    assert len(bodies) == 3
    assert error.errors == ["$.name: 12345 is not of type 'string'"] * 3
    assert json.loads(error.raw_text)["name"] == 12345
    for attempt, body in enumerate(bodies[1:], 1):
        assert last_user_text(body).count("$.name: 12345 is not of type 'string'") == 1
        assert len(body["messages"]) == 1 + 2 * attempt


async def test_truncated_json_is_an_error_with_the_parser_message() -> None:
    """A reply cut short (max_tokens) is not JSON: the JSON parser's message is the error."""
    async with open_recorded("openai") as (client, bodies):
        with pytest.raises(trio_llm.StructuredOutputError) as info:
            await trio_llm.chat_structured(client, "A route.", Route, max_repairs=1, max_tokens=3)
        assert info.value.raw_text == '{"name'
        assert info.value.errors[0] == (
            "$: not valid JSON (Unterminated string starting at: line 1 column 2 (char 1))"
        )
        assert info.value.errors[0] in last_user_text(bodies[1])
        with pytest.raises(trio_llm.StructuredOutputError) as info:
            await trio_llm.chat_structured(client, "x", Customer, max_repairs=0, max_tokens=3)
        assert info.value.errors == [
            "$: Invalid JSON: EOF while parsing a string at line 1 column 6"
        ]


async def test_many_problems_are_capped(provider: str) -> None:
    """At most ten problems are listed per reply; the rest are counted."""
    codes = {"type": "array", "items": {"type": "string", "pattern": "^X+$"}, "minItems": 12}
    schema = {"type": "object", "properties": {"codes": codes}, "required": ["codes"]}
    async with open_recorded(provider) as (client, bodies):
        with pytest.raises(trio_llm.StructuredOutputError) as info:
            await trio_llm.chat_structured(client, "Codes.", schema, max_repairs=1)
    [first, _] = info.value.errors
    assert first.count("does not match '^X+$'") == 10
    assert first.startswith("$.codes[0]: ")
    assert first.endswith("; ... and 2 more")
    assert last_user_text(bodies[1]).count("\n- ") == 11


async def test_class_validators_are_part_of_the_check(provider: str) -> None:
    """A value the class itself refuses (an attrs or a pydantic validator) is repaired."""

    @attrs.frozen
    class Big:
        size: int = attrs.field(validator=attrs.validators.ge(1000))

    class Huge(pydantic.BaseModel):
        size: int

        @pydantic.field_validator("size")
        @classmethod
        def huge(cls, value: int) -> int:
            if value < 1000:  # the fake server's integers are 0 to 100
                raise ValueError("too small")
            return value

    async with open_recorded(provider) as (client, bodies):
        with pytest.raises(trio_llm.StructuredOutputError) as info:
            await trio_llm.chat_structured(client, "Big.", Big, max_repairs=1)
        assert info.value.errors[0].startswith("$: invalid value ('size' must be >= 1000: ")
        assert "'size' must be >= 1000" in last_user_text(bodies[1])
        with pytest.raises(trio_llm.StructuredOutputError) as info:
            await trio_llm.chat_structured(client, "Huge.", Huge, max_repairs=0)
        assert info.value.errors == ["$.size: Value error, too small"]


async def test_arguments_are_checked_before_sending(fake_llm: FakeLLMServer) -> None:
    """An unsupported schema, an invalid JSON Schema dict or max_repairs < 0: refused."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(TypeError, match="pydantic model, an attrs class"):
            await trio_llm.chat_structured(client, "x", int)
        with pytest.raises(TypeError, match="pydantic model, an attrs class"):
            await trio_llm.chat_structured(client, "x", "Route")  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="a JSON Schema dict must be JSON"):
            await trio_llm.chat_structured(client, "x", {"enum": {1, 2}})
        with pytest.raises(ValueError, match=r"not a valid JSON Schema: schema.type: 5 is not"):
            await trio_llm.chat_structured(client, "x", {"type": 5})
        with pytest.raises(ValueError, match="max_repairs"):
            await trio_llm.chat_structured(client, "x", Route, max_repairs=-1)
    assert fake_llm.stats.total_requests == 0


def _format(model: Any) -> dict[str, Any]:
    """The response_format chat_structured sends for ``model``."""
    schema = trio_llm.json_schema_for(model)
    name = model.__name__
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# --- the Anthropic forced tool -------------------------------------------------------------


async def test_anthropic_forced_tool_end_to_end() -> None:
    """Anthropic: one forced tool whose input_schema is the schema; its input is the reply."""
    async with open_recorded("anthropic") as (client, bodies):
        customer = await trio_llm.chat_structured(client, "Invent a customer.", Customer)
        reply = await client.chat("Invent a customer.", response_format=_format(Customer))
        async with client.stream("Invent a customer.", response_format=_format(Customer)) as s:
            chunks = [chunk.text async for chunk in s]
    body = bodies[0]
    assert "response_format" not in body
    assert body["tools"] == [
        {
            "name": OUTPUT_TOOL,
            "description": "Give your whole answer, a Customer, as this tool's input, "
            "and nothing else.",
            "input_schema": trio_llm.json_schema_for(Customer),
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": OUTPUT_TOOL}
    # The tool call comes back as the reply's text, as OpenAI returns structured output.
    assert reply.finish_reason == "stop"
    assert "tool_calls" not in reply.message
    assert reply.raw["content"][0]["type"] == "tool_use"
    assert Customer.model_validate_json(reply.text) == customer
    assert "".join(chunks) == s.response.text
    assert json.loads(s.response.text) == json.loads(reply.text)
    assert s.response.finish_reason == "stop"


def test_pydantic_stays_unimported_when_unused() -> None:
    """Structured output with an attrs class and a dict schema never imports pydantic.

    The client has its own price: genai-prices' table (pricing by list price) is read with
    pydantic, so it would import pydantic whatever structured output does.
    """
    script = """
import sys, attrs, trio, trio_llm
from trio_llm.testing import open_fake_llm

@attrs.frozen
class Point:
    x: int
    y: float

async def main():
    async with open_fake_llm() as server, trio_llm.open_client(
        base_url=server.base_url, model="m", prices=trio_llm.Price(input=0.1, output=0.2)
    ) as client:
        print(await trio_llm.chat_structured(client, "A point.", Point))
        print(await trio_llm.chat_structured(client, "A point.", trio_llm.json_schema_for(Point)))
        print(trio_llm.Prompt("{x}").format(x=1))

trio.run(main)
assert "pydantic" not in sys.modules, "pydantic was imported"
print("no pydantic")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "no pydantic"
    assert "Point(x=" in done.stdout
