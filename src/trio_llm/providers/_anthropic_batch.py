"""Anthropic's Message Batches API: ``/v1/messages/batches``.

A batch is created in one request, ``{"requests": [{custom_id, params}, ...]}`` (at most
100,000 requests and 256 MB), polled until ``processing_status`` is ``ended``, and its
results read from ``results_url`` as JSONL: ``{custom_id, result: {type: succeeded |
errored | canceled | expired, ...}}``.

Batches carry no metadata, so a batch whose creation's answer was lost (the process was
killed with the request in flight) is found by what the API does show: the earliest
batch created since the attempt began (else the latest in the margin left for the
clocks, just before it) that holds as many requests as the lost one, and
is not one the job knows already (:meth:`AnthropicBatchAPI.find_created`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, final
from urllib.parse import quote, urlsplit

from .. import _json
from .._errors import APIResponseError
from .._types import Usage
from ._anthropic import AnthropicProvider, _usage
from ._batch_api import (
    CLOCK_SKEW,
    RemoteBatch,
    ResultLine,
    json_reply,
    json_reply_and_wait,
    parse_result,
    stream_lines,
)

if TYPE_CHECKING:
    from .._client import Client

__all__ = ["AnthropicBatchAPI"]

#: Anthropic's limits for one batch: 100,000 requests, 256 MB (for the requests: the rest
#: of the body, a comma per request and 14 bytes, stays within the 1 MB left over).
MAX_LINES: Final = 100_000
MAX_BYTES: Final = 255 * 1000 * 1000

_CUSTOM_ID: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_PAGE: Final = 100
_COUNTS: Final = ("processing", "succeeded", "errored", "canceled", "expired")
_NOT_RUN: Final = {
    "canceled": (
        "batch_cancelled",
        "the batch was cancelled before this request was processed",
    ),
    "expired": (
        "batch_expired",
        "the batch expired (24 hours) before this request was processed",
    ),
}


def _time(value: object) -> float:
    """Read an RFC 3339 time as Unix time (0 if absent or malformed)."""
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _count(counts: object, key: str) -> int:
    value = counts.get(key) if isinstance(counts, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _batch(payload: Mapping[str, Any]) -> RemoteBatch:
    """Read a Message Batch object.

    Raises:
        APIResponseError: it is not one.
    """
    try:
        status = str(payload["processing_status"])
        counts = payload.get("request_counts")
        failed = sum(_count(counts, key) for key in ("errored", "canceled", "expired"))
        ended = status == "ended"
        outcome = None
        if ended:
            outcome = "cancelled" if payload.get("cancel_initiated_at") else "completed"
            if outcome == "completed" and _count(counts, "expired"):
                outcome = "expired"
        url = payload.get("results_url")
        return RemoteBatch(
            id=str(payload["id"]),
            status=status,
            ended=ended,
            outcome=outcome,
            total=sum(_count(counts, key) for key in _COUNTS),
            done=_count(counts, "succeeded") + failed,
            failed=failed,
            created_at=_time(payload.get("created_at")),
            results=(url,) if isinstance(url, str) and url else (),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise APIResponseError(
            f"a message batch from the API has an unexpected shape ({exc!r}): {str(payload)[:200]}",
            status_code=200,
            request_id=None,
        ) from None


_STATUSES: Final = AnthropicProvider()


def _result(record: dict[str, Any]) -> ResultLine:
    """Read one line of a batch's results."""
    custom_id = record["custom_id"]
    result = record["result"]
    kind = result["type"]
    if kind == "succeeded":
        message = result["message"]
        return ResultLine(
            custom_id=custom_id,
            status_code=200,
            body=message,
            usage=Usage.from_json(_usage(message.get("usage"))),
        )
    if kind == "errored":
        error = result.get("error")
        inner = error.get("error") if isinstance(error, Mapping) else None
        request_id = error.get("request_id") if isinstance(error, Mapping) else None
        return ResultLine(
            custom_id=custom_id,
            status_code=_STATUSES.stream_error_status(inner),
            body=error,
            request_id=request_id if isinstance(request_id, str) else None,
        )
    code, message = _NOT_RUN.get(kind, ("batch_error", f"the request ended as {kind!r}"))
    return ResultLine(custom_id=custom_id, error_code=code, error_message=message)


