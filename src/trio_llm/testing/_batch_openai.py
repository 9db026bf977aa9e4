"""OpenAI's Files and Batch APIs on the fake server: upload, batches, their processing.

``POST /v1/files`` (multipart: ``file``, ``purpose``), ``GET /v1/files``,
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``; ``POST /v1/batches``,
``GET /v1/batches`` (newest first, ``limit``/``after``), ``GET /v1/batches/{id}``,
``POST /v1/batches/{id}/cancel``. A batch is validated, then its lines are answered by the
same code as ``POST /v1/chat/completions`` and ``/v1/embeddings`` (``App.answer_line``);
answers go to the output file, refusals (non-200) and expired or cancelled lines to the
error file, as the real API does.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._batch_store import (
    BATCHES,
    CHUNK_LINES,
    FILES,
    BatchRequest,
    StoredFile,
    count_lines,
    iter_lines,
    line_fate,
    new_id,
    parse_multipart,
    sleep_unless,
)
from ._types import BadRequest

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._app import App, Reply
    from ._config import FakeLLMConfig

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
# Endpoints the real API takes and the fake server does not answer.
_OTHER_ENDPOINTS = (
    "/v1/responses",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
)
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_LINES = 50_000
MAX_INPUT_BYTES = 200 * 1024 * 1024
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
# A failed batch reports at most this many line errors.
MAX_REPORTED_ERRORS = 100
COMPLETION_WINDOW_SECONDS = 24 * 3600
_TIMES = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


@attrs.define
class OpenAIBatch:
    """One OpenAI batch: its fields and counters (the lines stay in the input file)."""

    id: str
    endpoint: str
    input_file_id: str
    metadata: dict[str, str] | None
    created_at: int
    config: FakeLLMConfig
    status: str = "validating"
    times: dict[str, int | None] = attrs.Factory(lambda: dict.fromkeys(_TIMES))
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    model: str | None = None
    total: int = 0
    polls: int = 0
    completed: int = 0
    failed: int = 0
    cancel: trio.Event = attrs.Factory(trio.Event)

    def to_json(self) -> dict[str, Any]:
        """Render the batch object."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + COMPLETION_WINDOW_SECONDS,
            **self.times,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


