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
from ._limits import Admission, RateLimits, go_duration
from ._types import BadRequest, Generation

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._config import FakeLLMConfig
    from ._server import FakeLLMServer

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
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise BadRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
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
    """Return the path of a request target and its key in ``requests_by_endpoint``."""
    path = target.split(b"?", 1)[0].decode("ascii", "replace")
    if path in _METHODS:
        return path, path
    if path.startswith(MODELS + "/") and len(path) > len(MODELS) + 1:
        return path, MODELS
    return path, OTHER


class App:
    """Route and answer requests for one ``FakeLLMServer`` (reads its config per request)."""

    def __init__(self, server: FakeLLMServer) -> None:
        self._server = server
        self._limits = RateLimits()
        self._seed = server.config.seed
        self._rng = random.Random(self._seed)
        self._fingerprint = _fingerprint(self._seed)

    def handle(
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
        anthropic = endpoint == MESSAGES
        if endpoint == OTHER:
            verb = method.decode("latin-1")
            return self.error(config, 404, f"Invalid URL ({verb} {path})", anthropic=False)
        allowed = _METHODS[endpoint]
        if method != allowed:
            reply = self.error(
                config,
                405,
                f"Method {method.decode('latin-1')} not allowed on {path}; use {allowed.decode()}.",
                anthropic=anthropic,
            )
            reply.headers.append((b"allow", allowed))
            return reply
        if config.api_key is not None:
            refusal = self._authenticate(config, headers, anthropic)
            if refusal is not None:
                return refusal
        if endpoint == MODELS:
            if path == MODELS:
                return self._ok(config, _openai.models_body(config.models))
            name = path[len(MODELS) + 1 :]
            return self._ok(config, json.dumps(_openai.model_object(name)).encode())
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
        if generation is None:
            reply = Reply(200, headers, prepared.rest)
        elif anthropic:
            headers.append((b"request-id", headers[1][1]))
            message_id = "msg_" + os.urandom(12).hex()
            if stream:
                events = _anthropic.message_events(generation, message_id, seconds_per_token)
                reply = Reply(200, headers, events=events)
            else:
                reply = Reply(200, headers, _openai.with_identity(prepared.rest, message_id))
        else:
            completion_id = "chatcmpl-" + os.urandom(12).hex()
            created = int(time.time())
            if stream:
                events = _openai.chat_events(
                    generation, completion_id, created, self._fingerprint, seconds_per_token
                )
                reply = Reply(200, headers, events=events)
            else:
                body = _openai.with_identity(prepared.rest, completion_id, created)
                reply = Reply(200, headers, body)
        reply.latency = config.latency
        if generation is not None and not stream:
            reply.generation = generation.longest * seconds_per_token
        if config.disconnect_rate and self._rng.random() < config.disconnect_rate:
            reply.disconnect = True
            reply.fault = "disconnect"
        reply.prompt_tokens = prepared.prompt_tokens
        reply.completion_tokens = prepared.completion_tokens
        return reply

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

    def _ok(self, config: FakeLLMConfig, body: bytes) -> Reply:
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
        reply = self._ok(config, body)
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
