"""Request handling of the fake server, free of I/O: route, authenticate, limit, inject faults.

``App.handle`` turns one complete HTTP request into a ``Reply``: the status, headers and
body (or SSE events) to send, the waits before them, and the fault to act out. The
connection code in ``_server.py`` does the sending and the waiting.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import random
import time
from functools import lru_cache
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import attrs
import trio

from . import _anthropic, _openai
from ._batch_anthropic import AnthropicBatches
from ._batch_openai import OpenAIBatches
from ._batch_store import (
    BATCH_ROUTES,
    FILES,
    MESSAGE_BATCHES,
    BatchRequest,
    BatchStore,
    RouteHold,
    match_batch_route,
)
from ._limits import Admission, RateLimits, go_duration
from ._types import BadRequest, Generation

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._config import FakeLLMConfig
    from ._server import FakeLLMServer
    from ._stats import FakeLLMStats

Headers = list[tuple[bytes, bytes]]

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
MODELS = "/v1/models"
MESSAGES = "/v1/messages"
OTHER = "other"
_METHODS = {CHAT: b"POST", EMBEDDINGS: b"POST", MODELS: b"GET", MESSAGES: b"POST"}
_JSON = b"application/json"
_EVENT_STREAM = b"text/event-stream; charset=utf-8"
_INJECTED_RETRY_AFTER = 1
MAX_BODY = 32 * 1024 * 1024
# File uploads (OpenAI: 512 MB a file) and message batches (Anthropic: 256 MB a batch).
_BATCH_BODY = 512 * 1024 * 1024
# Bodies up to this size are parsed and answered once, then served from a cache.
_CACHED_BODY_SIZE = 16 * 1024


class Reply:
    """What to send for one request, and how.

    Attributes:
        status: The HTTP status.
        headers: Response headers, without framing headers (``content-length``).
        body: The JSON body (``events`` is None).
        events: SSE events, each with the pause (seconds) before it.
        latency: Seconds to wait before the first byte.
        generation: Seconds of generation after the latency, before a JSON body.
        fault: What the server did on purpose, for the log: ``"error"``, ``"rate_limited"``,
            ``"stall"`` or ``"disconnect"``.
        stall: Never answer.
        disconnect: Cut the response off halfway and close the connection.
        hold: Wait for this hold's release before answering (``FakeLLMServer.hold``).
        prompt_tokens: Prompt tokens to count once the response is completely sent.
        completion_tokens: Completion tokens to count once the response is completely sent.
    """

    __slots__ = (
        "body",
        "completion_tokens",
        "disconnect",
        "events",
        "fault",
        "generation",
        "headers",
        "hold",
        "latency",
        "prompt_tokens",
        "stall",
        "status",
    )

    def __init__(
        self,
        status: int,
        headers: Headers,
        body: bytes = b"",
        *,
        events: list[tuple[float, bytes]] | None = None,
        fault: str | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.events = events
        self.latency = 0.0
        self.generation = 0.0
        self.fault = fault
        self.stall = False
        self.disconnect = False
        self.hold: RouteHold | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def immediate(self) -> bool:
        """Whether the reply is one JSON body sent at once (no waits, no faults to act out)."""
        return (
            self.events is None
            and not self.latency
            and not self.generation
            and not self.stall
            and not self.disconnect
            and self.hold is None
        )


@attrs.frozen
class _Prepared:
    """A parsed, answered generation or embedding request (the same for equal bodies).

    ``rest`` is the JSON body without its per-response identity (``id``, ``created``) for
    chat and messages, and the whole body for embeddings.
    """

    model: str
    generation: Generation | None
    rest: bytes
    prompt_tokens: int
    completion_tokens: int


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _prepare(endpoint: str, body: bytes, seed: int, invalid_replies: int = 0) -> _Prepared:
    """Parse and answer a POST body (pure: depends only on its arguments).

    ``invalid_replies`` is the config's ``invalid_structured_replies``.

    Raises:
        BadRequest: The body is not a JSON object, or a field is missing or invalid.
    """
    return prepare_payload(endpoint, parse_json_object(body), seed, invalid_replies)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Parse a request body that must be one JSON object.

    Raises:
        BadRequest: It is not valid JSON, or not an object.
    """
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise BadRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    return payload


