"""trio-llm: a Trio-native SDK for calling LLM APIs at scale.

The public API is re-exported here; everything else is private and may change. Names are
imported on first use (PEP 562), so ``import trio_llm`` and the ``trio-llm`` command start
fast, and a Ctrl-C during start-up meets the command's own handler, not an import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._cache import ResponseCache as ResponseCache
    from ._cache_redis import RedisCache as RedisCache
    from ._cache_redis import open_redis_cache as open_redis_cache
    from ._cache_sqlite import SQLiteCache as SQLiteCache
    from ._cache_sqlite import open_sqlite_cache as open_sqlite_cache
    from ._client import ChatItem as ChatItem
    from ._client import Client as Client
    from ._client import ClientStatistics as ClientStatistics
    from ._client import open_client as open_client
    from ._config import RetryPolicy as RetryPolicy
    from ._config import Timeouts as Timeouts
    from ._cost import Price as Price
    from ._endpoints import Endpoint as Endpoint
    from ._errors import APIConnectionError as APIConnectionError
    from ._errors import APIResponseError as APIResponseError
    from ._errors import APIStatusError as APIStatusError
    from ._errors import APITimeoutError as APITimeoutError
    from ._errors import AuthenticationError as AuthenticationError
    from ._errors import BadRequestError as BadRequestError
    from ._errors import BatchInputError as BatchInputError
    from ._errors import CacheError as CacheError
    from ._errors import ConfigurationError as ConfigurationError
    from ._errors import ConflictError as ConflictError
    from ._errors import LLMError as LLMError
    from ._errors import NotFoundError as NotFoundError
    from ._errors import PermissionDeniedError as PermissionDeniedError
    from ._errors import RateLimitError as RateLimitError
    from ._errors import RetryDeadlineExceeded as RetryDeadlineExceeded
    from ._errors import ServerError as ServerError
    from ._errors import SharedLimitError as SharedLimitError
    from ._errors import StreamError as StreamError
    from ._errors import StructuredOutputError as StructuredOutputError
    from ._errors import UnprocessableEntityError as UnprocessableEntityError
    from ._fanout import as_completed as as_completed
    from ._fanout import capture_errors as capture_errors
    from ._fanout import map_concurrently as map_concurrently
    from ._http import TrioTransport as TrioTransport
    from ._mapreduce import MapReduceResult as MapReduceResult
    from ._mapreduce import map_reduce as map_reduce
    from ._prompt import Prompt as Prompt
    from ._ratelimit import RateLimit as RateLimit
    from ._routing import EndpointStatistics as EndpointStatistics
    from ._streaming import ChatStream as ChatStream
    from ._streaming import MultiChatStream as MultiChatStream
    from ._streaming import StreamItem as StreamItem
    from ._streaming import StreamStatistics as StreamStatistics
    from ._structured import chat_structured as chat_structured
    from ._structured import json_schema_for as json_schema_for
    from ._types import ChatChunk as ChatChunk
    from ._types import ChatResponse as ChatResponse
    from ._types import Choice as Choice
    from ._types import EmbeddingResponse as EmbeddingResponse
    from ._types import Result as Result
    from ._types import Usage as Usage
    from .batch import BatchSummary as BatchSummary
    from .batch import run_batch as run_batch

# Each public name, and the private module that defines it.
_EXPORTS = {
    "ResponseCache": "._cache",
    "RedisCache": "._cache_redis",
    "open_redis_cache": "._cache_redis",
    "SQLiteCache": "._cache_sqlite",
    "open_sqlite_cache": "._cache_sqlite",
    "ChatItem": "._client",
    "Client": "._client",
    "ClientStatistics": "._client",
    "open_client": "._client",
    "RetryPolicy": "._config",
    "Timeouts": "._config",
    "Price": "._cost",
    "Endpoint": "._endpoints",
    "APIConnectionError": "._errors",
    "APIResponseError": "._errors",
    "APIStatusError": "._errors",
    "APITimeoutError": "._errors",
    "AuthenticationError": "._errors",
    "BadRequestError": "._errors",
    "BatchInputError": "._errors",
    "CacheError": "._errors",
    "ConfigurationError": "._errors",
    "ConflictError": "._errors",
    "LLMError": "._errors",
    "NotFoundError": "._errors",
    "PermissionDeniedError": "._errors",
    "RateLimitError": "._errors",
    "RetryDeadlineExceeded": "._errors",
    "ServerError": "._errors",
    "SharedLimitError": "._errors",
    "StreamError": "._errors",
    "StructuredOutputError": "._errors",
    "UnprocessableEntityError": "._errors",
    "as_completed": "._fanout",
    "capture_errors": "._fanout",
    "map_concurrently": "._fanout",
    "TrioTransport": "._http",
    "MapReduceResult": "._mapreduce",
    "map_reduce": "._mapreduce",
    "Prompt": "._prompt",
    "RateLimit": "._ratelimit",
    "EndpointStatistics": "._routing",
    "ChatStream": "._streaming",
    "MultiChatStream": "._streaming",
    "StreamItem": "._streaming",
    "StreamStatistics": "._streaming",
    "chat_structured": "._structured",
    "json_schema_for": "._structured",
    "ChatChunk": "._types",
    "ChatResponse": "._types",
    "Choice": "._types",
    "EmbeddingResponse": "._types",
    "Result": "._types",
    "Usage": "._types",
    "BatchSummary": ".batch",
    "run_batch": ".batch",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trio_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "APIConnectionError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchInputError",
    "BatchSummary",
    "CacheError",
    "ChatChunk",
    "ChatItem",
    "ChatResponse",
    "ChatStream",
    "Choice",
    "Client",
    "ClientStatistics",
    "ConfigurationError",
    "ConflictError",
    "EmbeddingResponse",
    "Endpoint",
    "EndpointStatistics",
    "LLMError",
    "MapReduceResult",
    "MultiChatStream",
    "NotFoundError",
    "PermissionDeniedError",
    "Price",
    "Prompt",
    "RateLimit",
    "RateLimitError",
    "RedisCache",
    "ResponseCache",
    "Result",
    "RetryDeadlineExceeded",
    "RetryPolicy",
    "SQLiteCache",
    "ServerError",
    "SharedLimitError",
    "StreamError",
    "StreamItem",
    "StreamStatistics",
    "StructuredOutputError",
    "Timeouts",
    "TrioTransport",
    "UnprocessableEntityError",
    "Usage",
    "__version__",
    "as_completed",
    "capture_errors",
    "chat_structured",
    "json_schema_for",
    "map_concurrently",
    "map_reduce",
    "open_client",
    "open_redis_cache",
    "open_sqlite_cache",
    "run_batch",
]
