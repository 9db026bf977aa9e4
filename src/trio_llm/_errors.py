"""The exceptions raised by trio-llm, and the one place that maps HTTP failures to them.

The tree::

    LLMError
    ├── ConfigurationError          bad or missing settings (no API key, no model, bad URL)
    ├── RetryDeadlineExceeded       the call's deadline passed (chains the last error)
    ├── APIResponseError            a success status, but a body that cannot be parsed
    ├── APIConnectionError          the request did not get an HTTP response
    │   └── APITimeoutError         ... because a connect/read/write/pool timeout expired
    ├── StreamError                 a streamed reply failed after its first event
    ├── BatchInputError             a batch file has an invalid line (path, line, reason)
    ├── StructuredOutputError       a reply still did not match its schema after repairs
    ├── CacheError                  a response cache cannot be used (corrupt, newer format)
    │   └── CacheMissError          a replay-only cache has no reply for a request
    └── APIStatusError              the server answered with a 4xx or 5xx status
        ├── BadRequestError         400
        ├── AuthenticationError     401
        ├── PermissionDeniedError   403
        ├── NotFoundError           404
        ├── ConflictError           409
        ├── UnprocessableEntityError 422
        ├── RateLimitError          429 (``retry_after``)
        └── ServerError             >= 500

Every error raised from an HTTP exchange is built here, from httpx2's exceptions
(:func:`error_from_transport`) or from a response (:func:`error_from_response`), so
that no API key or other request header ever reaches a message.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from typing import Any, final
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx2

__all__ = [
    "APIConnectionError",
    "APIResponseError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchInputError",
    "CacheError",
    "CacheMissError",
    "ConfigurationError",
    "ConflictError",
    "LLMError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryDeadlineExceeded",
    "ServerError",
    "StreamError",
    "StructuredOutputError",
    "UnprocessableEntityError",
    "error_from_response",
    "error_from_transport",
    "parse_retry_after",
    "redact_url",
]


class LLMError(Exception):
    """Base class of every exception trio-llm raises on purpose."""


@final
class ConfigurationError(LLMError, ValueError):
    """A setting is missing or invalid (no API key for a remote server, no model, ...)."""


@final
class RetryDeadlineExceeded(LLMError):
    """The call's retry deadline passed before it could succeed.

    The last attempt's error, if there was one, is chained as ``__cause__``.

    Attributes:
        deadline: the deadline, in seconds.
        attempts: how many attempts were started.
        last_error: the last attempt's error (``None`` if the first attempt was cut short).
    """

    def __init__(
        self, message: str, *, deadline: float, attempts: int, last_error: LLMError | None
    ) -> None:
        super().__init__(message)
        self.deadline = deadline
        self.attempts = attempts
        self.last_error = last_error


@final
class APIResponseError(LLMError):
    """The server answered with a success status but a body that is not valid for the API.

    Attributes:
        status_code: the HTTP status.
        request_id: the server's request id (``x-request-id`` for OpenAI, ``request-id``
            for Anthropic), if any.
    """

    def __init__(self, message: str, *, status_code: int, request_id: str | None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.request_id = request_id


class APIConnectionError(LLMError):
    """The request did not get an HTTP response: connection refused, reset or cut.

    Attributes:
        method: the HTTP method of the failed request.
        url: the URL of the failed request.
    """

    def __init__(self, message: str, *, method: str = "", url: str = "") -> None:
        super().__init__(message)
        self.method = method
        self.url = url


@final
class APITimeoutError(APIConnectionError):
    """A connect, read, write or pool timeout expired before the response arrived."""


@final
class StreamError(LLMError):
    """A streamed reply failed after its first event arrived.

    Raised for an ``error`` payload inside the stream, a connection cut mid-stream, a
    stream that ends without ``[DONE]`` or a finish reason, a malformed event, and a
    ``stream_idle`` timeout between events. It is not retried: the caller has already
    seen part of the reply.

    Attributes:
        text_so_far: the text received before the failure (the first choice's).
        error_body: the ``error`` object the server sent in the stream, if it sent one.
    """

    def __init__(self, message: str, *, text_so_far: str = "", error_body: object = None) -> None:
        super().__init__(message)
        self.text_so_far = text_so_far
        self.error_body = error_body


@final
class BatchInputError(LLMError):
    """A batch file has an invalid line; raised before any request of the batch is sent.

    The attributes describe the first invalid line; the message lists the first few and
    says how many there are in all.

    Attributes:
        path: the file (the input file, or an output file that is not batch output).
        line: the 1-based number of the first invalid line.
        reason: what is wrong with that line.
        custom_id: that line's ``custom_id``, when it has a usable one.
        invalid_lines: how many invalid lines the file holds (at least 1).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        line: int,
        reason: str,
        custom_id: str | None = None,
        invalid_lines: int = 1,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.reason = reason
        self.custom_id = custom_id
        self.invalid_lines = invalid_lines


@final
class StructuredOutputError(LLMError):
    """A structured reply did not parse or match its schema, even after the repair attempts.

    Attributes:
        raw_text: the last reply's text, as the model sent it.
        errors: the problem found in each attempt's reply, in order.
    """

    def __init__(self, message: str, *, raw_text: str, errors: list[str]) -> None:
        super().__init__(message)
        self.raw_text = raw_text
        self.errors = errors


class CacheError(LLMError):
    """A response cache cannot be used: its file is corrupt, of a newer format, or unopenable.

    Raised when the cache is opened, before any request, never in the middle of a job.

    Attributes:
        path: the cache file, when the cache is one.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


@final
class CacheMissError(CacheError):
    """A replay-only cache has no recorded reply for a request (nothing was sent).

    Raised by :func:`trio_llm.testing.open_replay_client` when a test makes a request
    that was not recorded.

    Attributes:
        key: the request's cache key.
    """

    def __init__(self, message: str, *, key: str, path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.key = key


class APIStatusError(LLMError):
    """The server answered with an error status.

    Attributes:
        status_code: the HTTP status.
        message: the server's own error message, or the reason phrase.
        body: the decoded JSON error body (``None`` if it was not JSON).
        request_id: the server's request id (``x-request-id`` for OpenAI, ``request-id``
            for Anthropic), if any.
        error_type: ``error.type`` from the body, if any.
        code: ``error.code`` from the body, if any.
        retry_after: seconds the server asked us to wait (``retry-after-ms`` or
            ``retry-after``), if it said.
        should_retry: the server's ``x-should-retry`` verdict (``True``/``False``), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: object = None,
        request_id: str | None = None,
        error_type: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        self.retry_after = retry_after
        self.should_retry = should_retry
        self.status_code = status_code
        self.message = message
        self.body = body
        self.request_id = request_id
        self.error_type = error_type
        self.code = code
        details = [f"type={error_type}"] if error_type else []
        if code:
            details.append(f"code={code}")
        if request_id:
            details.append(f"request_id={request_id}")
        suffix = f" ({', '.join(details)})" if details else ""
        super().__init__(f"HTTP {status_code}: {message}{suffix}")


