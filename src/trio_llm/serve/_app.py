"""The gateway's ASGI app: OpenAI-compatible routes in front of one :class:`Client`.

The app runs on Trio (Hypercorn's Trio worker, see ``_runner.py``): streamed replies and
the background log worker use trio directly. Every error the app answers with has the
OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients raise
their usual exceptions.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, final

import attrs
import trio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from .._client import Client
from .._errors import LLMError, StreamError
from ._logs import AccessLog
from ._metrics import RequestCounter, metrics_text
from ._request import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    GatewayError,
    body_params,
    check_model,
    read_json,
    require,
)
from ._tracing import ContinueTrace
from ._upstream import error_body, upstream_error

__all__ = ["DEFAULT_MAX_BODY_BYTES", "MAX_JSON_DEPTH", "GenerationRecord", "create_app"]

# Log records waiting for the background worker; beyond this they are dropped (and
# counted in /metrics) rather than slowing requests down.
_LOG_BUFFER: Final = 1024

logger = logging.getLogger("trio_llm.serve")


@final
@attrs.frozen(kw_only=True)
class GenerationRecord:
    """What the gateway logs, in the background, about each request it sent upstream.

    Attributes:
        route: the gateway route (``"/v1/chat/completions"``, ``"/generate"``, ...).
        model: the model asked for (``""`` if none was named).
        status: the HTTP status the gateway answered with (200 for a stream that started).
        seconds: time from the request's arrival to its last byte.
        prompt_tokens: prompt tokens the upstream reported (0 if unknown).
        completion_tokens: completion tokens the upstream reported (0 if unknown).
        stream: whether the reply was streamed.
        error: the error's message, for failed requests.
    """

    route: str
    model: str
    status: int
    seconds: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stream: bool = False
    error: str | None = None


@final
class _State:
    """What the lifespan owns: the log channel, and counters for /metrics."""

    def __init__(self) -> None:
        self.log_send: trio.MemorySendChannel[GenerationRecord] | None = None
        self.logged = 0
        self.log_dropped = 0
        self.counts: Counter[tuple[str, int]] = Counter()

    def record(self, record: GenerationRecord) -> None:
        """Queue ``record`` for the background worker; never blocks."""
        if self.log_send is None:  # pragma: no cover - routes only run inside the lifespan
            self.log_dropped += 1
            return
        try:
            self.log_send.send_nowait(record)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.log_dropped += 1


def create_app(
    client: Client,
    *,
    require_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_generation: Callable[[GenerationRecord], Awaitable[None]] | None = None,
) -> FastAPI:
    """Return a FastAPI app that serves the OpenAI API in front of ``client``.

    Routes: ``POST /v1/chat/completions`` (JSON, or SSE relayed chunk by chunk with
    ``"stream": true``), ``POST /v1/embeddings``, ``GET /v1/models``, ``POST /generate``
    (``{"prompt"}`` to ``{"generated_text"}``), ``GET /healthz`` and ``GET /metrics``
    (Prometheus text). Every upstream call goes through ``client``, so its concurrency
    cap, rate limit and retry policy hold across all the gateway's callers.

    The app must run on Trio (e.g. :func:`trio_llm.serve.serve`), and ``client`` must stay
    open while it serves. Its lifespan owns a nursery where one worker logs a
    :class:`GenerationRecord` per upstream call (logger ``trio_llm.serve``) and awaits
    ``on_generation``; records queued before shutdown are all handled before the
    lifespan ends. Each request also gets an access line on ``trio_llm.serve.access``.

    A caller that disconnects cancels its upstream call (retries included); it is
    recorded with status 499. With OpenTelemetry configured, a request's ``traceparent``
    header makes the caller's span the parent of its upstream call's.

    Args:
        client: the client every upstream call goes through.
        require_key: if set, every route but ``/healthz`` requires the header
            ``Authorization: Bearer <require_key>`` (401 otherwise; compared in constant
            time).
        max_body_bytes: larger request bodies are refused with 413. JSON nested more
            than ``MAX_JSON_DEPTH`` (100) levels is refused with 400.
        on_generation: an async hook awaited, in the background worker, with each record.
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, not {max_body_bytes!r}")
    gateway = _Gateway(
        client,
        require_key=require_key,
        max_body_bytes=max_body_bytes,
        on_generation=on_generation,
    )
    app = FastAPI(
        title="trio-llm gateway",
        lifespan=gateway.lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        exception_handlers={GatewayError: _gateway_error, StarletteHTTPException: _http_error},
    )
    app.add_middleware(RequestCounter, counts=gateway.state.counts)
    app.add_middleware(AccessLog)  # outermost of the two: its time covers the counting too
    app.add_middleware(ContinueTrace)  # a caller's traceparent: the parent of the calls
    app.add_api_route("/v1/chat/completions", gateway.chat_completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", gateway.embeddings, methods=["POST"])
    app.add_api_route("/generate", gateway.generate, methods=["POST"])
    app.add_api_route("/v1/models", gateway.models, methods=["GET"])
    app.add_api_route("/healthz", gateway.healthz, methods=["GET"])
    app.add_api_route("/metrics", gateway.metrics, methods=["GET"])
    return app


async def _gateway_error(_request: Request, exc: GatewayError) -> Response:
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(
        error_body(exc.message, exc.kind, exc.code), status_code=exc.status, headers=headers
    )


async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind, None), status_code=exc.status_code)


