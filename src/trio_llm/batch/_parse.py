"""One line of a batch input file: parsed and checked into a request, or said invalid.

A line is a request in the OpenAI Batch API format::

    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    {"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {...}}

``"url": "/v1/messages"`` takes an Anthropic Messages body (for a client opened with
``provider="anthropic"``). Or the short form ``{"custom_id": "c", "prompt": "...", ...}``:
one user message, with any other field (``model``, ``max_tokens``, ``temperature``, ...)
going to the body.

:func:`parse_line` reads a line with the standard library (every digit of a number
kept, as it is sent); the check of a whole file reads each line with orjson first and
asks :func:`parse_line` only where the two could differ (:func:`fast_custom_id`,
:func:`checked_line`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, final

import attrs

from ..providers._base import Provider
from ..providers._registry import PROVIDER_NAMES, provider_named
from ._lines import fast_loads

__all__ = [
    "CHAT_URL",
    "EMBEDDINGS_URL",
    "MESSAGES_URL",
    "NO_URL_REFUSED",
    "Invalid",
    "Request",
    "checked_line",
    "duplicate_line",
    "fast_custom_id",
    "parse_line",
    "unsendable_urls",
    "wrong_provider",
]

CHAT_URL: Final = "/v1/chat/completions"
EMBEDDINGS_URL: Final = "/v1/embeddings"
MESSAGES_URL: Final = "/v1/messages"  # Anthropic's Messages API
_URLS: Final = (CHAT_URL, EMBEDDINGS_URL, MESSAGES_URL)

# Keyword arguments of Client.chat/embed other than body fields: a body field of that
# name could not be passed through unchanged, so such a line is refused up front.
_RESERVED_FIELDS: Final = frozenset({"retry", "prompt_or_messages", "texts"})


@final
@attrs.frozen(kw_only=True)
class Request:
    """A valid input line: one request to send.

    Attributes:
        line: its line number (from 1).
        custom_id: its ``custom_id``.
        url: :data:`CHAT_URL`, :data:`EMBEDDINGS_URL` or :data:`MESSAGES_URL`.
        body: the request body, as in the file (the short form's built from its fields).
    """

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


@final
@attrs.frozen(kw_only=True)
class Invalid:
    """An invalid input line.

    Attributes:
        line: its line number (from 1).
        custom_id: its ``custom_id`` if it has a usable one (a non-empty string).
        code: a machine-readable reason (``invalid_json``, ``missing_custom_id``,
            ``duplicate_custom_id``, ``invalid_url``, ...).
        reason: what is wrong, for people.
    """

    line: int
    custom_id: str | None
    code: str
    reason: str

    @property
    def keyed_by_line(self) -> bool:
        """Whether its output line is found by line number (``custom_id`` null).

        A line with no usable ``custom_id``, or repeating one an earlier line owns, has
        no ``custom_id`` of its own to be recorded under.
        """
        return self.custom_id is None or self.code == "duplicate_custom_id"


def duplicate_line(line: int, custom_id: str, first_line: int) -> Invalid:
    """Return the :class:`Invalid` of a line repeating the ``custom_id`` of ``first_line``."""
    return Invalid(
        line=line,
        custom_id=custom_id,
        code="duplicate_custom_id",
        reason=f"duplicate custom_id {custom_id!r} (first on line {first_line})",
    )


def _json_type(value: object, *, empty: bool = False) -> str:
    """Name ``value``'s JSON type for a message; with ``empty``, say an empty one is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if empty and not value else "a string"
    if isinstance(value, list):
        return "an empty array" if empty and not value else "an array"
    return "an object"


def _check_messages(messages: object) -> str | None:
    if not isinstance(messages, list) or not messages:
        shown = _json_type(messages, empty=True)
        return f"body.messages must be a non-empty array of messages, not {shown}"
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"body.messages[{position}] must be an object, not {_json_type(message)}"
        if not isinstance(message.get("role"), str):
            return f"body.messages[{position}] needs a string 'role'"
    return None


def _check_embedding_input(value: object) -> str | None:
    if isinstance(value, str) and value:
        return None
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return None
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return None  # one text as token ids
        if all(
            isinstance(item, list) and item and all(isinstance(t, int) for t in item)
            for item in value
        ):
            return None  # several texts as token ids
    return (
        "body.input must be a non-empty string or array of strings (or of token ids), "
        f"not {_json_type(value, empty=True)}"
    )


def _check_body(url: str, body: dict[str, Any], default_model: str | None) -> str | None:
    """Return what is wrong with ``body`` for ``url``, or ``None``."""
    reserved = _RESERVED_FIELDS.intersection(body)
    if reserved:
        return f"body field {sorted(reserved)[0]!r} cannot be passed through by trio-llm"
    if "model" in body:
        model = body["model"]
        if not isinstance(model, str) or not model:
            return f"body.model must be a non-empty string, not {_json_type(model, empty=True)}"
    elif not default_model:
        return "no model: set body.model, or give a default model (--model)"
    if body.get("stream") is True:
        return "body.stream: streamed replies are not supported in a batch"
    if url in (CHAT_URL, MESSAGES_URL):
        return _check_messages(body.get("messages"))
    return _check_embedding_input(body.get("input"))


# A \ud800-\udfff escape: valid JSON, but alone (not as half of a pair) it decodes to a
# string that cannot be encoded as UTF-8, so it could not be sent.
_LONE_SURROGATE: Final = re.compile(r"\\u[dD][89a-fA-F]")

# No url refused by the client (the default of ``unsendable``).
NO_URL_REFUSED: Final[Mapping[str, str]] = MappingProxyType({})


def wrong_provider(url: str) -> str:
    """Say which providers a client needs to send ``url`` lines."""
    names = [name for name in PROVIDER_NAMES if provider_named(name).accepts_batch_url(url)]
    needed = " or ".join(f"provider={name!r}" for name in names)
    return f"{url} lines need a client opened with {needed}"


def unsendable_urls(provider: Provider) -> dict[str, str]:
    """Map each url ``provider`` cannot send to why (a line with that url is invalid)."""
    return {
        url: f"{wrong_provider(url)}; this one is provider={provider.name!r} (see --provider)"
        for url in _URLS
        if not provider.accepts_batch_url(url)
    }


def _encodable(body: dict[str, Any]) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_line(
    raw: bytes,
    line: int,
    *,
    default_model: str | None,
    unsendable: Mapping[str, str] = NO_URL_REFUSED,
) -> Request | Invalid:
    """Parse and check one input line (duplicates are :func:`check_input`'s business).

    Args:
        raw: the line's bytes (UTF-8 JSON; surrounding whitespace is ignored).
        line: its line number, for messages.
        default_model: the model used when a body names none (``None``: a body must).
        unsendable: url -> why the client cannot send lines with that url (its provider
            does not speak that API); such lines are invalid.
    """
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        return _not_utf8(raw, line, exc)
    if line == 1 and text.startswith("\ufeff"):  # a byte-order mark some editors write
        text = text[1:]
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        return _not_json(text, line, exc)
    surrogates = "\\u" in text and _LONE_SURROGATE.search(text) is not None
    return _from_payload(payload, line, default_model, unsendable, surrogates=surrogates)


def _from_payload(
    payload: Any,
    line: int,
    default_model: str | None,
    unsendable: Mapping[str, str],
    *,
    surrogates: bool,
) -> Request | Invalid:
    """Check the decoded ``payload`` of a line; ``surrogates``: it may hold a lone one."""
    # Runs once per line to send: the checks of a valid line stay inline or in one call
    # each; only the failures build their messages in helpers.
    if not isinstance(payload, dict):
        return _anonymous(
            line, "invalid_json", f"expected a JSON object, got {_json_type(payload)}"
        )
    if "custom_id" not in payload:
        return _anonymous(line, "missing_custom_id", "no custom_id")
    custom_id = payload["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return _anonymous(
            line,
            "invalid_custom_id",
            f"custom_id must be a non-empty string, not {_json_type(custom_id, empty=True)}",
        )
    if "prompt" in payload:
        problem = _short_form_problem(payload, line, custom_id)
        if problem is not None:
            return problem
        body = {k: v for k, v in payload.items() if k not in ("custom_id", "prompt")}
        body["messages"] = [{"role": "user", "content": payload["prompt"]}]
        url = CHAT_URL
    else:
        problem = _batch_form_problem(payload, line, custom_id)
        if problem is not None:
            return problem
        url = payload["url"]
        body = payload["body"]
    refused = unsendable.get(url)
    if refused is not None:
        return Invalid(line=line, custom_id=custom_id, code="invalid_url", reason=refused)
    reason = _check_body(url, body, default_model)
    if reason is not None:
        return Invalid(line=line, custom_id=custom_id, code="invalid_body", reason=reason)
    if surrogates and not _encodable(body):
        return Invalid(
            line=line,
            custom_id=custom_id,
            code="invalid_body",
            reason="the body holds a lone surrogate escape (\\ud800-\\udfff): not UTF-8",
        )
    return Request(line=line, custom_id=custom_id, url=url, body=body)


def fast_custom_id(raw: bytes) -> tuple[str | None, Any]:
    """Read a line with orjson: ``(custom_id, payload)`` if it has a usable one.

    ``(None, ...)``: orjson refused the line, or it has no usable ``custom_id``; then
    only :func:`parse_line` says what it is. When orjson reads a line, the standard
    library reads it the same (both follow RFC 8259 strictly), except integers beyond
    64 bits, which orjson reads as floats, and a byte-order mark, lone surrogate escapes,
    ``NaN`` and infinities, which orjson refuses.
    """
    try:
        payload = fast_loads(raw)
    except ValueError:
        return None, None
    if type(payload) is dict:
        custom_id = payload.get("custom_id")
        if type(custom_id) is str and custom_id:
            return custom_id, payload
    return None, payload


def checked_line(
    payload: Any,
    raw: bytes,
    ending: bytes,
    line: int,
    default_model: str | None,
    unsendable: Mapping[str, str],
) -> Request | Invalid:
    """Return :func:`parse_line`'s verdict on ``raw + ending``, which orjson read as ``payload``.

    orjson refuses lone surrogates, so ``payload`` holds none; a refusal is confirmed
    by the standard library, which reads integers beyond 64 bits as integers (a token
    id orjson would make a float).
    """
    item = _from_payload(payload, line, default_model, unsendable, surrogates=False)
    if isinstance(item, Invalid):
        return parse_line(raw + ending, line, default_model=default_model, unsendable=unsendable)
    return item


def _anonymous(line: int, code: str, reason: str) -> Invalid:
    """Return the :class:`Invalid` of a line with no usable ``custom_id``."""
    return Invalid(line=line, custom_id=None, code=code, reason=reason)


def _not_utf8(raw: bytes, line: int, exc: UnicodeDecodeError) -> Invalid:
    reason = f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}"
    return _anonymous(line, "invalid_json", reason)


