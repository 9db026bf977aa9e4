"""OpenAI's Batch API: ``/v1/files`` (upload, list, content) and ``/v1/batches``.

A batch is a JSONL file of ``{custom_id, method, url, body}`` lines, all for one ``url``
and one model, uploaded with ``purpose=batch``, then ``POST /batches`` with a 24-hour
completion window. Its results are two files: ``output_file_id`` (the requests that got an
answer of any status: a refusal is a line with ``status_code: 400``) and
``error_file_id`` (the requests that never ran: expired, cancelled, ...).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, final
from urllib.parse import quote

from .. import _json
from .._errors import APIResponseError
from .._types import Usage
from ._batch_api import (
    CLOCK_SKEW,
    JOB_KEY,
    PART_KEY,
    RemoteBatch,
    ResultLine,
    json_reply,
    json_reply_and_wait,
    parse_result,
    stream_lines,
)

if TYPE_CHECKING:
    from .._client import Client

__all__ = ["OpenAIBatchAPI", "multipart_file"]

#: OpenAI's limits for one batch: 50,000 requests, a 200 MB input file.
MAX_LINES: Final = 50_000
MAX_BYTES: Final = 200 * 1000 * 1000

_ENDED: Final = frozenset({"completed", "failed", "expired", "cancelled"})
_PAGE: Final = 100


def multipart_file(
    fields: Mapping[str, str], name: str, lines: list[bytes], *, content_type: str
) -> tuple[str, bytes]:
    """Encode a ``multipart/form-data`` body: ``fields``, then a file called ``name``.

    Returns:
        The request's ``Content-Type`` (with its boundary) and the body. The file's
        parts are joined once, into the body.
    """
    boundary = "trio-llm-" + secrets.token_hex(16)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
    )
    parts.extend(lines)
    parts.append(f"\r\n--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def _count(payload: object, key: str) -> int:
    value = payload.get(key) if isinstance(payload, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _parsed(payload: Mapping[str, Any]) -> RemoteBatch:
    """Read a Batch object.

    Raises:
        APIResponseError: it is not one.
    """
    try:
        return _batch(payload)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise APIResponseError(
            f"a batch from the API has an unexpected shape ({exc!r}): {str(payload)[:200]}",
            status_code=200,
            request_id=None,
        ) from None


def _batch(payload: Mapping[str, Any]) -> RemoteBatch:
    """Read a Batch object."""
    status = str(payload["status"])
    counts = payload.get("request_counts")
    errors = payload.get("errors")
    data = errors.get("data") if isinstance(errors, Mapping) else None
    messages = tuple(
        f"{error.get('code') or 'error'}: {error.get('message') or ''}"
        + (f" (line {error['line']})" if isinstance(error.get("line"), int) else "")
        for error in (data if isinstance(data, list) else ())
        if isinstance(error, Mapping)
    )
    metadata = payload.get("metadata")
    ended = status in _ENDED
    return RemoteBatch(
        id=str(payload["id"]),
        status=status,
        ended=ended,
        outcome=status if ended else None,
        total=_count(counts, "total"),
        done=_count(counts, "completed") + _count(counts, "failed"),
        failed=_count(counts, "failed"),
        created_at=_number(payload.get("created_at")),
        results=tuple(
            str(payload[key])
            for key in ("output_file_id", "error_file_id")
            if isinstance(payload.get(key), str) and payload[key]
        ),
        errors=messages,
        metadata={str(k): str(v) for k, v in metadata.items()}
        if isinstance(metadata, Mapping)
        else {},
        input_file_id=payload.get("input_file_id"),
    )


def _result(record: dict[str, Any]) -> ResultLine:
    """Read one line of an output or error file."""
    custom_id = record["custom_id"]
    response = record.get("response")
    if isinstance(response, Mapping) and isinstance(response.get("status_code"), int):
        body = response.get("body")
        request_id = response.get("request_id")
        usage = body.get("usage") if isinstance(body, Mapping) else None
        return ResultLine(
            custom_id=custom_id,
            status_code=response["status_code"],
            body=body,
            request_id=request_id if isinstance(request_id, str) else None,
            usage=Usage.from_json(usage),
        )
    error = record.get("error")
    if not isinstance(error, Mapping):
        raise ValueError("neither a response nor an error")
    return ResultLine(
        custom_id=custom_id,
        error_code=str(error.get("code") or "batch_error"),
        error_message=str(error.get("message") or "the request did not run"),
    )


@final
class OpenAIBatchAPI:
    """OpenAI's ``/v1/files`` and ``/v1/batches``, for one client."""

    name: Final = "openai"
    max_lines: Final = MAX_LINES
    max_bytes: Final = MAX_BYTES

    def __init__(self, client: Client) -> None:
        self._client = client
        self._base = client.base_url

    @property
    def files(self) -> OpenAIBatchAPI:
        """``/v1/files``: each batch names the file of its lines."""
        return self

    def check_custom_id(self, custom_id: str) -> str | None:
        """Return ``None``: any non-empty string is a ``custom_id`` here."""
        return None

    def group(self, url: str, model: str) -> tuple[str, str]:
        """Return ``(url, model)``: a batch file holds one endpoint and one model."""
        return url, model

    def line(self, custom_id: str, url: str, body: Mapping[str, Any]) -> bytes:
        """Return the JSONL line of one request."""
        record = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
        return _json.dumps(record) + b"\n"

    async def upload(self, name: str, lines: list[bytes]) -> str:
        """``POST /files`` (multipart, ``purpose=batch``); return the file's id."""
        content_type, content = multipart_file(
            {"purpose": "batch"}, name, lines, content_type="application/jsonl"
        )
        payload = await self._client._api_call(
            "POST",
            self._base + "/files",
            json_reply,
            content=content,
            content_type=content_type,
            no_deadline=True,
        )
        file_id = payload.get("id")
        if not isinstance(file_id, str) or not file_id:
            raise APIResponseError(
                f"the upload's reply names no file id: {str(payload)[:200]}",
                status_code=200,
                request_id=None,
            )
        return file_id

    async def _search(
        self, path: str, query: str, since: float, match: Callable[[Mapping[str, Any]], bool]
    ) -> Mapping[str, Any] | None:
        """Return the newest object of a list endpoint that ``match`` es, if any.

        Pages back (newest first) to the objects created before ``since``, less a margin
        for the difference between the clocks.
        """
        after = ""
        while True:
            url = f"{self._base}{path}?limit={_PAGE}{query}{after}"
            payload = await self._client._api_call("GET", url, json_reply)
            data = payload.get("data")
            items = [item for item in data if isinstance(item, Mapping)] if data else []
            for item in items:
                if _number(item.get("created_at")) < since - CLOCK_SKEW:
                    return None
                if match(item):
                    return item
            if not payload.get("has_more") or not items:
                return None
            after = "&after=" + quote(str(payload.get("last_id") or items[-1].get("id")))

    async def find_upload(self, name: str, size: int, since: float) -> str | None:
        """Look through the batch files uploaded since ``since`` for ``name``."""
        found = await self._search(
            "/files",
            "&purpose=batch&order=desc",
            since,
            lambda item: item.get("filename") == name and item.get("bytes") == size,
        )
        return None if found is None else str(found.get("id"))

    async def create(
        self, *, file_id: str | None, lines: list[bytes], url: str, metadata: Mapping[str, str]
    ) -> RemoteBatch:
        """``POST /batches`` for the uploaded file, with a 24-hour window."""
        body = {
            "input_file_id": file_id,
            "endpoint": url,
            "completion_window": "24h",
            "metadata": dict(metadata),
        }
        payload = await self._client._api_call(
            "POST", self._base + "/batches", json_reply, content=_json.dumps(body), once=True
        )
        return _parsed(payload)

    async def find_created(
        self,
        *,
        metadata: Mapping[str, str],
        file_id: str | None,
        count: int,
        since: float,
        known: frozenset[str],
    ) -> RemoteBatch | None:
        """Look through the batches created since ``since`` for this job's part."""
        wanted = {JOB_KEY: metadata.get(JOB_KEY), PART_KEY: metadata.get(PART_KEY)}

        def ours(item: Mapping[str, Any]) -> bool:
            tags = item.get("metadata")
            if isinstance(tags, Mapping) and all(tags.get(k) == v for k, v in wanted.items()):
                return True
            return file_id is not None and item.get("input_file_id") == file_id

        found = await self._search("/batches", "", since, ours)
        return None if found is None else _parsed(found)

    async def retrieve(self, batch_id: str) -> tuple[RemoteBatch, float | None]:
        """``GET /batches/{id}``."""
        url = f"{self._base}/batches/{quote(batch_id)}"
        payload, retry_after = await self._client._api_call("GET", url, json_reply_and_wait)
        return _parsed(payload), retry_after

    async def cancel(self, batch_id: str) -> RemoteBatch:
        """``POST /batches/{id}/cancel``."""
        return await self._call("POST", f"/batches/{quote(batch_id)}/cancel", b"")

    async def results(self, batch: RemoteBatch, sink: Callable[[ResultLine], None]) -> None:
        """Read the output file, then the error file, of an ended batch."""
        limit = self._client._requester.max_response_bytes or 1 << 30
        for file_id in batch.results:
            await stream_lines(
                self._client,
                f"{self._base}/files/{quote(file_id)}/content",
                lambda line: sink(parse_result(line, _result)),
                max_line=limit,
            )

    async def _call(self, method: str, path: str, content: bytes) -> RemoteBatch:
        payload = await self._client._api_call(
            method, self._base + path, json_reply, content=content
        )
        return _parsed(payload)
