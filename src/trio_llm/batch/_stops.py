"""Which failed lines stop a batch run, and the one line that says why.

A line's error after its retries is one of three kinds (see ``_runner``'s docstring):
*systematic* (no other line would escape it: the run stops at once), an *outage* (the
endpoint, or the shared limits' Redis, may be down or failing: held back, and the run
stops after ``max_consecutive_failures`` in a row), or the line's own answer.
"""

from __future__ import annotations

from typing import Final

from .._errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    LLMError,
    RateLimitError,
    RetryDeadlineExceeded,
    ServerError,
    SharedLimitError,
    redact_url,
)

__all__ = ["brief", "is_outage", "is_systematic", "status_stop"]

# Statuses no other line of the run would escape: the key (401), its rights (403), the
# URL or model (404), a URL that is no API (405), a proxy's credentials (407).
_STOPPING_STATUSES: Final = frozenset({401, 403, 404, 405, 407})
# Statuses retried as "try again later" (like 5xx and 429): failing after the retries,
# they say more about the endpoint than about the line.
_OUTAGE_STATUSES: Final = frozenset({408, 409})
_OUTAGE_ERRORS: Final = (
    APIConnectionError,
    RetryDeadlineExceeded,
    APIResponseError,
    SharedLimitError,
)


def is_systematic(error: LLMError) -> bool:
    """Whether every other line of the run would fail like this (a 401, 403, 404...)."""
    return isinstance(error, APIStatusError) and error.status_code in _STOPPING_STATUSES


def is_outage(error: LLMError) -> bool:
    """Whether a line's error (after its retries) may be a down or failing endpoint's."""
    if isinstance(error, APIStatusError):
        return isinstance(error, (ServerError, RateLimitError)) or (
            error.status_code in _OUTAGE_STATUSES
        )
    return isinstance(error, _OUTAGE_ERRORS)


def status_stop(error: APIStatusError, base_url: str) -> str:
    """Say, in one line, why an error status stops the run."""
    kind = error.code or error.error_type
    status = f"{error.status_code} {kind}" if kind else str(error.status_code)
    where = redact_url(base_url)
    return f"every request gets {status} from {where} ({brief(error.message)})"


def brief(text: str, limit: int = 160) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
