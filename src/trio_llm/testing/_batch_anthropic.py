"""Anthropic's Message Batches API on the fake server.

``POST /v1/messages/batches`` (``requests: [{custom_id, params}]``),
``GET /v1/messages/batches`` (newest first; ``limit``, ``after_id``, ``before_id``),
``GET /v1/messages/batches/{id}``, ``GET /v1/messages/batches/{id}/results`` (JSONL, once
ended; the batch's ``results_url`` points there) and ``POST /v1/messages/batches/{id}/cancel``.
Each request's ``params`` is answered by the same code as ``POST /v1/messages``
(``App.answer_line``). The requests are kept as one JSONL blob, the results as another.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._batch_store import (
    CHUNK_LINES,
    MESSAGE_BATCHES,
    iter_lines,
    line_fate,
    new_id,
    rfc3339,
    sleep_unless,
)
from ._types import BadRequest

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._app import App, Reply
    from ._batch_store import BatchRequest
    from ._config import FakeLLMConfig

MESSAGES = "/v1/messages"
MAX_REQUESTS = 100_000
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_WINDOW_SECONDS = 24 * 3600
_RESULT_TYPES = ("succeeded", "errored", "canceled", "expired")


@attrs.define
class MessageBatch:
    """One message batch: its fields and counters (requests and results are blobs)."""

    id: str
    created_at: float
    total: int
    config: FakeLLMConfig
    processing_status: str = "in_progress"
    polls: int = 0
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    counts: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(_RESULT_TYPES, 0))
    results: bytes | None = None
    cancel: trio.Event = attrs.Factory(trio.Event)

    def to_json(self, root_url: str) -> dict[str, Any]:
        """Render the message batch object."""
        ended = self.processing_status == "ended"
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.processing_status,
            "request_counts": {
                "processing": 0 if ended else self.total,
                **(self.counts if ended else dict.fromkeys(_RESULT_TYPES, 0)),
            },
            "ended_at": rfc3339(self.ended_at),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.created_at + _WINDOW_SECONDS),
            "archived_at": None,
            "cancel_initiated_at": rfc3339(self.cancel_initiated_at),
            "results_url": f"{root_url}{MESSAGE_BATCHES}/{self.id}/results" if ended else None,
        }


def encode_requests(payload: dict[str, Any]) -> bytes:
    """Check a create body's ``requests`` and return them as one JSONL blob.

    Raises:
        BadRequest: ``requests`` is missing, empty, too long, or an item is invalid.
    """
    requests = payload.get("requests")
    if not isinstance(requests, list) or not requests:
        raise BadRequest("requests: a non-empty array of requests is required.", "requests")
    if len(requests) > MAX_REQUESTS:
        raise BadRequest(
            f"requests: a batch may have at most {MAX_REQUESTS} requests, got {len(requests)}.",
            "requests",
        )
    seen: set[str] = set()
    lines = []
    for position, item in enumerate(requests):
        where = f"requests.{position}"
        if not isinstance(item, dict):
            raise BadRequest(f"{where}: an object with custom_id and params is required.", where)
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            raise BadRequest(
                f"{where}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'.",
                f"{where}.custom_id",
            )
        if custom_id in seen:
            raise BadRequest(
                f"{where}.custom_id: duplicate custom_id {custom_id!r}; each request in a "
                "batch must have a unique custom_id.",
                f"{where}.custom_id",
            )
        seen.add(custom_id)
        if not isinstance(item.get("params"), dict):
            raise BadRequest(f"{where}.params: an object is required.", f"{where}.params")
        lines.append(json.dumps(item, separators=(",", ":")).encode())
    return b"\n".join(lines)


class AnthropicBatches:
    """The Message Batches routes of one fake server."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._store = app.batches

    def handle(self, config: FakeLLMConfig, route: str, request: BatchRequest) -> Reply:
        """Answer one request to a Message Batches route.

        Raises:
            BadRequest: The request is invalid (it becomes an error reply).
        """
        if route == MESSAGE_BATCHES:
            if request.method == b"POST":
                return self._create(config, request)
            return self._list(config, request)
        batch = self._batch(request.object_id)
        if route.endswith("/results"):
            if batch.results is None:
                raise BadRequest(
                    f"Message batch {batch.id} has not ended yet; its results are not available.",
                    status=404,
                )
            reply = self._app.ok(config, batch.results)
            reply.headers[0] = (b"content-type", b"application/binary")
            return reply
        if route.endswith("/cancel"):
            self._cancel(batch)
        else:
            batch.polls += 1
            throttled = self._app.throttle(config, batch.polls, anthropic=True)
            if throttled is not None:
                return throttled
        return self._json(config, batch.to_json(self._app.root_url))

    def _json(self, config: FakeLLMConfig, payload: object) -> Reply:
        reply = self._app.ok(config, json.dumps(payload, separators=(",", ":")).encode())
        reply.headers.append((b"request-id", reply.headers[1][1]))
        return reply

    def _batch(self, batch_id: str) -> MessageBatch:
        batch = self._store.message_batches.get(batch_id)
        if batch is None:
            raise BadRequest(f"Message batch {batch_id!r} not found.", status=404)
        assert isinstance(batch, MessageBatch)
        return batch

    def _create(self, config: FakeLLMConfig, request: BatchRequest) -> Reply:
        from ._app import parse_json_object

        blob = encode_requests(parse_json_object(request.body))
        batch = MessageBatch(
            id=new_id("msgbatch_"),
            created_at=self._store.epoch(),
            total=blob.count(b"\n") + 1,
            config=config,
        )
        self._store.message_batches[batch.id] = batch
        created = self._app.stats.batches_created
        created[MESSAGE_BATCHES] = created.get(MESSAGE_BATCHES, 0) + 1
        fate = "run"
        if config.batch_fail_rate and self._app.draw() < config.batch_fail_rate:
            fate = "fail"
        elif config.batch_expire_rate and self._app.draw() < config.batch_expire_rate:
            fate = "expire"
        self._store.start(self._run, batch, blob, fate)
        return self._json(config, batch.to_json(self._app.root_url))

    def _list(self, config: FakeLLMConfig, request: BatchRequest) -> Reply:
        raw = request.query("limit")
        limit = int(raw) if raw is not None and raw.isdigit() else (20 if raw is None else 0)
        if not 1 <= limit <= 1000:
            raise BadRequest(f"limit: an integer from 1 to 1000 is expected, got {raw!r}.")
        ids = list(reversed(self._store.message_batches))
        after, before = request.query("after_id"), request.query("before_id")
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
            ids = ids[: limit + 1]
        elif before is not None:
            ids = ids[: ids.index(before)] if before in ids else []
            ids = ids[-(limit + 1) :]
        else:
            ids = ids[: limit + 1]
        more = len(ids) > limit
        ids = (ids[1:] if before is not None and after is None else ids[:limit]) if more else ids
        data = [self._store.message_batches[i].to_json(self._app.root_url) for i in ids]
        return self._json(
            config,
            {
                "data": data,
                "has_more": more,
                "first_id": ids[0] if ids else None,
                "last_id": ids[-1] if ids else None,
            },
        )

    def _cancel(self, batch: MessageBatch) -> None:
        if batch.processing_status == "in_progress":
            batch.processing_status = "canceling"
            batch.cancel_initiated_at = self._store.epoch()
            batch.cancel.set()
        elif batch.processing_status == "ended":
            raise BadRequest(
                f"Message batch {batch.id} has already ended and cannot be canceled.",
                status=409,
            )

    async def _run(self, batch: MessageBatch, blob: bytes, fate: str) -> None:
        """Act out a batch: answer the requests in chunks, then end."""
        config = batch.config
        phase = config.batch_delay / 10
        results: list[bytes] = []
        lines = iter_lines(blob)
        if fate == "run":
            await self._answer_lines(batch, lines, results, 9 * phase)
        else:
            await sleep_unless(batch.cancel, 9 * phase)
        kind = "canceled" if batch.cancel.is_set() else {"expire": "expired"}.get(fate, fate)
        for _, line in lines:
            custom_id = json.loads(line)["custom_id"]
            if kind == "fail":
                message = "Injected failure: the batch failed."
                error = self._app.error_body(400, message, None, True)
                results.append(_result(batch, custom_id, "errored", b'"error":' + error))
            else:
                results.append(_result(batch, custom_id, kind, b""))
        self._app.stats.batch_lines += batch.total
        await trio.sleep(phase)
        batch.results = b"".join(results)
        batch.processing_status = "ended"
        batch.ended_at = self._store.epoch()

    async def _answer_lines(
        self,
        batch: MessageBatch,
        lines: Iterable[tuple[int, bytes]],
        results: list[bytes],
        duration: float,
    ) -> None:
        """Answer requests in chunks spread over ``duration``; stop early on a cancel."""
        config = batch.config
        pause = duration / max(1, math.ceil(batch.total / CHUNK_LINES))
        chunk = 0
        for _, line in lines:
            item = json.loads(line)
            custom_id = item["custom_id"]
            fate = line_fate(config, custom_id, self._app.draw)
            if fate.expired:
                results.append(_result(batch, custom_id, "expired", b""))
            else:
                if fate.error:
                    message = "Injected error: the model refused this request."
                    status, body = 400, self._app.error_body(400, message, None, True)
                else:
                    status, body = self._app.answer_line(
                        MESSAGES, item["params"], config.seed, config.invalid_structured_replies
                    )
                if status == 200:
                    results.append(_result(batch, custom_id, "succeeded", b'"message":' + body))
                else:
                    results.append(_result(batch, custom_id, "errored", b'"error":' + body))
            chunk += 1
            if chunk == CHUNK_LINES:
                chunk = 0
                await sleep_unless(batch.cancel, pause)
                if batch.cancel.is_set():
                    return
        await sleep_unless(batch.cancel, pause if chunk else 0)


def _result(batch: MessageBatch, custom_id: str, kind: str, rest: bytes) -> bytes:
    """Render one results line and count it."""
    batch.counts[kind] += 1
    head = b'{"custom_id":' + json.dumps(custom_id).encode() + b',"result":{"type":"'
    return head + kind.encode() + (b'",' + rest if rest else b'"') + b"}}\n"
