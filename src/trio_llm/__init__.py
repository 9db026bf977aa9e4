"""trio-llm: a Trio-native SDK for calling LLM APIs at scale.

The public API is re-exported here; everything else is private and may change.
"""

from ._client import ChatItem as ChatItem
from ._client import Client as Client
from ._client import ClientStatistics as ClientStatistics
from ._client import open_client as open_client
from ._config import RetryPolicy as RetryPolicy
from ._config import Timeouts as Timeouts
from ._errors import APIConnectionError as APIConnectionError
from ._errors import APIResponseError as APIResponseError
from ._errors import APIStatusError as APIStatusError
from ._errors import APITimeoutError as APITimeoutError
from ._errors import AuthenticationError as AuthenticationError
from ._errors import BadRequestError as BadRequestError
from ._errors import BatchInputError as BatchInputError
from ._errors import ConfigurationError as ConfigurationError
from ._errors import ConflictError as ConflictError
from ._errors import LLMError as LLMError
from ._errors import NotFoundError as NotFoundError
from ._errors import PermissionDeniedError as PermissionDeniedError
from ._errors import RateLimitError as RateLimitError
from ._errors import RetryDeadlineExceeded as RetryDeadlineExceeded
from ._errors import ServerError as ServerError
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
from ._version import __version__ as __version__
from .batch import BatchSummary as BatchSummary
from .batch import run_batch as run_batch

__all__ = [
    "APIConnectionError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchInputError",
    "BatchSummary",
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
    "LLMError",
    "MapReduceResult",
    "MultiChatStream",
    "NotFoundError",
    "PermissionDeniedError",
    "Prompt",
    "RateLimit",
    "RateLimitError",
    "Result",
    "RetryDeadlineExceeded",
    "RetryPolicy",
    "ServerError",
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
    "run_batch",
]
