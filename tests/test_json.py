"""trio_llm._json: orjson's speed, the standard library's reach and errors."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import uuid
from typing import Any

import pytest

from trio_llm import _json


@dataclasses.dataclass
class Point:
    x: int
    y: int


@pytest.mark.parametrize(
    "value",
    [
        {"model": "m", "messages": [{"role": "user", "content": "héllo 🌍"}]},
        {"n": 1, "t": 0.7, "stop": None, "stream": True, "list": [1, 2.5, "x"]},
        {"huge": 2**70},  # beyond orjson's 64 bits: the standard library writes it
        {"lone": "half an emoji \ud83d"},  # no UTF-8 form: written as a \\u escape
    ],
)
def test_dumps_matches_the_standard_library(value: dict[str, Any]) -> None:
    encoded = _json.dumps(value)
    assert isinstance(encoded, bytes)
    assert json.loads(encoded) == value
    assert b'": ' not in encoded
    assert b', "' not in encoded  # compact, as the wire wants


def test_dumps_turns_non_string_keys_into_strings() -> None:
    """As json.dumps does: logit_bias maps token ids (ints) to biases."""
    assert json.loads(_json.dumps({"logit_bias": {50256: -100}})) == {"logit_bias": {"50256": -100}}


@pytest.mark.parametrize("value", [object(), datetime.date(2026, 1, 1), Point(1, 2)])
def test_dumps_raises_type_error_for_what_json_cannot_hold(value: object) -> None:
    """As json.dumps does (orjson alone would write dates and dataclasses)."""
    with pytest.raises(TypeError):
        _json.dumps({"x": value})


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_dumps_writes_nan_and_infinities_as_json_does(number: float) -> None:
    """Not as orjson's null: a server refuses NaN (as it should), and null would pass."""
    body = {"temperature": number, "stop": None}
    assert _json.dumps(body) == json.dumps(body, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": [1, 2, {"b": null}]}', {"a": [1, 2, {"b": None}]}),
        (b'{"text": "\xc3\xa9"}', {"text": "é"}),
        ('{"n": 9223372036854775807}', {"n": 9223372036854775807}),
    ],
)
def test_loads_reads_what_json_reads(text: str | bytes, expected: object) -> None:
    assert _json.loads(text) == expected


def test_loads_accepts_nan_as_json_does() -> None:
    assert math.isnan(_json.loads('{"x": NaN}')["x"])


@pytest.mark.parametrize("text", ['{"a": 1', "", "[1,]", b"\xff"])
def test_loads_raises_the_standard_librarys_errors(text: str | bytes) -> None:
    try:
        json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bad bytes
        reference = exc
    with pytest.raises(type(reference)) as caught:
        _json.loads(text)
    assert str(caught.value) == str(reference)


def test_null_in_text_does_not_send_the_body_to_the_standard_library() -> None:
    """Only a real NaN or infinity does: a UUID still encodes beside a text saying null."""
    body = {"id": uuid.UUID(int=1), "prompt": "return null;", "stop": None}
    assert json.loads(_json.dumps(body))["prompt"] == "return null;"


def test_nested_non_finite_floats_are_found() -> None:
    body = {"messages": [{"content": None}], "logit_bias": {"1": [1.0, -math.inf]}}
    assert _json.dumps(body) == json.dumps(body, separators=(",", ":")).encode()
    # Records decoded from JSON hold none: the search can be skipped, and NaN is null.
    assert _json.dumps({"x": math.nan, "y": None}, exact_non_finite=False) == (
        b'{"x":null,"y":null}'
    )
