"""How the gateway answers for an upstream call that failed.

Bodies passed to callers describe the failure by its kind only: an error's own message
names the upstream URL (and may name internal hosts), so it goes to the log (the
:class:`~trio_llm.serve.GenerationRecord`'s ``error``), never into a response. An upstream
error reply keeps its status and body, except a 401: the caller's key was accepted by the
gateway, so the upstream refusing the gateway's own key is a 502 for the caller and an
error line in the log for the operator.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .._errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    ConfigurationError,
    LLMError,
    RetryDeadlineExceeded,
    redact_url,
)

__all__ = ["error_body", "upstream_error"]

logger = logging.getLogger("trio_llm.serve")

_CREDENTIALS_REFUSED = (
    "the upstream API refused the gateway's credentials (HTTP 401); "
    "this is the gateway's configuration, not your key: tell its operator"
)


def error_body(
    message: str, kind: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """Return the OpenAI-shaped error body ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _cause(exc: BaseException) -> str:
    """Name the low-level error under ``exc`` (``" (ConnectError)"``), or ``""``."""
    cause = exc.__cause__
    if cause is None or isinstance(cause, LLMError):
        return ""
    return f" ({type(cause).__name__})"


def upstream_error(exc: LLMError, *, upstream: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Return (status, OpenAI-style body, headers) to answer for a failed upstream call.

    Args:
        exc: the error the client raised.
        upstream: the upstream's base URL, named in the log line of a refused key only.
    """
    if isinstance(exc, AuthenticationError):
        logger.error(
            "upstream %s refused the gateway's API key (answering 502): %s",
            redact_url(upstream),
            exc,
        )
        return 502, error_body(_CREDENTIALS_REFUSED, "upstream_error", "upstream_auth_failed"), {}
    if isinstance(exc, APIStatusError):
        headers = {}
        if exc.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc.body, dict) and isinstance(exc.body.get("error"), dict):
            return exc.status_code, exc.body, headers
        kind = exc.error_type or "upstream_error"
        return exc.status_code, error_body(exc.message, kind, exc.code), headers
    if isinstance(exc, APITimeoutError):
        return 504, error_body(f"upstream timed out{_cause(exc)}", "upstream_error", "timeout"), {}
    if isinstance(exc, RetryDeadlineExceeded):
        message = (
            f"upstream did not answer within the gateway's deadline of {exc.deadline:g} s "
            f"({exc.attempts} attempt(s))"
        )
        return 504, error_body(message, "upstream_error", "timeout"), {}
    if isinstance(exc, ConfigurationError):
        return 400, error_body(str(exc), "invalid_request_error", None), {}
    if isinstance(exc, APIConnectionError):
        message = f"could not reach the upstream API{_cause(exc)}"
        return 502, error_body(message, "upstream_error", "bad_gateway"), {}
    if isinstance(exc, APIResponseError):
        message = f"the upstream API answered HTTP {exc.status_code} with a body it could not read"
        return 502, error_body(message, "upstream_error", "bad_gateway"), {}
    return 502, error_body(f"upstream failed ({type(exc).__name__})", "upstream_error", None), {}
