"""Reading and checking batch input files, one streaming pass at a time.

A line is a request in the OpenAI Batch API format::

    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
    {"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {...}}

``"url": "/v1/messages"`` takes an Anthropic Messages body (for a client opened with
``provider="anthropic"``). Or the short form ``{"custom_id": "c", "prompt": "...", ...}``:
one user message, with any other field (``model``, ``max_tokens``, ``temperature``, ...)
going to the body. Blank lines are ignored; line numbers count every physical line, from 1.

:func:`check_input` is the first pass: it parses every line, finds every problem (with
its line number) and duplicate ``custom_id``, and marks which lines the run must handle,
before anything is sent. The run's own pass re-reads the file and parses only those.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import IO, Any, Final, final

import attrs
import trio

from .._errors import BatchInputError
from ..providers._base import Provider
from ..providers._registry import PROVIDER_NAMES, provider_named
from ._keys import AnsweredKeys, HashSet, key_hash

__all__ = [
    "CHAT_URL",
    "EMBEDDINGS_URL",
    "MESSAGES_URL",
    "Bits",
    "InputPlan",
    "Invalid",
    "Request",
    "check_input",
    "duplicate_line",
    "parse_line",
    "read_lines",
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

# How many problems an error message lists; the count covers them all.
_LISTED_PROBLEMS: Final = 10
# Lines parsed between two checkpoints, so a long pass never starves other tasks.
_LINES_PER_CHECKPOINT: Final = 2048


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
_NO_URL_REFUSED: Final[Mapping[str, str]] = MappingProxyType({})


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
    unsendable: Mapping[str, str] = _NO_URL_REFUSED,
) -> Request | Invalid:
    """Parse and check one input line (duplicates are :func:`check_input`'s business).

    Args:
        raw: the line's bytes (UTF-8 JSON; surrounding whitespace is ignored).
        line: its line number, for messages.
        default_model: the model used when a body names none (``None``: a body must).
        unsendable: url -> why the client cannot send lines with that url (its provider
            does not speak that API); such lines are invalid.
    """
    # Runs once per line, twice per run: the checks of a valid line stay inline or in
    # one call each; only the failures build their messages in helpers.
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
    if "\\u" in text and _LONE_SURROGATE.search(text) and not _encodable(body):
        return Invalid(
            line=line,
            custom_id=custom_id,
            code="invalid_body",
            reason="the body holds a lone surrogate escape (\\ud800-\\udfff): not UTF-8",
        )
    return Request(line=line, custom_id=custom_id, url=url, body=body)


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


def read_lines(file: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, bytes)`` for each non-blank line of ``file``, from its start."""
    file.seek(0)
    for number, raw in enumerate(file, 1):
        if raw and not raw.isspace():
            yield number, raw


@final
class Bits:
    """A growable bit per line number: 1 bit a line (125 KB for a million lines)."""

    __slots__ = ("_bytes",)

    def __init__(self) -> None:
        self._bytes = bytearray()

    def set(self, index: int) -> None:
        """Set bit ``index``."""
        byte = index >> 3
        if byte >= len(self._bytes):
            self._bytes.extend(bytes(byte - len(self._bytes) + 4096))
        self._bytes[byte] |= 1 << (index & 7)

    def __getitem__(self, index: int) -> bool:
        byte = index >> 3
        return byte < len(self._bytes) and bool(self._bytes[byte] & (1 << (index & 7)))


@final
@attrs.define(kw_only=True)
class InputPlan:
    """What the first pass found, and what the run must do.

    Attributes:
        path: the input file, as given.
        total: non-blank lines.
        to_send: valid lines not answered yet: the requests to send.
        to_record: invalid lines to record as error lines (only with ``skip_invalid``).
        answered_ok: lines already answered successfully in OUTPUT.
        answered_failed: lines already answered with an error in OUTPUT.
        handle: the lines the run must handle (send or record), by line number.
        duplicates: line number -> (custom_id, line of its first occurrence), for each
            line repeating an earlier ``custom_id``.
        identity: the input file's (device, inode, size, mtime), to notice a change.
        unsendable: url -> why the client cannot send it (such lines are invalid).
        models: the models the lines to send name (``""``: the client's default).
    """

    path: str
    total: int = 0
    to_send: int = 0
    to_record: int = 0
    answered_ok: int = 0
    answered_failed: int = 0
    handle: Bits = attrs.Factory(Bits)
    duplicates: dict[int, tuple[str, int]] = attrs.Factory(dict)
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)
    unsendable: Mapping[str, str] = _NO_URL_REFUSED
    models: set[str] = attrs.Factory(set)


def file_identity(file: IO[bytes]) -> tuple[int, int, int, int]:
    """Return ``file``'s (device, inode, size, mtime in ns)."""
    status = os.fstat(file.fileno())
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


async def _locate_duplicates(
    file: IO[bytes],
    suspects: dict[int, int],
    default_model: str | None,
    unsendable: Mapping[str, str],
) -> tuple[dict[int, tuple[str, int]], list[Request | Invalid]]:
    """Confirm suspected duplicates exactly, in a second pass over the file.

    The first pass compares 64-bit hashes; this one compares the strings of the lines
    whose hashes are suspect (``suspects``: line number -> hash of its ``custom_id``).

    Returns:
        line -> (custom_id, line of its first occurrence), for each true duplicate; and
        the suspects that were only hash collisions, parsed, to be planned as usual.
    """
    wanted = set(suspects.values())
    first_line: dict[str, int] = {}
    duplicates: dict[int, tuple[str, int]] = {}
    collided: list[Request | Invalid] = []
    for number, raw in read_lines(file):
        if number % _LINES_PER_CHECKPOINT == 0:
            await trio.lowlevel.checkpoint()
        parsed = parse_line(raw, number, default_model=default_model, unsendable=unsendable)
        custom_id = parsed.custom_id
        if custom_id is None or key_hash(custom_id) not in wanted:
            continue
        first = first_line.setdefault(custom_id, number)
        if number in suspects:
            if first < number:
                duplicates[number] = (custom_id, first)
            else:
                collided.append(parsed)
    return duplicates, collided


