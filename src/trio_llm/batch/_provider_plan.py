"""Lines into batches: what each input line becomes in a provider's batch, and which batch.

:class:`LineEncoder` turns a checked input line into the request a Batch API takes (the
body built by the client's provider adapter, exactly as online mode builds it), and
refuses what the Batch API would refuse (a ``custom_id`` Anthropic does not accept, a
request larger than a batch may hold). :func:`plan_parts` makes one streaming pass over
INPUT and cuts the lines to send into parts: one group per endpoint and model where the
API needs it, at most ``max_lines`` lines and ``max_bytes`` bytes each. A part keeps line
ranges and byte offsets, never the lines: :func:`read_part` and :func:`part_ids` read
them back from INPUT when they are needed, and check that INPUT did not change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Final, final

import trio

from .. import _json
from .._errors import BatchInputError
from ..providers._base import Provider
from ..providers._batch_api import BatchAPI
from ._input import EMBEDDINGS_URL, Bits, InputPlan, Invalid, Request, duplicate_line, parse_line
from ._job import Part

__all__ = ["LineEncoder", "each_id", "plan_parts", "read_part"]

_LINES_PER_CHECKPOINT: Final = 2048


@final
class LineEncoder:
    """Encode checked input lines as one Batch API's requests.

    Args:
        api: the Batch API.
        provider: the client's adapter, which builds each body as ``chat``/``embed`` do.
        max_bytes: the most bytes one batch may hold (a larger request is refused).
    """

    def __init__(self, api: BatchAPI, provider: Provider, *, max_bytes: int) -> None:
        self._api = api
        self._provider = provider
        self.max_bytes = max_bytes

    def encode(
        self, item: Request, default_model: str | None
    ) -> tuple[tuple[str, str], bytes] | Invalid:
        """Return the line's group key and encoded request, or why it cannot be sent."""
        api = self._api
        reason = api.check_custom_id(item.custom_id)
        if reason is not None:
            return Invalid(
                line=item.line, custom_id=item.custom_id, code="invalid_custom_id", reason=reason
            )
        fields = dict(item.body)
        model = fields.pop("model", None) or default_model or ""
        try:
            if item.url == EMBEDDINGS_URL:
                body = self._provider.embeddings_body(fields.pop("input"), model, fields)
            else:
                body = self._provider.chat_body(fields.pop("messages"), model, fields)
        except (TypeError, ValueError) as exc:
            return Invalid(
                line=item.line, custom_id=item.custom_id, code="invalid_body", reason=str(exc)
            )
        line = api.line(item.custom_id, item.url, body)
        if len(line) > self.max_bytes:
            return Invalid(
                line=item.line,
                custom_id=item.custom_id,
                code="request_too_large",
                reason=f"the request is {len(line):,} bytes in a batch, more than a batch "
                f"may hold ({self.max_bytes:,} bytes: --max-batch-bytes)",
            )
        return api.group(item.url, model), line

    def check(self, default_model: str | None) -> Callable[[Request], Invalid | None]:
        """Return a check of valid input lines for ``check_input`` (``line_check``)."""

        def check(item: Request) -> Invalid | None:
            encoded = self.encode(item, default_model)
            return encoded if isinstance(encoded, Invalid) else None

        return check


def _fingerprint() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=8)


