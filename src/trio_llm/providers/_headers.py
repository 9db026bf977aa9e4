"""Parsing of response header values the adapters share: counts, durations, times.

Every parser is lenient in the same way: a malformed value gives ``None`` (the caller then
acts as if the header were absent) and never raises.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import datetime

__all__ = [
    "parse_count",
    "parse_go_duration",
    "parse_limit",
    "parse_rfc3339_delay",
    "prefixed",
]

_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_SECONDS_PER_UNIT = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 MICRO SIGN, what Go prints
    "μs": 1e-6,  # U+03BC GREEK SMALL LETTER MU
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:?\d\d)?")


def prefixed(headers: Mapping[str, str], prefix: str) -> dict[str, str]:
    """Return the headers named ``prefix...``, keyed by the rest of their lower-cased name.

    ``prefix`` is lower case; names are matched case-insensitively, so a plain dict with
    mixed-case keys works as well as ``httpx2.Headers``.
    """
    start = len(prefix)
    fields: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith(prefix):
            fields[lower[start:]] = value
    return fields


def parse_count(value: str | None) -> float | None:
    """Return a non-negative finite number, or ``None``."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def parse_limit(value: str | None) -> float | None:
    """Return a positive finite number, or ``None`` (a limit of 0 is no limit)."""
    number = parse_count(value)
    return number if number else None


def parse_go_duration(value: str | None) -> float | None:
    """Return the seconds in a Go duration (``1m30.5s``, ``12ms``, ``0s``, ``0``) or a number.

    A duration too long to be finite counts as malformed.
    """
    if value is None:
        return None
    text = value.strip()
    if _PLAIN_NUMBER.fullmatch(text):
        total = float(text)
        return total if math.isfinite(total) else None
    total = 0.0
    position = 0
    for match in _GO_DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match[1]) * _SECONDS_PER_UNIT[match[2]]
        position = match.end()
    if position == 0 or position != len(text) or not math.isfinite(total):
        return None
    return total


def parse_rfc3339_delay(value: str | None) -> float | None:
    """Return the seconds from now (wall clock) until an RFC 3339 time, at least 0.

    A Go duration (or plain seconds) is accepted too. The wall clock, not trio's: the
    time is the server's, and a ``MockClock`` has nothing to do with it.
    """
    if value is None:
        return None
    text = value.strip()
    match = _RFC3339.fullmatch(text)
    if match is None:
        return parse_go_duration(text)
    day, clock, fraction, zone = match.groups()
    # datetime.fromisoformat before 3.11 takes neither "Z" nor fractions other than 3 or
    # 6 digits, so normalise both.
    fraction = f".{(fraction or '')[:6]:0<6}"
    if zone is None or zone in "Zz":
        zone = "+00:00"
    elif ":" not in zone:
        zone = f"{zone[:3]}:{zone[3:]}"
    try:
        moment = datetime.fromisoformat(f"{day}T{clock}{fraction}{zone}")
    except ValueError:
        return None
    # timestamp() of an aware time, not astimezone(): that overflows near year 1 or 9999.
    return max(0.0, moment.timestamp() - time.time())
