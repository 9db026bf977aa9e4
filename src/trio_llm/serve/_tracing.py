"""The gateway continues its callers' traces: an incoming ``traceparent`` is the parent.

Only when OpenTelemetry is configured (see :mod:`trio_llm._telemetry`); otherwise the
middleware passes requests through untouched. A span already current (an ASGI
instrumentation wrapping the app has made one for the request) is left as the parent.
"""

from __future__ import annotations

from typing import final

from starlette.types import ASGIApp, Receive, Scope, Send

from .._telemetry import instruments

__all__ = ["ContinueTrace"]

# The W3C Trace Context headers.
_TRACE_HEADERS = (b"traceparent", b"tracestate")


@final
class ContinueTrace:
    """Pure ASGI middleware: handle each request in the trace its headers name."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or instruments() is None:
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _TRACE_HEADERS
        }
        from opentelemetry import context, propagate, trace

        if not carrier or trace.get_current_span().get_span_context().is_valid:
            await self.app(scope, receive, send)
            return
        token = context.attach(propagate.extract(carrier))
        try:
            await self.app(scope, receive, send)
        finally:
            context.detach(token)
