"""The interface every provider adapter satisfies.

An adapter builds request bodies and turns replies into trio-llm types; the client owns
the HTTP side (connections, limits, retries). Streams are normalised to OpenAI-shaped
``chat.completion.chunk`` payloads, so one aggregation serves every provider. Wire details
of the responses (the request-id header, the rate-limit headers) are read here too, and
reach the client as neutral values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .._ratelimit import RateLimitLevels
from .._types import ChatResponse, EmbeddingResponse, JSONObject

__all__ = ["Provider", "StreamTranslator"]

Messages = str | Sequence[Mapping[str, Any]]


class StreamTranslator(Protocol):
    """Turn one stream's events into OpenAI-shaped chunk payloads (stateful, one per stream)."""

    @property
    def done(self) -> bool:
        """Whether the event that ends the stream has been seen."""
        ...

    def translate(self, event: str, payload: JSONObject) -> list[JSONObject]:
        """Return the ``chat.completion.chunk`` payloads ``event`` stands for (maybe none).

        Error events never reach it: the caller raises :class:`StreamError` for those.
        """
        ...


class Provider(Protocol):
    """Build and parse the requests of one wire format."""

    @property
    def name(self) -> str:
        """The provider's name, as given to ``open_client(provider=...)``."""
        ...

    @property
    def default_base_url(self) -> str: ...

    @property
    def base_url_env(self) -> str: ...

    @property
    def api_key_env(self) -> str: ...

    @property
    def chat_path(self) -> str: ...

    @property
    def embeddings_path(self) -> str: ...

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        """Return the headers every request carries (the key's, and any version header)."""
        ...

    def chat_body(
        self, prompt_or_messages: Messages, model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the JSON body of a chat request."""
        ...

    def parse_chat(self, payload: dict[str, Any], request_id: str | None) -> ChatResponse:
        """Parse a chat reply."""
        ...

    def stream_body(
        self, prompt_or_messages: Messages, model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the JSON body of a streamed chat request."""
        ...

    def stream_translator(self) -> StreamTranslator | None:
        """Return a translator for one stream, or ``None`` if its events are OpenAI chunks."""
        ...

    def embeddings_body(
        self, texts: str | Sequence[str], model: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the JSON body of an embeddings request.

        Raises:
            ConfigurationError: the provider has no embeddings endpoint.
        """
        ...

    def parse_embeddings(
        self, payload: dict[str, Any], request_id: str | None
    ) -> EmbeddingResponse:
        """Parse an embeddings reply."""
        ...

    def request_id(self, headers: Mapping[str, str]) -> str | None:
        """Return the server's id for the request a response answers, if it sent one.

        Args:
            headers: the response's headers (lower-case keys, or ``httpx2.Headers``).
        """
        ...

    def rate_limit_levels(self, headers: Mapping[str, str]) -> RateLimitLevels | None:
        """Return a response's rate-limit headers as neutral numbers.

        ``None`` when the response carries none of them. Malformed values count as
        absent; this never raises.

        Args:
            headers: the response's headers (any case, or ``httpx2.Headers``).
        """
        ...

    def stream_content_started(self, event: str, payload: JSONObject) -> bool:
        """Return whether a stream event carries part of the reply (not only framing).

        Until one does, an error event is retried like the matching status: nothing has
        reached the caller yet.
        """
        ...

    def stream_error_status(self, error: object) -> int:
        """Return the HTTP status an error event of a stream stands for (5xx if unknown)."""
        ...

    def accepts_batch_url(self, url: str) -> bool:
        """Return whether a batch line with this ``url`` can be sent through the adapter.

        ``url`` is a batch line's endpoint: ``/v1/chat/completions``, ``/v1/embeddings``
        or ``/v1/messages``.
        """
        ...