def _not_json(text: str, line: int, exc: json.JSONDecodeError) -> Invalid:
    # Positions count characters of the line, whose newline is no part of the JSON.
    at_end = exc.pos >= len(text.rstrip())
    where = "at the end of the line" if at_end else f"column {exc.pos + 1}"
    return _anonymous(line, "invalid_json", f"invalid JSON: {exc.msg} ({where})")


# The fields of the Batch API form, which the short form (``prompt``) must not mix in.
_BATCH_FORM_FIELDS: Final = frozenset({"method", "url", "body"})


def _short_form_problem(payload: dict[str, Any], line: int, custom_id: str) -> Invalid | None:
    """Return what is wrong with the envelope of a ``prompt`` line, or ``None``."""
    if not _BATCH_FORM_FIELDS.isdisjoint(payload):
        reason = "a line has either 'prompt' (short form) or 'method', 'url' and 'body'"
        return Invalid(line=line, custom_id=custom_id, code="invalid_request", reason=reason)
    prompt = payload["prompt"]
    if not isinstance(prompt, str) or not prompt:
        reason = f"prompt must be a non-empty string, not {_json_type(prompt, empty=True)}"
        return Invalid(line=line, custom_id=custom_id, code="invalid_prompt", reason=reason)
    if "messages" in payload:
        reason = "a line has either 'prompt' or 'messages'"
        return Invalid(line=line, custom_id=custom_id, code="invalid_request", reason=reason)
    return None


def _batch_form_problem(payload: dict[str, Any], line: int, custom_id: str) -> Invalid | None:
    """Return what is wrong with the envelope of a Batch API line, or ``None``.

    ``None`` means its ``url`` is one of :data:`_URLS` and its ``body`` an object.
    """
    method = payload.get("method")
    if method != "POST":
        shown = "missing" if "method" not in payload else f"{method!r}"
        reason = f'method must be "POST" ({shown})'
        return Invalid(line=line, custom_id=custom_id, code="invalid_method", reason=reason)
    url = payload.get("url")
    if url not in _URLS:
        shown = "missing" if "url" not in payload else f"{url!r}"
        reason = f"unsupported url {shown}; supported: {', '.join(_URLS)}"
        return Invalid(line=line, custom_id=custom_id, code="invalid_url", reason=reason)
    body = payload.get("body")
    if not isinstance(body, dict):
        reason = f"body must be a JSON object, not {_json_type(body)}"
        return Invalid(line=line, custom_id=custom_id, code="invalid_body", reason=reason)
    return None