@final
class AnthropicBatchAPI:
    """Anthropic's ``/v1/messages/batches``, for one client (base URL: the API root)."""

    name: Final = "anthropic"
    max_lines: Final = MAX_LINES
    max_bytes: Final = MAX_BYTES
    files: Final = None  # the requests go in the create request itself

    def __init__(self, client: Client) -> None:
        self._client = client
        self._batches = client.base_url + "/v1/messages/batches"

    def check_custom_id(self, custom_id: str) -> str | None:
        """Return why the API refuses ``custom_id`` (1 to 64 of ``a-zA-Z0-9_-``)."""
        if _CUSTOM_ID.fullmatch(custom_id):
            return None
        return (
            f"custom_id {custom_id[:80]!r} is not accepted by Anthropic's Batch API: "
            "1 to 64 characters among a-z, A-Z, 0-9, '_' and '-'"
        )

    def group(self, url: str, model: str) -> tuple[str, str]:
        """Return one key for every line: a batch may mix models."""
        return "/v1/messages", ""

    def line(self, custom_id: str, url: str, body: Mapping[str, Any]) -> bytes:
        """Return one item of the ``requests`` array."""
        return _json.dumps({"custom_id": custom_id, "params": body})

    async def create(
        self, *, file_id: str | None, lines: list[bytes], url: str, metadata: Mapping[str, str]
    ) -> RemoteBatch:
        """``POST /v1/messages/batches`` with every request (no metadata: none is kept)."""
        content = b"".join(_requests_body(lines))  # one copy of the lines, not two
        payload = await self._client._api_call(
            "POST", self._batches, json_reply, content=content, once=True
        )
        return _batch(payload)

    async def find_created(
        self,
        *,
        metadata: Mapping[str, str],
        file_id: str | None,
        count: int,
        since: float,
        known: frozenset[str],
    ) -> RemoteBatch | None:
        """Return the earliest unknown batch of ``count`` requests created since ``since``.

        The listing is newest first; it is read back to a little before ``since`` (the
        clocks may differ). One created before ``since`` (another job's, made just
        before) is taken only if none was created after it: then the latest such.
        """
        found: RemoteBatch | None = None
        after = ""
        while True:
            url = f"{self._batches}?limit={_PAGE}{after}"
            payload = await self._client._api_call("GET", url, json_reply)
            data = payload.get("data")
            items = [_batch(item) for item in data if isinstance(item, Mapping)] if data else []
            for batch in items:
                if batch.created_at < since - CLOCK_SKEW:
                    return found
                ours = batch.total == count and batch.id not in known
                if ours and (found is None or batch.created_at >= since):
                    found = batch  # an earlier one further down the list wins
            if not payload.get("has_more") or not items:
                return found
            after = "&after_id=" + quote(str(payload.get("last_id") or items[-1].id))

    async def retrieve(self, batch_id: str) -> tuple[RemoteBatch, float | None]:
        """``GET /v1/messages/batches/{id}``."""
        url = f"{self._batches}/{quote(batch_id)}"
        payload, retry_after = await self._client._api_call("GET", url, json_reply_and_wait)
        return _batch(payload), retry_after

    async def cancel(self, batch_id: str) -> RemoteBatch:
        """``POST /v1/messages/batches/{id}/cancel``."""
        url = f"{self._batches}/{quote(batch_id)}/cancel"
        return _batch(await self._client._api_call("POST", url, json_reply))

    async def results(self, batch: RemoteBatch, sink: Callable[[ResultLine], None]) -> None:
        """Stream the results of an ended batch from its ``results_url``.

        The URL is followed only on the client's own origin (the request carries the
        API key); any other is replaced by the API's own results path.
        """
        url = f"{self._batches}/{quote(batch.id)}/results"
        if batch.results and _origin(batch.results[0]) == _origin(self._batches):
            url = batch.results[0]
        limit = self._client._requester.max_response_bytes or 1 << 30
        await stream_lines(
            self._client,
            url,
            lambda line: sink(parse_result(line, _result)),
            max_line=limit,
        )


def _requests_body(lines: list[bytes]) -> Iterator[bytes]:
    """Yield the parts of ``{"requests": [...]}`` around the encoded ``lines``."""
    yield b'{"requests":['
    for index, line in enumerate(lines):
        if index:
            yield b","
        yield line
    yield b"]}"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc
