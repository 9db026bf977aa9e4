"""Endpoints from a TOML file, for ``trio-llm batch|chat|serve --endpoints FILE.toml``.

One ``[[endpoint]]`` table per endpoint, with the fields of :class:`~trio_llm.Endpoint`::

    [[endpoint]]
    base_url = "http://10.0.0.1:8000/v1"
    model = "llama-3.3-70b"

    [[endpoint]]
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"
    model = "gpt-4o-mini"
    priority = 1
    rate_limit = { requests_per_minute = 500, tokens_per_minute = 200000 }

Every problem is one :class:`~trio_llm.ConfigurationError` line naming the file and the
table (``FILE: [[endpoint]] #2 ("name"): ...``).
"""

from __future__ import annotations

import sys
from typing import Any, Final

import attrs

from ._endpoints import Endpoint
from ._errors import ConfigurationError
from ._ratelimit import RateLimit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tests run on 3.11+
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["load_endpoints"]

_FIELDS: Final = tuple(field.name for field in attrs.fields(Endpoint))
_RATE_FIELDS: Final = tuple(field.name for field in attrs.fields(RateLimit))


def load_endpoints(path: str) -> list[Endpoint]:
    """Read the endpoints of the TOML file at ``path``, in the order written.

    Raises:
        ConfigurationError: the file cannot be read, is not TOML, has no ``[[endpoint]]``
            table, or a table is not a valid endpoint (unknown field, bad value).
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from None
    for key in data:
        if key != "endpoint":
            raise ConfigurationError(
                f"{path}: unknown top-level key {key!r}; write one [[endpoint]] table per endpoint"
            )
    tables = data.get("endpoint")
    if not isinstance(tables, list) or not tables:
        raise ConfigurationError(
            f'{path}: no [[endpoint]] table; write one per endpoint, each with base_url = "..."'
        )
    return [_endpoint(path, index, table) for index, table in enumerate(tables, 1)]


def _endpoint(path: str, index: int, table: object) -> Endpoint:
    """Build the ``index``-th endpoint of the file from its ``table``."""
    where = f"{path}: [[endpoint]] #{index}"
    if not isinstance(table, dict):  # pragma: no cover - TOML arrays of tables hold tables
        raise ConfigurationError(f"{where}: not a table")
    fields: dict[str, Any] = dict(table)
    if isinstance(fields.get("name"), str):
        where += f" ({fields['name']!r})"
    for name in fields:
        if name not in _FIELDS:
            raise ConfigurationError(
                f"{where}: unknown field {name!r} (fields: {', '.join(_FIELDS)})"
            )
    if "base_url" not in fields:
        raise ConfigurationError(f'{where}: base_url is missing (base_url = "http://...")')
    rate = fields.get("rate_limit")
    if rate is not None:
        if not isinstance(rate, dict) or not set(rate) <= set(_RATE_FIELDS):
            raise ConfigurationError(
                f"{where}: rate_limit must be a table of {' and '.join(_RATE_FIELDS)}, not {rate!r}"
            )
        try:
            fields["rate_limit"] = RateLimit(**rate)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}: rate_limit: {exc}") from None
    try:
        return Endpoint(fields.pop("base_url"), **fields)
    except (TypeError, ValueError) as exc:  # ConfigurationError is a ValueError
        raise ConfigurationError(f"{where}: {exc}") from None