@final
class _Gateway:
    """The app's routes and lifespan, around the client and options they share."""

    def __init__(
        self,
        client: Client,
        *,
        require_key: str | None,
        max_body_bytes: int,
        on_generation: Callable[[GenerationRecord], Awaitable[None]] | None,
    ) -> None:
        self._client = client
        self._expected_key = None if require_key is None else require_key.encode()
        self._max_body_bytes = max_body_bytes
        self._on_generation = on_generation
        self.state = _State()

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        """Run the log worker while the app serves; on the way out, let it finish."""
        state = self.state
        send, receive = trio.open_memory_channel[GenerationRecord](_LOG_BUFFER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._log_worker, receive)
            async with send:
                state.log_send = send
                try:
                    yield
                finally:
                    state.log_send = None
            # The channel is closed: the worker handles what is queued, then returns.

    async def _log_worker(self, receive: trio.MemoryReceiveChannel[GenerationRecord]) -> None:
        on_generation = self._on_generation
        async with receive:
            async for record in receive:
                logger.info(
                    "%s model=%s status=%d seconds=%.3f prompt_tokens=%d completion_tokens=%d%s",
                    record.route,
                    record.model,
                    record.status,
                    record.seconds,
                    record.prompt_tokens,
                    record.completion_tokens,
                    f" error={record.error}" if record.error else "",
                )
                if on_generation is not None:
                    try:
                        await on_generation(record)
                    except Exception:
                        logger.exception("on_generation hook failed")
                self.state.logged += 1

    def _authorize(self, request: Request) -> None:
        expected = self._expected_key
        if expected is None:
            return
        # Starlette decodes headers as latin-1: encoding back gives the bytes sent.
        supplied = request.headers.get("authorization", "").encode("latin-1")
        scheme_ok = supplied[:7].lower() == b"bearer "
        # Constant time, so the answer's timing tells nothing about the key's bytes.
        if not (hmac.compare_digest(supplied[7:].strip(), expected) and scheme_ok):
            raise GatewayError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                code="invalid_api_key",
            )

    async def _call_upstream(
        self,
        request: Request,
        route: str,
        model: str | None,
        call: Callable[[], Awaitable[Any]],
    ) -> Response:
        """Await ``call``, record it, and answer with its ``raw`` (or the error).

        The call races the caller's ``http.disconnect`` (the body is read by now, so
        ``receive`` has nothing else to give): a caller that leaves cancels the call,
        retries and all, and is recorded with status 499.
        """
        started = trio.current_time()
        reply: Any = None
        error: LLMError | None = None
        gone = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, request.receive, nursery.cancel_scope, gone)
            try:
                reply = await call()
            except LLMError as exc:
                error = exc
            nursery.cancel_scope.cancel()
        record = functools.partial(
            GenerationRecord, route=route, model=model or "", seconds=trio.current_time() - started
        )
        if gone.is_set():
            self.state.record(record(status=499, error="client disconnected"))
            return Response(status_code=499)  # nobody reads it; counted in /metrics
        if error is not None:
            status, body, headers = upstream_error(error, upstream=self._client.base_url)
            self.state.record(record(status=status, error=str(error)))
            return JSONResponse(body, status_code=status, headers=headers)
        self.state.record(
            record(
                status=200,
                prompt_tokens=reply.usage.prompt_tokens,
                completion_tokens=reply.usage.completion_tokens,
            )
        )
        if route == "/generate":
            return JSONResponse({"generated_text": reply.text})
        return JSONResponse(reply.raw)

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``: a chat reply, or its SSE stream."""
        self._authorize(request)
        body = await read_json(request, self._max_body_bytes)
        messages = require(
            body, "messages", lambda v: isinstance(v, list) and bool(v), "a non-empty array"
        )
        model = check_model(body)
        stream = body.get("stream") is True
        params = body_params(body, "messages", "model", "stream")
        client = self._client
        if stream:
            return _RelayedStream(client, self.state, messages, model, params)
        return await self._call_upstream(
            request,
            "/v1/chat/completions",
            model,
            lambda: client.chat(messages, model=model, **params),
        )

    async def embeddings(self, request: Request) -> Response:
        """``POST /v1/embeddings``: embeddings of ``input``."""
        self._authorize(request)
        body = await read_json(request, self._max_body_bytes)
        texts = require(
            body,
            "input",
            lambda v: isinstance(v, str) or (isinstance(v, list) and bool(v)),
            "a string or a non-empty array",
        )
        model = check_model(body)
        params = body_params(body, "input", "model")
        client = self._client
        return await self._call_upstream(
            request, "/v1/embeddings", model, lambda: client.embed(texts, model=model, **params)
        )

    async def generate(self, request: Request) -> Response:
        """``POST /generate``: ``{"prompt"}`` in, ``{"generated_text"}`` out."""
        self._authorize(request)
        body = await read_json(request, self._max_body_bytes)
        prompt = require(body, "prompt", lambda v: isinstance(v, str), "a string")
        model = check_model(body)
        params = body_params(body, "prompt", "model", "stream")
        client = self._client
        return await self._call_upstream(
            request, "/generate", model, lambda: client.chat(prompt, model=model, **params)
        )

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the client's default model, if it has one."""
        self._authorize(request)
        data = []
        if self._client.model:
            data.append(
                {"id": self._client.model, "object": "model", "created": 0, "owned_by": "trio-llm"}
            )
        return JSONResponse({"object": "list", "data": data})

    async def healthz(self) -> Response:
        """``GET /healthz``: always ok, and open to all (no key needed)."""
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``: the client's statistics and the gateway's counters."""
        self._authorize(request)
        state = self.state
        text = metrics_text(
            self._client, state.counts, logged=state.logged, dropped=state.log_dropped
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def _cancel_on_disconnect(
    receive: Receive, scope: trio.CancelScope, gone: trio.Event
) -> None:
    """Wait for the client to disconnect; then set ``gone`` and cancel ``scope``."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    scope.cancel()


