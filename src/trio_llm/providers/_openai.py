"""The OpenAI-compatible adapter: OpenAI, vLLM, Ollama, llama.cpp, Groq, ... ."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, final

from .._ratelimit import RateLimitLevel, RateLimitLevels
from .._types import ChatResponse, EmbeddingResponse, JSONObject
from ._base import Messages
from ._headers import parse_count, parse_go_duration, parse_limit, prefixed

__all__ = ["Messages", "OpenAIProvider", "as_messages"]


def as_messages(prompt_or_messages: Messages) -> list[Mapping[str, Any]]:
    """Return a message list; a plain string becomes one user message."""
    if isinstance(prompt_or_messages, str):
        return [{"role": "user", "content": prompt_or_messages}]
    messages = list(prompt_or_messages)
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise TypeError(
                f"messages[{position}] must be a mapping with a 'role', not {message!r:.80}"
            )
    return messages


# The endpoints of a batch file (OpenAI's Batch API format) this adapter can send.
_BATCH_URLS: Final = frozenset({"/v1/chat/completions", "/v1/embeddings"})


def _level(fields: Mapping[str, str], kind: str) -> RateLimitLevel:
    """Return the ``requests`` or ``tokens`` level of ``x-ratelimit-*`` headers."""
    return RateLimitLevel(
        limit=parse_limit(fields.get(f"limit-{kind}")),
        remaining=parse_count(fields.get(f"remaining-{kind}")),
        reset_seconds=parse_go_duration(fields.get(f"reset-{kind}")),
    )


# Error types and codes of OpenAI's error objects, as statuses.
_ERROR_STATUSES: Final = {
    "invalid_request_error": 400,
    "invalid_api_key": 401,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "service_unavailable": 503,
}


@final
class OpenAIProvider:
    """Build and parse requests of the OpenAI wire format (``/chat/completions``, ...)."""

    name: Final = "openai"
    default_base_url: Final = "https://api.openai.com/v1"
    base_url_env: Final = "OPENAI_BASE_URL"
    api_key_env: Final = "OPENAI_API_KEY"
    chat_path: Final = "/chat/completions"
    embeddings_path: Final = "/embeddings"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        """Return the headers that carry the API key (none without a key)."""
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def chat_body(
        self, prompt_or_messages: Messages, model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the JSON body of a chat request; unknown params pass through unchanged."""
        body: dict[str, Any] = {"model": model, "messages": as_messages(prompt_or_messages)}
        body.update(params)
        return body

    def parse_chat(self, payload: dict[str, Any], request_id: str | None) -> ChatResponse:
        """Parse a chat completion payload."""
        return ChatResponse.from_json(payload, request_id=request_id)

    def stream_body(
        self, prompt_or_messages: Messages, model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the body of a streamed chat request, asking for usage in the last chunk.

        The caller's own ``stream_options`` keys win.
        """
        body = self.chat_body(prompt_or_messages, model, params)
        body["stream"] = True
        options = params.get("stream_options")
        body["stream_options"] = {"include_usage": True, **(options or {})}
        return body

    def stream_translator(self) -> None:
        """Return ``None``: the events are ``chat.completion.chunk`` payloads already."""

    def stream_content_started(self, event: str, payload: JSONObject) -> bool:
        """Whether a chunk carries content, a tool call, a finish reason or the usage.

        A first chunk with only the role (and ``content: ""``) is framing.
        """
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices:
            return "usage" in payload  # the usage-only chunk that ends a stream
        for choice in choices:
            if not isinstance(choice, Mapping) or choice.get("finish_reason") is not None:
                return True
            delta = choice.get("delta")
            if not isinstance(delta, Mapping):
                return True
            if any(value not in (None, "") for key, value in delta.items() if key != "role"):
                return True
        return False

    def stream_error_status(self, error: object) -> int:
        """The status an error event's ``type`` or ``code`` names; 500 when it names none."""
        if isinstance(error, Mapping):
            for field in ("code", "type"):
                status = _ERROR_STATUSES.get(str(error.get(field)))
                if status is not None:
                    return status
        return 500

    def embeddings_body(
        self, texts: str | Sequence[str], model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the JSON body of an embeddings request."""
        body: dict[str, Any] = {
            "model": model,
            "input": [texts] if isinstance(texts, str) else list(texts),
        }
        body.update(params)
        return body

    def parse_embeddings(
        self, payload: dict[str, Any], request_id: str | None
    ) -> EmbeddingResponse:
        """Parse an embeddings payload."""
        return EmbeddingResponse.from_json(payload, request_id=request_id)

    def request_id(self, headers: Mapping[str, str]) -> str | None:
        """Return the ``x-request-id`` header, if the response has one."""
        return headers.get("x-request-id") or None

    def rate_limit_levels(self, headers: Mapping[str, str]) -> RateLimitLevels | None:
        """Read ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``.

        Resets are Go durations (``6m0s``, ``12ms``, ``1m30.5s``) or plain seconds.
        ``None`` when the response has no ``x-ratelimit-*`` header.
        """
        fields = prefixed(headers, "x-ratelimit-")
        if not fields:
            return None
        return RateLimitLevels(requests=_level(fields, "requests"), tokens=_level(fields, "tokens"))

    def accepts_batch_url(self, url: str) -> bool:
        """Return whether ``url`` is ``/v1/chat/completions`` or ``/v1/embeddings``."""
        return url in _BATCH_URLS
