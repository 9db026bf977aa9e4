"""What the gateway reads from a request: its JSON body, its fields, and its refusals.

:class:`GatewayError` is an error the gateway answers with itself; the app turns it into
the OpenAI-shaped error body.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    # Typing only: `trio-llm serve`'s flags import the limits below, and must load
    # without the optional serve extra (FastAPI, Starlette) installed.
    from starlette.requests import Request

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "GatewayError",
    "body_params",
    "check_model",
    "read_json",
    "require",
]

# Larger request bodies are refused with 413 (`create_app(max_body_bytes=...)`).
DEFAULT_MAX_BODY_BYTES: Final = 4 * 1024 * 1024
# Deeper request JSON is refused with 400: far beyond any real request (OpenAI allows 10
# levels of schema nesting), far below the recursion limit of what later walks the body
# (the client's token estimate and JSON encoder, the upstream's decoder).
MAX_JSON_DEPTH: Final = 100


class GatewayError(Exception):
    """An error the gateway answers with itself (bad request, auth, body too large)."""

    def __init__(
        self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """Read the body (at most ``limit`` bytes) and decode a JSON object from it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise GatewayError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    parts = []
    size = 0
    # aclosing: leaving early (413) must close Starlette's generator here, not in the GC.
    async with aclosing(request.stream()) as stream:
        async for part in stream:
            size += len(part)
            if size > limit:
                raise GatewayError(
                    413, f"request body exceeds {limit} bytes", code="request_too_large"
                )
            parts.append(part)
    raw = b"".join(parts)
    too_deep = GatewayError(
        400, f"request body nests JSON deeper than {MAX_JSON_DEPTH} levels", code=None
    )
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc}", code=None) from None
    except RecursionError:
        raise too_deep from None
    if not isinstance(body, dict):
        raise GatewayError(400, "request body must be a JSON object", code=None)
    # Fewer brackets than the limit cannot nest deeper: most bodies skip the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(body, MAX_JSON_DEPTH):
        raise too_deep
    return body


def _deeper_than(value: dict[str, Any], limit: int) -> bool:
    """Return whether ``value`` nests lists and objects more than ``limit`` levels deep.

    Level by level rather than recursively, so that no depth can exhaust the stack.
    """
    level: list[dict[str, Any] | list[Any]] = [value]
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return True


def require(body: Mapping[str, Any], name: str, check: Callable[[Any], bool], what: str) -> Any:
    """Return ``body[name]`` if it passes ``check``; 422 (described as ``what``) if not."""
    value = body.get(name)
    if not check(value):
        message = f"'{name}' is required" if value is None else f"'{name}' must be {what}"
        raise GatewayError(422, message, code="invalid_value")
    return value


def check_model(body: Mapping[str, Any]) -> str | None:
    """Return the ``model`` the body names, or ``None``; 422 if it is not a string."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise GatewayError(422, "'model' must be a string", code="invalid_value")
    return model


# Arguments of the client's methods: as body fields they would not reach the upstream.
_CLIENT_ARGUMENTS: Final = frozenset({"retry", "prompt_or_messages", "texts"})


def body_params(body: Mapping[str, Any], *taken: str) -> dict[str, Any]:
    """Return the body's other fields, to pass to the upstream request as they are.

    Raises:
        GatewayError: a field is named like an argument of the client's methods (``retry``
            would set the gateway's retry policy, not a request field): 422.
    """
    params = {key: value for key, value in body.items() if key not in taken}
    clash = sorted(_CLIENT_ARGUMENTS.intersection(params))
    if clash:
        raise GatewayError(
            422, f"unsupported request field {clash[0]!r}", code="unsupported_parameter"
        )
    return params
