"""trio-llm: a Trio-native SDK for calling LLM APIs at scale.

The public API is re-exported here; everything else is private and may change.
"""

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
from ._errors import ConfigurationError as ConfigurationError
from ._errors import ConflictError as ConflictError
from ._errors import LLMError as LLMError
from ._errors import NotFoundError as NotFoundError
from ._errors import PermissionDeniedError as PermissionDeniedError
from ._errors import RateLimitError as RateLimitError
from ._errors import RetryDeadlineExceeded as RetryDeadlineExceeded
from ._errors import ServerError as ServerError
from ._errors import UnprocessableEntityError as UnprocessableEntityError
from ._types import ChatResponse as ChatResponse
from ._types import Choice as Choice
from ._types import EmbeddingResponse as EmbeddingResponse
from ._types import Usage as Usage
from ._version import __version__ as __version__

__all__ = [
    "APIConnectionError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ChatResponse",
    "Choice",
    "Client",
    "ClientStatistics",
    "ConfigurationError",
    "ConflictError",
    "EmbeddingResponse",
    "LLMError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryDeadlineExceeded",
    "RetryPolicy",
    "ServerError",
    "Timeouts",
    "UnprocessableEntityError",
    "Usage",
    "__version__",
    "open_client",
]