def prepare_payload(
    endpoint: str, payload: dict[str, Any], seed: int, invalid_replies: int = 0
) -> _Prepared:
    """Answer a parsed POST body (pure, like ``_prepare``, whose arguments it takes).

    Raises:
        BadRequest: A field is missing or invalid.
    """
    if endpoint == EMBEDDINGS:
        rest, tokens = _openai.parse_embeddings(payload, seed)
        return _Prepared(payload["model"], None, rest, tokens, 0)
    if endpoint == MESSAGES:
        generation = _anthropic.parse_messages(payload, seed, invalid_replies)
        rest = b"" if generation.stream else _anthropic.message_body_rest(generation)
    else:
        generation = _openai.parse_chat(payload, seed, invalid_replies)
        rest = b"" if generation.stream else _openai.chat_body_rest(generation, _fingerprint(seed))
    return _Prepared(
        generation.model, generation, rest, generation.prompt_tokens, generation.completion_tokens
    )


_prepare_cached = lru_cache(maxsize=1024)(_prepare)


def endpoint_of(target: bytes) -> tuple[str, str]:
    """Return the path of a request target and its key in ``requests_by_endpoint``.

    The key is the path for fixed paths, ``/v1/models`` for a model, and the route template
    (``/v1/batches/{batch_id}``) for the Batch APIs.
    """
    path = target.split(b"?", 1)[0].decode("ascii", "replace")
    if path in _METHODS:
        return path, path
    if path.startswith(MODELS + "/") and len(path) > len(MODELS) + 1:
        return path, MODELS
    route = match_batch_route(path)
    if route is not None:
        return path, route[0]
    return path, OTHER


def body_limit(endpoint: str) -> int:
    """Return the largest request body the server reads for an endpoint (413 beyond)."""
    return _BATCH_BODY if endpoint in (FILES, MESSAGE_BATCHES) else MAX_BODY


