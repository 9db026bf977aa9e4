"""What does checking a structured reply cost, per kind of schema? (CPU per reply)

    python benchmarks/structured.py              # 7 trials, the median of each
    python benchmarks/structured.py --stops 50   # a longer reply

Times what ``chat_structured`` does with one reply (the fake server's, for a route with
``--stops`` stops) once the request is answered: a pydantic model's
``model_validate_json``; an attrs class's ``jsonschema`` check and ``cattrs`` build; a
JSON Schema dict's ``jsonschema`` check. The baseline, measured in the same run, is
``json.loads`` of the same text. Also the first call's cost of a schema (building the
schema and checking it against the metaschema, then cached) and a cached lookup.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

import attrs
import pydantic

import trio_llm
from trio_llm import _structured
from trio_llm.testing._replies import json_from_schema


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


class StopModel(pydantic.BaseModel):
    city: str
    minutes: float


class RouteModel(pydantic.BaseModel):
    name: str
    stops: list[StopModel]
    backup: StopModel | None
    kind: Literal["bus", "train"]


def per_call(fn: Callable[[], Any], trials: int, seconds: float = 0.2) -> float:
    """Microseconds per call of ``fn``: the median of ``trials`` timed loops."""
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4:
        fn()
        calls += 1
    number = max(1, calls * 4 // trials)
    runs = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stops", type=int, default=5, help="stops in the reply's route")
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()
    schema = trio_llm.json_schema_for(Route)
    schema["properties"]["stops"]["minItems"] = args.stops
    schema["properties"]["stops"]["maxItems"] = args.stops
    text = json_from_schema(json.dumps(schema), "a route", 0, "bench")
    dict_schema = {**schema, "title": "Route"}
    results = {
        "json.loads (baseline)": per_call(lambda: json.loads(text), args.trials),
        "pydantic model": per_call(lambda: _structured._target(RouteModel).load(text), args.trials),
        "attrs class (jsonschema + cattrs)": per_call(
            lambda: _structured._target(Route).load(text), args.trials
        ),
        "JSON Schema dict (jsonschema)": per_call(
            lambda: _structured._target(dict_schema).load(text), args.trials
        ),
    }

    def first_call() -> None:
        _structured._class_target.cache_clear()
        _structured._dict_target.cache_clear()
        _structured._target(Route)

    setup = {
        "first call of a schema (attrs class)": per_call(first_call, args.trials, 1.0),
        "later calls (cached)": per_call(lambda: _structured._target(Route), args.trials),
    }
    base = results["json.loads (baseline)"]
    print(f"one reply of {len(text):,} bytes ({args.stops} stops); median of {args.trials}")
    for name, micros in {**results, **setup}.items():
        print(f"  {name:38s} {micros:9.1f} us  {micros / base:7.1f}x json.loads")


if __name__ == "__main__":
    main()