@final
class BadRequestError(APIStatusError):
    """400: the request was malformed or invalid for this server."""


@final
class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


@final
class PermissionDeniedError(APIStatusError):
    """403: the key may not use this resource."""


@final
class NotFoundError(APIStatusError):
    """404: unknown endpoint or model."""


@final
class ConflictError(APIStatusError):
    """409: the request conflicts with the resource's state (retryable)."""


@final
class UnprocessableEntityError(APIStatusError):
    """422: the request was understood but cannot be processed."""


@final
class RateLimitError(APIStatusError):
    """429: a rate limit or quota was exceeded (see ``retry_after``)."""


@final
class ServerError(APIStatusError):
    """A 5xx status: the server failed (500, 502, 503, 504, Anthropic's 529, ...)."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
}

# Cap on a server-requested wait, as the official SDKs do: a bogus header must not park a job.
_MAX_RETRY_AFTER = 600.0


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Return the wait the server asked for, in seconds, or ``None``.

    Reads ``retry-after-ms`` first, then ``retry-after`` as seconds or as an HTTP date.
    Negative, unparsable or absurd (> 10 minutes) values are ignored.
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            seconds = float(value) / 1000.0
        except ValueError:
            seconds = -1.0
        if 0 <= seconds <= _MAX_RETRY_AFTER:
            return seconds
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        seconds = max(seconds, 0.0)
    if 0 <= seconds <= _MAX_RETRY_AFTER:
        return seconds
    return None


def error_from_response(
    status_code: int,
    headers: Mapping[str, str],
    content: bytes,
    *,
    reason: str = "",
    request_id: str | None,
) -> APIStatusError:
    """Build the most specific :class:`APIStatusError` for an error response.

    Args:
        status_code: the response's status (>= 400).
        headers: its headers, for the generic ``retry-after-ms``, ``retry-after`` and
            ``x-should-retry`` (lower-case keys, or ``httpx2.Headers``).
        content: its body: a JSON error object in any of the usual shapes, or text.
        reason: the reason phrase, the message when the body gives none.
        request_id: the server's request id, as the provider adapter reads it
            (``Provider.request_id``).
    """
    body: object = None
    message = reason or "error"
    error_type: str | None = None
    code: str | None = None
    try:
        body = json.loads(content) if content else None
    except ValueError:
        text = content[:500].decode("utf-8", "replace").strip()
        if text:
            message = text
    if isinstance(body, dict):
        # OpenAI: {"error": {...}}; Anthropic: {"type": "error", "error": {...}};
        # some servers: {"error": "text"} or {"message": "text"} or {"detail": ...}.
        error = body.get("error", body)
        if isinstance(error, dict):
            found = error.get("message") or error.get("detail")
            if found:
                message = str(found)
            if isinstance(error.get("type"), str) and error["type"] != "error":
                error_type = error["type"]
            if error.get("code") is not None:
                code = str(error["code"])
        elif isinstance(error, str) and error:
            message = error
    should_retry = {"true": True, "false": False}.get(headers.get("x-should-retry", ""))
    fields: dict[str, Any] = {
        "status_code": status_code,
        "body": body,
        "request_id": request_id,
        "error_type": error_type,
        "code": code,
        "retry_after": parse_retry_after(headers),
        "should_retry": should_retry,
    }
    if status_code == 429:
        return RateLimitError(message, **fields)
    if status_code >= 500:
        return ServerError(message, **fields)
    return _STATUS_ERRORS.get(status_code, APIStatusError)(message, **fields)


def error_from_transport(exc: httpx2.HTTPError, *, method: str, url: str) -> LLMError:
    """Translate an httpx2 exception raised while sending into our error tree."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx2.TimeoutException):
        kind = type(exc).__name__  # ConnectTimeout, ReadTimeout, WriteTimeout, PoolTimeout
        return APITimeoutError(f"{kind} on {method} {url}: {detail}", method=method, url=url)
    return APIConnectionError(
        f"Connection error on {method} {url}: {type(exc).__name__}: {detail}",
        method=method,
        url=url,
    )


# Query parameters whose values are secrets, by name (api_key, access_token, sig, ...).
_SECRET_PARAMETER = re.compile(r"key|token|secret|password|passwd|sig|auth|credential", re.I)


_USERINFO = re.compile(r"//[^/?#]*@")


def redact_url(url: str) -> str:
    """Return ``url`` fit to print: no userinfo, no secret-looking query parameter values.

    ``http://user:pw@host/v1?api_key=k&x=1`` becomes ``http://***@host/v1?api_key=***&x=1``
    (the whole userinfo goes: a key is often the user name, with an empty password).
    Every URL the library prints or writes (errors, logs, reprs, batch output) passes here.
    Never raises: a URL that does not parse has everything up to its host hidden.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub("//***@", url.split("?", 1)[0])
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            name, equals, _value = pair.partition("=")
            secret = equals and _SECRET_PARAMETER.search(unquote(name))
            pairs.append(f"{name}=***" if secret else pair)
        query = "&".join(pairs)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