def _check_metadata(metadata: object) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise BadRequest("Invalid type for 'metadata': expected an object.", "metadata")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise BadRequest(
            f"Invalid 'metadata': too many properties. Expected an object with at most "
            f"{MAX_METADATA_PAIRS} properties, but got {len(metadata)} instead.",
            "metadata",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise BadRequest(
                f"Invalid 'metadata': key {key[:20]!r}... is longer than "
                f"{MAX_METADATA_KEY} characters.",
                "metadata",
            )
        if not isinstance(value, str):
            raise BadRequest(
                f"Invalid type for 'metadata.{key}': expected a string, but got "
                f"{type(value).__name__} instead.",
                f"metadata.{key}",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise BadRequest(
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                f"length {MAX_METADATA_VALUE}, but got a string with length {len(value)}.",
                f"metadata.{key}",
            )
    return metadata


def _line_error(code: str, message: str, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def validate_input(data: bytes, endpoint: str) -> tuple[int, str | None, list[dict[str, Any]]]:
    """Check a batch input file; return its line count, its model, and the errors found."""
    if len(data) > MAX_INPUT_BYTES:
        message = f"The input file is larger than {MAX_INPUT_BYTES} bytes."
        return 0, None, [_line_error("file_too_large", message, None)]
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    total = 0
    for number, line in iter_lines(data):
        total += 1
        problem = _check_line(line, endpoint, seen)
        if isinstance(problem, tuple):
            errors.append(_line_error(*problem, number))
            continue
        if problem is None:
            continue  # no model: the line itself gets a 400 answer
        if model is None:
            model = problem
        elif problem != model:
            message = (
                f"The model {problem!r} does not match the batch's model {model!r}: "
                "a batch may only use one model."
            )
            errors.append(_line_error("mismatched_model", message, number))
    if total == 0:
        errors.append(_line_error("empty_file", "The input file has no requests.", None))
    elif total > MAX_LINES:
        message = f"A batch may have at most {MAX_LINES} requests; this file has {total}."
        errors.append(_line_error("too_many_requests", message, None))
    return total, model, errors[:MAX_REPORTED_ERRORS]


def _check_line(line: bytes, endpoint: str, seen: set[str]) -> tuple[str, str] | str | None:
    """Return a line's model (None when absent), or (code, message) when it is invalid."""
    try:
        record = json.loads(line)
    except ValueError:
        return "invalid_json_line", "This line is not parseable as valid JSON."
    if not isinstance(record, dict):
        return "invalid_json_line", "This line is not a JSON object."
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_custom_id", "Each request must have a string 'custom_id'."
    if custom_id in seen:
        return "duplicate_custom_id", (
            "The custom_id for this request is a duplicate of another request. The custom_id "
            "parameter must be unique for each individual request in a batch."
        )
    seen.add(custom_id)
    if record.get("method") != "POST":
        return "invalid_method", "The 'method' of each request must be 'POST'."
    if record.get("url") != endpoint:
        return "mismatched_url", (
            f"The url {record.get('url')!r} does not match the batch's endpoint {endpoint!r}."
        )
    body = record.get("body")
    if not isinstance(body, dict):
        return "invalid_body", "The 'body' of each request must be a JSON object."
    model = body.get("model")
    return model if isinstance(model, str) else None


class OpenAIBatches:
    """The Files and Batch API routes of one fake server."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._store = app.batches

    def handle(self, config: FakeLLMConfig, route: str, request: BatchRequest) -> Reply:
        """Answer one request to a Files or Batch API route.

        Raises:
            BadRequest: The request is invalid (it becomes an error reply).
        """
        post = request.method == b"POST"
        if route == FILES:
            return self._upload(config, request) if post else self._list_files(config, request)
        if route == BATCHES:
            return self._create(config, request) if post else self._list(config, request)
        if route.startswith(FILES):
            stored = self._file(request.object_id)
            if route.endswith("/content"):
                reply = self._app.ok(config, stored.data)
                reply.headers[0] = (b"content-type", b"application/octet-stream")
                return reply
            return self._json(config, stored.to_json())
        batch = self._batch(request.object_id)
        if route.endswith("/cancel"):
            self._cancel(batch)
        else:
            batch.polls += 1
            throttled = self._app.throttle(config, batch.polls, anthropic=False)
            if throttled is not None:
                return throttled
        return self._json(config, batch.to_json())

    def _json(self, config: FakeLLMConfig, payload: object) -> Reply:
        return self._app.ok(config, json.dumps(payload, separators=(",", ":")).encode())

    def _file(self, file_id: str) -> StoredFile:
        stored = self._store.files.get(file_id)
        if stored is None:
            raise BadRequest(f"No such File object: {file_id}", "id", status=404)
        return stored

    def _batch(self, batch_id: str) -> OpenAIBatch:
        batch = self._store.batches.get(batch_id)
        if batch is None:
            raise BadRequest(f"No batch found with id '{batch_id}'.", "batch_id", status=404)
        assert isinstance(batch, OpenAIBatch)
        return batch

    def _upload(self, config: FakeLLMConfig, request: BatchRequest) -> Reply:
        parts = parse_multipart(request.header(b"content-type"), request.body)
        if "purpose" not in parts:
            raise BadRequest("Missing required parameter: 'purpose'.", "purpose")
        purpose = parts["purpose"][1].decode("utf-8", "replace")
        if purpose not in FILE_PURPOSES:
            raise BadRequest(
                f"Invalid value for 'purpose': {purpose!r}. Supported values are: "
                + ", ".join(repr(name) for name in FILE_PURPOSES)
                + ".",
                "purpose",
            )
        if "file" not in parts:
            raise BadRequest("Missing required parameter: 'file'.", "file")
        filename, data = parts["file"]
        filename = filename or "file"
        if purpose == "batch" and not filename.endswith(".jsonl"):
            raise BadRequest(
                f"Invalid file format for Batch API. Must be .jsonl (got {filename!r}).", "file"
            )
        stored = self._store.add_file(data, filename, purpose)
        self._app.stats.files_uploaded += 1
        return self._json(config, stored.to_json())

    def _list_files(self, config: FakeLLMConfig, request: BatchRequest) -> Reply:
        purpose = request.query("purpose")
        ids = [
            file_id
            for file_id, stored in reversed(self._store.files.items())
            if purpose is None or stored.purpose == purpose
        ]
        limit = _limit(request.query("limit"), default=10_000, most=10_000)
        page = _after(ids, request.query("after"), limit)
        data = [self._store.files[file_id].to_json() for file_id in page]
        return self._json(config, _page(data, limit))

    def _list(self, config: FakeLLMConfig, request: BatchRequest) -> Reply:
        limit = _limit(request.query("limit"), default=20, most=100)
        page = _after(list(reversed(self._store.batches)), request.query("after"), limit)
        data = [self._store.batches[batch_id].to_json() for batch_id in page]
        return self._json(config, _page(data, limit))

    def _create(self, config: FakeLLMConfig, request: BatchRequest) -> Reply:
        from ._app import parse_json_object

        payload = parse_json_object(request.body)
        file_id = payload.get("input_file_id")
        if not isinstance(file_id, str):
            raise BadRequest("Missing required parameter: 'input_file_id'.", "input_file_id")
        endpoint = payload.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            served = " and ".join(BATCH_ENDPOINTS)
            hint = " (the fake server answers only " + served + ")"
            raise BadRequest(
                f"Invalid value for 'endpoint': {endpoint!r}."
                + (hint if endpoint in _OTHER_ENDPOINTS else f" Supported: {served}."),
                "endpoint",
            )
        if payload.get("completion_window") != "24h":
            raise BadRequest(
                f"Invalid value for 'completion_window': {payload.get('completion_window')!r}. "
                "Supported values are: '24h'.",
                "completion_window",
            )
        metadata = _check_metadata(payload.get("metadata"))
        stored = self._file(file_id)
        if stored.purpose != "batch":
            raise BadRequest(
                f"The file {file_id} has purpose {stored.purpose!r}; a batch needs 'batch'.",
                "input_file_id",
            )
        batch = OpenAIBatch(
            id=new_id("batch_"),
            endpoint=endpoint,
            input_file_id=file_id,
            metadata=metadata,
            created_at=int(self._store.epoch()),
            config=config,
        )
        self._store.batches[batch.id] = batch
        created = self._app.stats.batches_created
        created[BATCHES] = created.get(BATCHES, 0) + 1
        fate = _batch_fate(config, self._app.draw)
        self._store.start(self._run, batch, stored.data, fate)
        return self._json(config, batch.to_json())

    def _cancel(self, batch: OpenAIBatch) -> None:
        if batch.status in ("validating", "in_progress", "finalizing"):
            batch.status = "cancelling"
            batch.times["cancelling_at"] = int(self._store.epoch())
            batch.cancel.set()
        elif batch.status != "cancelling":
            raise BadRequest(
                f"Cannot cancel a batch with status '{batch.status}'.", "batch_id", status=409
            )

    def _stamp(self, batch: OpenAIBatch, status: str) -> None:
        batch.status = status
        batch.times[status + "_at"] = int(self._store.epoch())

    async def _run(self, batch: OpenAIBatch, data: bytes, fate: str) -> None:
        """Act out a batch: validate, answer the lines in chunks, finalize."""
        config = batch.config
        phase = config.batch_delay / 10
        await sleep_unless(batch.cancel, phase)
        if not batch.cancel.is_set():
            batch.total, batch.model, errors = validate_input(data, batch.endpoint)
            if fate == "fail" and not errors:
                message = "Injected failure: the batch failed validation."
                errors = [_line_error("invalid_request", message, None)]
            if errors:
                batch.errors = errors
                self._stamp(batch, "failed")
                return
            self._stamp(batch, "in_progress")
        else:
            batch.total = count_lines(data)
        output: list[bytes] = []
        refused: list[bytes] = []
        lines = iter_lines(data)
        if fate != "expire" and not batch.cancel.is_set():
            await self._answer_lines(batch, lines, output, refused, 8 * phase)
        elif not batch.cancel.is_set():
            await sleep_unless(batch.cancel, 8 * phase)
        cancelled = batch.cancel.is_set()
        code, message = (
            ("batch_cancelled", CANCELLED_MESSAGE)
            if cancelled
            else ("batch_expired", EXPIRED_MESSAGE)
        )
        for _, line in lines:
            refused.append(_unanswered(json.loads(line).get("custom_id"), code, message))
        self._app.stats.batch_lines += batch.total
        if not cancelled:
            self._stamp(batch, "finalizing")
        await trio.sleep(phase)
        if output:
            batch.output_file_id = self._store.add_file(
                b"".join(output), f"{batch.id}_output.jsonl", "batch_output"
            ).id
        if refused:
            batch.error_file_id = self._store.add_file(
                b"".join(refused), f"{batch.id}_error.jsonl", "batch_output"
            ).id
        if cancelled:
            self._stamp(batch, "cancelled")
        elif batch.completed + batch.failed < batch.total:
            self._stamp(batch, "expired")
        else:
            self._stamp(batch, "completed")

    async def _answer_lines(
        self,
        batch: OpenAIBatch,
        lines: Iterable[tuple[int, bytes]],
        output: list[bytes],
        refused: list[bytes],
        duration: float,
    ) -> None:
        """Answer lines in chunks spread over ``duration``; stop early on a cancel.

        Lines drawn to expire are answered at the end as expired (not left in ``lines``).
        """
        config = batch.config
        chunks = max(1, math.ceil(batch.total / CHUNK_LINES))
        pause = duration / chunks
        expired: list[bytes] = []
        chunk = 0
        for _, line in lines:
            record = json.loads(line)
            custom_id = record["custom_id"]
            fate = line_fate(config, custom_id, self._app.draw)
            if fate.expired:
                expired.append(_unanswered(custom_id, "batch_expired", EXPIRED_MESSAGE))
            else:
                if fate.error:
                    message = "Injected error: the model refused this request."
                    status, body = 400, self._app.error_body(400, message, None, False)
                else:
                    status, body = self._app.answer_line(
                        batch.endpoint,
                        record["body"],
                        config.seed,
                        config.invalid_structured_replies,
                    )
                if status == 200:
                    batch.completed += 1
                    output.append(_answered(custom_id, status, body))
                else:
                    batch.failed += 1
                    refused.append(_answered(custom_id, status, body))
            chunk += 1
            if chunk == CHUNK_LINES:
                chunk = 0
                await sleep_unless(batch.cancel, pause)
                if batch.cancel.is_set():
                    break
        else:
            await sleep_unless(batch.cancel, pause if chunk else 0)
        refused.extend(expired)


def _batch_fate(config: FakeLLMConfig, draw: Any) -> str:
    """Draw a whole batch's fate: ``"fail"``, ``"expire"`` or ``"run"``."""
    if config.batch_fail_rate and draw() < config.batch_fail_rate:
        return "fail"
    if config.batch_expire_rate and draw() < config.batch_expire_rate:
        return "expire"
    return "run"


def _answered(custom_id: str, status: int, body: bytes) -> bytes:
    request_id = "req_" + os.urandom(16).hex()
    return (
        b'{"id":"batch_req_' + os.urandom(12).hex().encode()
        + b'","custom_id":' + json.dumps(custom_id).encode()
        + b',"response":{"status_code":' + str(status).encode()
        + b',"request_id":"' + request_id.encode() + b'","body":' + body
        + b'},"error":null}\n'
    )  # fmt: skip


def _unanswered(custom_id: object, code: str, message: str) -> bytes:
    line = {
        "id": "batch_req_" + os.urandom(12).hex(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def _limit(raw: str | None, *, default: int, most: int) -> int:
    if raw is None:
        return default
    limit = int(raw) if raw.isdigit() else 0
    if not 1 <= limit <= most:
        raise BadRequest(
            f"Invalid 'limit': {raw!r}. Expected an integer from 1 to {most}.", "limit"
        )
    return limit


def _after(ids: list[str], after: str | None, limit: int) -> list[str]:
    """Return up to ``limit + 1`` ids following ``after`` (from the start when None)."""
    if after is not None:
        ids = ids[ids.index(after) + 1 :] if after in ids else []
    return ids[: limit + 1]


def _page(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """Render one page of a list (``data`` may hold one more item than the page)."""
    page = data[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(data) > limit,
    }