def _problem_message(path: str, problems: list[Invalid], count: int) -> str:
    def describe(problem: Invalid) -> str:
        return f"{path}:{problem.line}: {problem.reason}"

    if count == 1:
        return f"{describe(problems[0])}; nothing was sent"
    listed = "\n".join(f"  {describe(problem)}" for problem in problems)
    more = f"\n  ... and {count - len(problems)} more" if count > len(problems) else ""
    return f"{path}: {count} invalid lines; nothing was sent:\n{listed}{more}"


@final
class _Planner:
    """Count each checked line into the plan: answered already, to send, or to record.

    Invalid lines not answered already are problems: the first few (by line number) are
    kept for the error message, and all are counted.
    """

    __slots__ = ("_answered_ok", "_failed", "_failed_lines", "plan", "problem_count", "problems")

    def __init__(self, plan: InputPlan, answered: AnsweredKeys, *, retry_failed: bool) -> None:
        self.plan = plan
        self._answered_ok = answered.ok
        # With retry_failed, lines answered with an error count as unanswered: their error
        # lines are removed before the run.
        self._failed = HashSet() if retry_failed else answered.failed
        self._failed_lines: set[int] = set() if retry_failed else answered.failed_lines
        self.problems: list[Invalid] = []
        self.problem_count = 0

    def add(self, item: Request | Invalid) -> None:
        """Plan ``item``'s line."""
        plan = self.plan
        if isinstance(item, Invalid):
            if item.keyed_by_line:
                if item.line in self._failed_lines:
                    plan.answered_failed += 1
                    return
            elif item.custom_id is None:  # pragma: no cover - keyed_by_line covers it
                raise AssertionError(item)
            elif item.custom_id in self._answered_ok:  # answered before the line was changed
                plan.answered_ok += 1
                return
            elif item.custom_id in self._failed:
                plan.answered_failed += 1
                return
            self._add_problem(item)
            plan.to_record += 1
            plan.handle.set(item.line)
        elif item.custom_id in self._answered_ok:
            plan.answered_ok += 1
        elif item.custom_id in self._failed:
            plan.answered_failed += 1
        else:
            plan.to_send += 1
            plan.handle.set(item.line)
            plan.models.add(item.body.get("model") or "")

    def _add_problem(self, item: Invalid) -> None:
        problems = self.problems
        self.problem_count += 1
        if len(problems) < _LISTED_PROBLEMS or item.line < problems[-1].line:
            # Keep the first few by line number (duplicates are decided last).
            bisect.insort(problems, item, key=lambda problem: problem.line)
            del problems[_LISTED_PROBLEMS:]

    def error(self) -> BatchInputError:
        """Return the error that reports the problems (there must be some)."""
        path = self.plan.path
        first = self.problems[0]
        return BatchInputError(
            _problem_message(path, self.problems, self.problem_count),
            path=path,
            line=first.line,
            reason=first.reason,
            custom_id=first.custom_id,
            invalid_lines=self.problem_count,
        )


async def check_input(
    file: IO[bytes],
    path: str,
    answered: AnsweredKeys,
    *,
    default_model: str | None,
    skip_invalid: bool,
    retry_failed: bool,
    unsendable: Mapping[str, str] = _NO_URL_REFUSED,
) -> InputPlan:
    """Run the first pass over the input: check every line, plan the run.

    Args:
        file: the input, open in binary mode.
        path: its name, for messages.
        answered: what OUTPUT already answers (lines found there are not handled again).
        default_model: the model for bodies that name none.
        skip_invalid: plan to record invalid lines as error lines instead of failing.
        retry_failed: plan to handle again the lines OUTPUT answers with an error.
        unsendable: url -> why the client cannot send it (see :func:`parse_line`).

    Raises:
        BatchInputError: some lines are invalid (and not recorded in OUTPUT already), and
            ``skip_invalid`` is false.

    Memory: a 64-bit hash per ``custom_id`` (see ``_keys``) and a bit per line.
    """
    plan = InputPlan(path=path, identity=file_identity(file), unsendable=unsendable)
    planner = _Planner(plan, answered, retry_failed=retry_failed)
    plan_line = planner.add
    seen = HashSet()
    suspects: dict[int, int] = {}
    for number, raw in read_lines(file):
        if number % _LINES_PER_CHECKPOINT == 0:
            await trio.lowlevel.checkpoint()
        plan.total += 1
        item = parse_line(raw, number, default_model=default_model, unsendable=unsendable)
        if item.custom_id is not None and not seen.add(item.custom_id):
            # Maybe a duplicate: decided exactly once the whole file has been read.
            suspects[number] = key_hash(item.custom_id)
            continue
        plan_line(item)
    del seen  # its memory is given back before the run starts
    if suspects:
        plan.duplicates, collided = await _locate_duplicates(
            file, suspects, default_model, unsendable
        )
        for number, (custom_id, first_line) in plan.duplicates.items():
            plan_line(duplicate_line(number, custom_id, first_line))
        for item in collided:
            plan_line(item)
    if planner.problem_count and not skip_invalid:
        raise planner.error()
    return plan
