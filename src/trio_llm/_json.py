"""JSON on the hot paths: orjson where it is installed, the standard library otherwise.

orjson parses a streamed chat chunk in 0.7 us against the standard library's 2.3 us, and
encodes a request body about ten times faster (benchmarks/peers.py, docs/performance.md).
It is a dependency on CPython; elsewhere (PyPy) the standard library is used.

Whatever orjson refuses or would write differently goes to the standard library, so these
functions behave as ``json`` does, errors included: integers beyond 64 bits, ``NaN``
literals and lone surrogates; a NaN or infinite float (orjson would write ``null``; an
output holding ``null`` is searched for one); dates and dataclasses (refused, as by
``json``). What remains is that orjson encodes a few types ``json`` refuses (UUIDs, plain
enums, numpy arrays), and reads an integer beyond 64 bits as a float: replies from LLM
APIs hold none, and input files whose every digit matters (batch lines) are read with the
standard library.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["canonical", "dumps", "loads"]

try:
    import orjson
except ImportError:  # pragma: no cover - PyPy, or an install without it
    orjson = None  # type: ignore[assignment]


def _std_dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        # A lone surrogate (say, half an emoji from a bad slice) has no UTF-8 form; JSON's
        # \u escapes carry it, and the reader decides what it means.
        return json.dumps(value, separators=(",", ":")).encode()


def _has_non_finite_float(value: Any) -> bool:
    """Whether ``value`` holds a NaN or an infinity, at any depth."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


if orjson is not None:
    _orjson_loads = orjson.loads
    _orjson_dumps = orjson.dumps
    # Non-string keys become strings, as json.dumps makes them (logit_bias's token ids,
    # say); dates and dataclasses are refused, as by json.
    _OPTIONS = (
        orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
    )
    _ORJSON_ERRORS = (orjson.JSONDecodeError, UnicodeDecodeError)

    def loads(data: str | bytes) -> Any:
        """Decode a JSON document, as ``json.loads`` does."""
        try:
            return _orjson_loads(data)
        except _ORJSON_ERRORS:
            return json.loads(data)  # the standard library's result or its own error

    def dumps(value: Any, *, exact_non_finite: bool = True) -> bytes:
        """Encode ``value`` as compact UTF-8 JSON, as ``json.dumps`` would.

        ``exact_non_finite=False`` skips the search for NaN and infinities in an output
        holding ``null`` (they are then written as ``null``): for records decoded from
        JSON, which hold none, and are full of ``null``.

        Raises:
            TypeError: ``value`` holds something JSON cannot represent.
        """
        try:
            encoded = _orjson_dumps(value, option=_OPTIONS)
        except TypeError:  # orjson.JSONEncodeError included
            return _std_dumps(value)
        if exact_non_finite and b"null" in encoded and _has_non_finite_float(value):
            # orjson writes NaN and infinities as null, json as NaN or Infinity (which a
            # server refuses, as it should): json writes it.
            return _std_dumps(value)
        # orjson's bytes keep the whole buffer it wrote into (4 KiB at least, measured
        # in RSS); a request body lives as long as its request, so it is copied to size.
        return memoryview(encoded).tobytes()

    _SORTED = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS

    def canonical(value: Any) -> bytes:
        """Encode ``value`` in one canonical form: compact UTF-8 JSON, keys sorted.

        For hashing (the response cache's keys): equal values give equal bytes, whatever
        the order of their keys. Non-string keys are written as strings, then sorted.

        Raises:
            TypeError: ``value`` holds something JSON cannot represent.
        """
        return _orjson_dumps(value, option=_SORTED)

else:  # pragma: no cover - exercised only where orjson is missing

    def loads(data: str | bytes) -> Any:
        """Decode a JSON document."""
        return json.loads(data)

    def dumps(value: Any, *, exact_non_finite: bool = True) -> bytes:
        """Encode ``value`` as compact UTF-8 JSON.

        Raises:
            TypeError: ``value`` holds something JSON cannot represent.
        """
        return _std_dumps(value)

    def canonical(value: Any) -> bytes:
        """Encode ``value`` as compact UTF-8 JSON with sorted keys (see above).

        Raises:
            TypeError: ``value`` holds something JSON cannot represent, or keys of types
                that do not sort together.
        """
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8", "surrogatepass")