def _lines_at(file: IO[bytes], offset: int, first: int) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(line number, offset, bytes)`` of each line from ``offset`` (line ``first``).

    Unlike ``_lines.read_lines`` it starts anywhere and says where each line begins: a
    part's lines are read back from the offsets recorded when it was planned.
    """
    file.seek(offset)
    number = first
    for raw in file:
        yield number, offset, raw
        offset += len(raw)
        number += 1


@final
class _Filling:
    """The part being filled for one group."""

    __slots__ = ("hasher", "last", "part")

    def __init__(self, part: Part) -> None:
        self.part = part
        self.hasher = _fingerprint()
        self.last = 0  # the line number of its latest line

    def add(self, number: int, offset: int, previous: int, custom_id: str, size: int) -> None:
        """Add line ``number``; ``previous`` is the non-blank line before it."""
        part = self.part
        if self.last and self.last == previous:
            part.lines[-1][1] = number  # the line before is ours: the range grows
        else:
            part.lines.append([number, number, offset])
        self.last = number
        part.count += 1
        part.size += size
        self.hasher.update(custom_id.encode() + b"\n")

    def full(self, max_lines: int, max_size: int) -> bool:
        """Whether a line must go to a new part: ``max_lines`` reached, or over ``max_size``."""
        return self.part.count >= max_lines or self.part.size > max_size

    def close(self) -> Part:
        self.part.fingerprint = self.hasher.hexdigest()
        return self.part


async def plan_parts(
    file: IO[bytes],
    plan: InputPlan,
    *,
    skip: Bits,
    encoder: LineEncoder,
    default_model: str | None,
    max_lines: int,
    first_index: int,
    record_invalid: Callable[[Invalid], None],
) -> list[Part]:
    """Cut the lines ``plan`` marks to handle (but not in ``skip``) into parts.

    One streaming pass. Valid lines are grouped (``BatchAPI.group``), in input order, into
    parts of at most ``max_lines`` lines and ``encoder.max_bytes`` bytes; invalid ones
    (marked only with ``skip_invalid``) go to ``record_invalid``.

    Returns:
        The new parts, numbered from ``first_index``, each with its ranges, count, size
        and fingerprint, status ``planned``.
    """
    handle = plan.handle
    fillings: dict[tuple[str, str], _Filling] = {}
    parts: list[Part] = []
    index = first_index
    previous = 0
    for number, offset, raw in _lines_at(file, 0, 1):
        if number % _LINES_PER_CHECKPOINT == 0:
            await trio.lowlevel.checkpoint()
        if raw.isspace():
            continue
        before, previous = previous, number
        if not handle[number] or skip[number]:
            continue
        duplicate = plan.duplicates.get(number)
        item = (
            duplicate_line(number, *duplicate)
            if duplicate is not None
            else parse_line(raw, number, default_model=default_model, unsendable=plan.unsendable)
        )
        encoded = encoder.encode(item, default_model) if isinstance(item, Request) else item
        if isinstance(encoded, Invalid):
            record_invalid(encoded)
            continue
        assert isinstance(item, Request)
        key, line = encoded
        filling = fillings.get(key)
        if filling is None or filling.full(max_lines, encoder.max_bytes - len(line)):
            if filling is not None:
                parts.append(filling.close())
            new = Part(index=index, url=key[0], model=key[1], default_model=default_model)
            filling = fillings[key] = _Filling(new)
            index += 1
        filling.add(number, offset, before, item.custom_id, len(line))
    parts.extend(filling.close() for filling in fillings.values())
    parts.sort(key=lambda part: part.index)
    return parts


def _changed(path: str, part: Part, line: int) -> BatchInputError:
    return BatchInputError(
        f"{path}:{line}: the input changed since its lines went into batch part "
        f"{part.index} (lines {part.lines[0][0]} to {part.lines[-1][1]}); restore it, or "
        "remove the job state (OUT.job.json) to forget the job's batches",
        path=path,
        line=line,
        reason="the input changed under a running job",
    )


async def _each_line(
    file: IO[bytes], path: str, part: Part, read_id: Callable[[int, bytes], str | None]
) -> None:
    """Read ``part``'s lines back from INPUT, in order, through ``read_id``.

    ``read_id(number, raw)`` returns the line's ``custom_id`` (``None``: it no longer
    parses); the ids must be the planned ones, in order (the part's fingerprint).

    Raises:
        BatchInputError: INPUT changed since the part was planned.
    """
    hasher = _fingerprint()
    count = 0
    read = 0
    for first, last, offset in part.lines:
        for number, _, raw in _lines_at(file, offset, first):
            if number > last:
                break
            read += 1
            if read % _LINES_PER_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()
            if raw.isspace():
                continue
            custom_id = read_id(number, raw)
            if custom_id is None:
                raise _changed(path, part, number)
            hasher.update(custom_id.encode() + b"\n")
            count += 1
    if count != part.count or hasher.hexdigest() != part.fingerprint:
        raise _changed(path, part, part.lines[0][0] if part.lines else 1)


async def each_id(file: IO[bytes], path: str, part: Part, on_id: Callable[[str], None]) -> None:
    """Hand the ``custom_id`` of each of ``part``'s lines to ``on_id``, in input order.

    Only the ``custom_id`` is read (the line was checked whole when it was planned).

    Raises:
        BatchInputError: INPUT changed since the part was planned.
    """

    def read_id(number: int, raw: bytes) -> str | None:
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark
            raw = raw[3:]
        try:
            record = _json.loads(raw)
        except ValueError:
            return None
        custom_id = record.get("custom_id") if isinstance(record, dict) else None
        if not isinstance(custom_id, str):
            return None
        on_id(custom_id)
        return custom_id

    await _each_line(file, path, part, read_id)


async def read_part(
    file: IO[bytes], path: str, part: Part, encoder: LineEncoder, unsendable: Mapping[str, str]
) -> list[bytes]:
    """Return ``part``'s requests, encoded as when it was planned.

    Raises:
        BatchInputError: INPUT changed since the part was planned.
    """
    lines: list[bytes] = []
    default_model = part.default_model

    def read_id(number: int, raw: bytes) -> str | None:
        item = parse_line(raw, number, default_model=default_model, unsendable=unsendable)
        if isinstance(item, Invalid):
            return None
        encoded = encoder.encode(item, default_model)
        if isinstance(encoded, Invalid):
            return None
        lines.append(encoded[1])
        return item.custom_id

    await _each_line(file, path, part, read_id)
    return lines