def _sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


@final
class _RelayedStream(Response):
    """An SSE response that relays an upstream stream as it arrives.

    One task does everything, so the upstream stream's ``async with`` is entered and left
    in the same frame: a failure before the first event becomes an ordinary error response
    with the upstream's status; a client that disconnects cancels the relay, which leaves
    the block and closes the upstream request.
    """

    def __init__(
        self,
        client: Client,
        state: _State,
        messages: list[Any],
        model: str | None,
        params: dict[str, Any],
    ) -> None:
        super().__init__()
        self._client = client
        self._state = state
        self._messages = messages
        self._model = model
        self._params = params

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = trio.current_time()
        record: dict[str, Any] = {"status": 200}
        answered = False

        async def answering_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True  # before sending: Hypercorn may report the disconnect in it
            await send(message)

        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                # Hypercorn reports a disconnect once the reply is complete, too: only one
                # before that is the caller leaving (and a cancel then could cut the end).
                if not answered:
                    record.update(status=499, error="client disconnected")
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            await self._relay(scope, answering_send, record)
            nursery.cancel_scope.cancel()
        self._state.record(
            GenerationRecord(
                route="/v1/chat/completions",
                model=self._model or "",
                seconds=trio.current_time() - started,
                stream=True,
                **record,
            )
        )

    async def _relay(self, scope: Scope, send: Send, record: dict[str, Any]) -> None:
        options = self._params.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        try:
            stream_cm = self._client.stream(self._messages, model=self._model, **self._params)
            async with stream_cm as stream:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no"),
                        ],
                    }
                )
                # Chunks of one event share its raw payload (n > 1): send each event once.
                previous: object = None
                try:
                    async for chunk in stream:
                        if chunk.raw is previous:
                            continue
                        previous = chunk.raw
                        await _send_body(send, _sse(chunk.raw))
                except StreamError as exc:
                    record.update(status=502, error=str(exc))
                    body = exc.error_body if isinstance(exc.error_body, dict) else None
                    if body is None or "error" not in body:
                        # The message names the upstream URL: it stays in the log.
                        message = "the upstream's stream failed after it started"
                        body = error_body(message, "upstream_error", "stream_error")
                    await _send_body(send, _sse(body), more=False)
                    return
                response = stream.response
        except LLMError as exc:
            status, body, headers = upstream_error(exc, upstream=self._client.base_url)
            record.update(status=status, error=str(exc))
            await JSONResponse(body, status_code=status, headers=headers)(scope, _no_receive, send)
            return
        record.update(
            prompt_tokens=response.usage.prompt_tokens,
            completion_tokens=response.usage.completion_tokens,
        )
        if wants_usage:
            head: dict[str, Any] = {
                k: response.raw[k] for k in ("id", "created", "model") if k in response.raw
            }
            usage_chunk: dict[str, Any] = {
                **head,
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": response.raw.get("usage"),
            }
            await _send_body(send, _sse(usage_chunk))
        await _send_body(send, b"data: [DONE]\n\n", more=False)


async def _send_body(send: Send, data: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _no_receive() -> Message:  # pragma: no cover - JSONResponse never receives
    await trio.sleep_forever()
    raise AssertionError("unreachable")