class App:
    """Route and answer requests for one ``FakeLLMServer`` (reads its config per request)."""

    def __init__(self, server: FakeLLMServer) -> None:
        self._server = server
        self._limits = RateLimits()
        self._seed = server.config.seed
        self._rng = random.Random(self._seed)
        self._fingerprint = _fingerprint(self._seed)
        self.batches = BatchStore()
        self._openai_batches = OpenAIBatches(self)
        self._anthropic_batches = AnthropicBatches(self)

    @property
    def stats(self) -> FakeLLMStats:
        """The server's live counters."""
        return self._server.stats

    @property
    def root_url(self) -> str:
        """The server's URL without ``/v1``."""
        return self._server.root_url

    def throttle(self, config: FakeLLMConfig, polls: int, anthropic: bool) -> Reply | None:
        """Answer a batch retrieval with 429 while it is among the first throttled ones."""
        if polls > config.batch_poll_throttle:
            return None
        self._server.stats.rate_limited += 1
        reply = self.error(
            config,
            429,
            "Rate limit reached for batch retrievals. Please try again later.",
            anthropic=anthropic,
            kind="requests",
            code="rate_limit_exceeded",
            retry_after=config.batch_retry_after,
        )
        reply.fault = "rate_limited"
        return reply

    def draw(self) -> float:
        """Draw the next fault decision from the server's seeded generator."""
        return self._rng.random()

    def handle(
        self, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> Reply:
        """Answer one complete request, holding the answer when its route is held."""
        reply = self._handle(method, target, headers, body)
        if self.batches.holds:
            route = method.decode("latin-1") + " " + endpoint_of(target)[1]
            reply.hold = self.batches.holds.get(route)
        return reply

    def _handle(
        self, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> Reply:
        """Answer one complete request (never raises for a bad request: it becomes a reply).

        The checks run in this order: route (404, 405), authentication (401), validation
        (400), rate limits (429), then the drawn faults: injected error, stall, disconnect.
        """
        config = self._server.config
        if config.seed != self._seed:
            self._seed = config.seed
            self._rng = random.Random(self._seed)
            self._fingerprint = _fingerprint(self._seed)
        path, endpoint = endpoint_of(target)
        anthropic = endpoint in (MESSAGES, MESSAGE_BATCHES) or endpoint.startswith(
            MESSAGE_BATCHES + "/"
        )
        if endpoint == OTHER:
            verb = method.decode("latin-1")
            return self.error(config, 404, f"Invalid URL ({verb} {path})", anthropic=False)
        allowed = (_METHODS[endpoint],) if endpoint in _METHODS else BATCH_ROUTES[endpoint]
        if method not in allowed:
            names = ", ".join(verb.decode() for verb in allowed)
            reply = self.error(
                config,
                405,
                f"Method {method.decode('latin-1')} not allowed on {path}; use {names}.",
                anthropic=anthropic,
            )
            reply.headers.append((b"allow", names.encode()))
            return reply
        if config.api_key is not None:
            refusal = self._authenticate(config, headers, anthropic)
            if refusal is not None:
                return refusal
        if endpoint in BATCH_ROUTES:
            request = BatchRequest(method, path, target, headers, body)
            try:
                if anthropic:
                    return self._anthropic_batches.handle(config, endpoint, request)
                return self._openai_batches.handle(config, endpoint, request)
            except BadRequest as exc:
                return self.error(
                    config, exc.status, exc.message, anthropic=anthropic, param=exc.param
                )
        if endpoint == MODELS:
            if path == MODELS:
                return self.ok(config, _openai.models_body(config.models))
            name = path[len(MODELS) + 1 :]
            return self.ok(config, json.dumps(_openai.model_object(name)).encode())
        prepare = _prepare_cached if len(body) <= _CACHED_BODY_SIZE else _prepare
        try:
            prepared = prepare(endpoint, body, config.seed, config.invalid_structured_replies)
        except BadRequest as exc:
            return self.error(config, exc.status, exc.message, anthropic=anthropic, param=exc.param)
        return self._answer(config, endpoint, prepared)

    def _authenticate(
        self, config: FakeLLMConfig, headers: Iterable[tuple[bytes, bytes]], anthropic: bool
    ) -> Reply | None:
        supplied: bytes | None = None
        for name, value in headers:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                supplied = value[7:].strip()
            elif name == b"x-api-key" and anthropic:
                supplied = value.strip()
        assert config.api_key is not None
        if supplied is not None and hmac.compare_digest(supplied, config.api_key.encode()):
            return None
        message = (
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            if supplied is None
            else "Incorrect API key provided."
        )
        return self.error(
            config,
            401,
            message,
            anthropic=anthropic,
            kind="authentication_error",
            code="invalid_api_key",
        )

    def _answer(self, config: FakeLLMConfig, endpoint: str, prepared: _Prepared) -> Reply:
        anthropic = endpoint == MESSAGES
        limit_headers: Headers = []
        if config.requests_per_minute is not None or config.tokens_per_minute is not None:
            tokens = prepared.prompt_tokens + prepared.completion_tokens
            refusal = self._admit(config, prepared.model, tokens, anthropic)
            if isinstance(refusal, Reply):
                return refusal
            limit_headers = refusal
        injected = self._inject(config, anthropic)
        if injected is not None:
            return injected
        generation = prepared.generation
        stream = generation is not None and generation.stream
        headers = [
            (b"content-type", _EVENT_STREAM if stream else _JSON),
            (b"x-request-id", b"req_" + os.urandom(16).hex().encode()),
            *limit_headers,
        ]
        seconds_per_token = 1.0 / config.tokens_per_second if config.tokens_per_second else 0.0
        if anthropic:
            headers.append((b"request-id", headers[1][1]))
        if generation is None or not stream:
            reply = Reply(200, headers, self._render(endpoint, prepared))
        elif anthropic:
            message_id = "msg_" + os.urandom(12).hex()
            events = _anthropic.message_events(generation, message_id, seconds_per_token)
            reply = Reply(200, headers, events=events)
        else:
            events = _openai.chat_events(
                generation,
                "chatcmpl-" + os.urandom(12).hex(),
                int(time.time()),
                self._fingerprint,
                seconds_per_token,
            )
            reply = Reply(200, headers, events=events)
        reply.latency = config.latency
        if generation is not None and not stream:
            reply.generation = generation.longest * seconds_per_token
        if config.disconnect_rate and self._rng.random() < config.disconnect_rate:
            reply.disconnect = True
            reply.fault = "disconnect"
        reply.prompt_tokens = prepared.prompt_tokens
        reply.completion_tokens = prepared.completion_tokens
        return reply

    @staticmethod
    def _render(endpoint: str, prepared: _Prepared) -> bytes:
        """Render the JSON body of a prepared request that does not stream."""
        if prepared.generation is None:
            return prepared.rest
        if endpoint == MESSAGES:
            return _openai.with_identity(prepared.rest, "msg_" + os.urandom(12).hex())
        completion_id = "chatcmpl-" + os.urandom(12).hex()
        return _openai.with_identity(prepared.rest, completion_id, int(time.time()))

    def answer_line(
        self, endpoint: str, payload: dict[str, Any], seed: int, invalid_replies: int = 0
    ) -> tuple[int, bytes]:
        """Answer one Batch API line's body as a POST to ``endpoint`` would be answered.

        The same parsing and replies as the online endpoints, without rate limits, faults
        or waits (``invalid_replies``: the config's ``invalid_structured_replies``).
        Returns the HTTP status and the JSON body (an error object when not 200, in the
        endpoint's wire format).
        """
        anthropic = endpoint == MESSAGES
        try:
            prepared = prepare_payload(endpoint, payload, seed, invalid_replies)
            if prepared.generation is not None and prepared.generation.stream:
                raise BadRequest("Streaming is not supported in batches.", "stream")
        except BadRequest as exc:
            return exc.status, self.error_body(exc.status, exc.message, exc.param, anthropic)
        return 200, self._render(endpoint, prepared)

    @staticmethod
    def error_body(status: int, message: str, param: str | None, anthropic: bool) -> bytes:
        """Render an error object in the OpenAI or the Anthropic wire format."""
        if anthropic:
            return _anthropic.error_body(message, _anthropic.error_type(status))
        kind, code = _openai_error_kind(status)
        return _openai.error_body(message, kind, param, code)

    def _admit(
        self, config: FakeLLMConfig, model: str, tokens: int, anthropic: bool
    ) -> Reply | Headers:
        """Apply the server's rate limits: a 429 reply, or the limit headers to send."""
        rpm, tpm = config.requests_per_minute, config.tokens_per_minute
        admission = self._limits.admit(rpm, tpm, tokens, trio.current_time())
        if admission.admitted:
            return list(admission.headers)
        self._server.stats.rate_limited += 1
        reply = self.error(
            config,
            429,
            _rate_limit_message(admission, model, rpm, tpm, tokens),
            anthropic=anthropic,
            kind=admission.limit_type,
            code="rate_limit_exceeded",
            retry_after=admission.retry_after,
        )
        reply.fault = "rate_limited"
        return reply

    def _inject(self, config: FakeLLMConfig, anthropic: bool) -> Reply | None:
        """Draw the fault decisions: an injected error, or a stall (else None)."""
        if config.error_rate and self._rng.random() < config.error_rate:
            self._server.stats.injected_errors += 1
            status = config.error_status
            reply = self.error(
                config,
                status,
                f"Injected error: {status} {_reason(status)}.",
                anthropic=anthropic,
                retry_after=_INJECTED_RETRY_AFTER if status == 429 else None,
            )
            reply.fault = "error"
            return reply
        if config.stall_rate and self._rng.random() < config.stall_rate:
            self._server.stats.stalls += 1
            reply = Reply(200, [], fault="stall")
            reply.stall = True
            return reply
        return None

    def ok(self, config: FakeLLMConfig, body: bytes) -> Reply:
        headers = [
            (b"content-type", _JSON),
            (b"x-request-id", b"req_" + os.urandom(16).hex().encode()),
        ]
        if config.requests_per_minute is not None or config.tokens_per_minute is not None:
            now = trio.current_time()
            headers.extend(
                self._limits.snapshot(config.requests_per_minute, config.tokens_per_minute, now)
            )
        return Reply(200, headers, body)

    def error(
        self,
        config: FakeLLMConfig,
        status: int,
        message: str,
        *,
        anthropic: bool,
        kind: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> Reply:
        """Build an error reply in the endpoint's wire format (OpenAI unless ``anthropic``)."""
        if anthropic:
            body = _anthropic.error_body(message, _anthropic.error_type(status))
        else:
            if kind is None:
                kind, default_code = _openai_error_kind(status)
                code = code or default_code
            body = _openai.error_body(message, kind, param, code)
        reply = self.ok(config, body)
        reply.status = status
        if anthropic:
            reply.headers.append((b"request-id", reply.headers[1][1]))
        if retry_after is not None:
            reply.headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
            reply.headers.append((b"retry-after-ms", str(math.ceil(retry_after * 1000)).encode()))
        return reply


def _fingerprint(seed: int) -> str:
    return "fp_" + hashlib.blake2b(str(seed).encode(), digest_size=5).hexdigest()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _openai_error_kind(status: int) -> tuple[str, str | None]:
    if status == 401:
        return "authentication_error", "invalid_api_key"
    if status == 403:
        return "permission_error", None
    if status == 404:
        return "not_found_error", None
    if status == 409:
        return "conflict_error", None
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


def _rate_limit_message(
    admission: Admission, model: str, rpm: int | None, tpm: int | None, tokens: int
) -> str:
    if admission.too_large:
        return (
            f"Request too large for {model} on tokens per min (TPM): "
            f"Limit {tpm}, Requested {tokens}."
        )
    if admission.limit_type == "requests":
        what, limit, requested = "requests per min (RPM)", rpm, 1
    else:
        what, limit, requested = "tokens per min (TPM)", tpm, tokens
    return (
        f"Rate limit reached for {model} on {what}: Limit {limit}, Requested {requested}. "
        f"Please try again in {go_duration(admission.retry_after)}."
    )
