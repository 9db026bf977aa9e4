"""The public API, pinned: a change here is a change users see."""

from __future__ import annotations

import trio_llm
import trio_llm.testing

PUBLIC_API = {
    "ChatChunk",
    "StreamStatistics",
    "StreamItem",
    "MultiChatStream",
    "ChatStream",
    "StreamError",
    "Result",
    "RateLimit",
    "map_concurrently",
    "capture_errors",
    "as_completed",
    "ChatItem",
    "APIConnectionError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchInputError",
    "BatchSummary",
    "ChatResponse",
    "Choice",
    "Client",
    "ClientStatistics",
    "ConfigurationError",
    "ConflictError",
    "EmbeddingResponse",
    "Endpoint",
    "EndpointStatistics",
    "LLMError",
    "NotFoundError",
    "PermissionDeniedError",
    "Price",
    "RateLimitError",
    "RetryDeadlineExceeded",
    "RetryPolicy",
    "ServerError",
    "SharedLimitError",
    "Timeouts",
    "TrioTransport",
    "UnprocessableEntityError",
    "Usage",
    "__version__",
    "open_client",
    "run_batch",
    "Prompt",
    "map_reduce",
    "MapReduceResult",
    "chat_structured",
    "json_schema_for",
    "StructuredOutputError",
    "CacheError",
    "ResponseCache",
    "SQLiteCache",
    "open_sqlite_cache",
    "RedisCache",
    "open_redis_cache",
}

TESTING_API = {
    "CacheMissError",
    "open_replay_client",
    "FakeLLMConfig",
    "FakeLLMServer",
    "FakeLLMStats",
    "open_fake_llm",
    "serve_fake_llm",
}


def test_public_names() -> None:
    """trio_llm exports exactly the documented names, and each exists."""
    assert set(trio_llm.__all__) == PUBLIC_API
    for name in PUBLIC_API:
        assert getattr(trio_llm, name) is not None


def test_testing_names() -> None:
    """trio_llm.testing exports exactly the fake server's documented names."""
    assert set(trio_llm.testing.__all__) == TESTING_API
    for name in TESTING_API:
        assert getattr(trio_llm.testing, name) is not None


def test_errors_share_one_base() -> None:
    """Every exported exception derives from LLMError."""
    errors = [
        getattr(trio_llm, name)
        for name in trio_llm.__all__
        if isinstance(getattr(trio_llm, name), type)
        and issubclass(getattr(trio_llm, name), BaseException)
    ]
    assert trio_llm.RateLimitError in errors
    assert all(issubclass(error, trio_llm.LLMError) for error in errors)


def test_public_objects_claim_the_public_module() -> None:
    """Public classes live in private modules but are documented under trio_llm."""
    for name in PUBLIC_API - {"__version__", "ChatItem", "StreamItem"}:  # type aliases
        module = getattr(trio_llm, name).__module__
        assert module.startswith("trio_llm."), (name, module)
