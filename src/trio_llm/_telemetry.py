"""OpenTelemetry: a span per call, a span per attempt, and the GenAI client metrics.

Optional (the ``otel`` extra: ``opentelemetry-api``). Nothing here imports OpenTelemetry
unless the program already did: :func:`instruments`, the one check on the hot path, looks
for ``opentelemetry.trace`` or ``opentelemetry.metrics`` in ``sys.modules`` (one cannot
set a provider without importing them), then asks for the global providers, so a provider
set after ``import trio_llm`` is used from the next call on. With no provider set (the
API's proxy or no-op providers), calls are not traced and cost nothing more.

What is recorded, by the OpenTelemetry semantic conventions for generative AI:

* one span per call, kind ``CLIENT``, named ``"{operation} {model}"`` (``chat
  gpt-4o-mini``, ``embeddings text-embedding-3-small``), from the call to its result (for a
  stream: until the stream is closed), with ``gen_ai.*`` request and response attributes,
  the usage, ``gen_ai.response.time_to_first_chunk`` for streams, ``trio_llm.cost_usd``,
  ``error.type`` on failure, and an event ``retry`` per retry decided;
* under it, one span per HTTP attempt (the HTTP conventions: ``POST``, ``server.address``,
  ``http.response.status_code``, ``http.request.resend_count`` for retries; and
  ``trio_llm.endpoint``, the name of the endpoint it was sent to), so retries, failovers
  and the waits between them show as separate spans and gaps;
* the histograms ``gen_ai.client.operation.duration``, ``gen_ai.client.token.usage`` and,
  for streams, ``gen_ai.client.operation.time_to_first_chunk``.

Prompts and replies are recorded only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``
is ``true`` (the variable other GenAI instrumentations read), as ``gen_ai.input.messages``,
``gen_ai.system_instructions`` and ``gen_ai.output.messages``.

The spans are set as the current span of the task making the call, and each attempt
sends a ``traceparent`` header: work done on the call's behalf (a trio-llm gateway
upstream) joins the trace. Trio copies the context into each task it starts, so calls made
by ``chat_many``'s workers inside a caller's span are children of that span.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Final, TypeVar, final
from urllib.parse import urlsplit

from . import _json
from ._config import RetryPolicy
from ._errors import APIStatusError, LLMError
from ._retry import Stats, call_with_retries
from ._telemetry_content import capture_content, input_messages, output_message
from ._types import ChatResponse, EmbeddingResponse
from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram, Meter
    from opentelemetry.trace import Span, Tracer

    from ._exchange import Exchange
    from ._request import Request
    from ._routing import Route

__all__ = ["CallTrace", "Instruments", "instruments"]

T = TypeVar("T")

_modules = sys.modules
_now = time.perf_counter


# The semantic conventions' advised bucket boundaries.
_SECONDS_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92
)  # fmt: skip
_TOKEN_BUCKETS: Final = tuple(4**power for power in range(14))  # 1, 4, 16, ... 67108864

# Request fields recorded as gen_ai.request.* attributes when they are numbers.
_REQUEST_NUMBERS: Final = {
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "seed": "gen_ai.request.seed",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "n": "gen_ai.request.choice.count",
}


def instruments() -> Instruments | None:
    """Return what to record calls with now, or ``None`` when nothing is configured.

    Costs two dictionary lookups when the program never imported OpenTelemetry.
    """
    if "opentelemetry.trace" not in _modules and "opentelemetry.metrics" not in _modules:
        return None
    return _STATE.current()


@final
class _State:
    """The global providers last seen, and the instruments made from them."""

    __slots__ = ("_checked_env", "instruments", "meter_provider", "tracer_provider")

    def __init__(self) -> None:
        self.tracer_provider: object = _State  # never a provider: the first call looks
        self.meter_provider: object = _State
        self.instruments: Instruments | None = None
        self._checked_env = False

    def current(self) -> Instruments | None:
        if not self._checked_env:
            self._load_from_environment()
        tracer_provider = _global("opentelemetry.trace", "_TRACER_PROVIDER", "get_tracer_provider")
        meter_provider = _global(
            "opentelemetry.metrics._internal", "_METER_PROVIDER", "get_meter_provider"
        )
        if tracer_provider is self.tracer_provider and meter_provider is self.meter_provider:
            return self.instruments
        self.tracer_provider, self.meter_provider = tracer_provider, meter_provider
        self.instruments = _instruments_for(tracer_provider, meter_provider)
        return self.instruments

    def _load_from_environment(self) -> None:
        """Load providers named by ``OTEL_PYTHON_{TRACER,METER}_PROVIDER``, once.

        The API loads them on the first ``get_*_provider()`` call, which nothing else may
        make; later calls read the globals it sets.
        """
        self._checked_env = True
        for variable, module, getter in (
            ("OTEL_PYTHON_TRACER_PROVIDER", "opentelemetry.trace", "get_tracer_provider"),
            ("OTEL_PYTHON_METER_PROVIDER", "opentelemetry.metrics", "get_meter_provider"),
        ):
            found = _modules.get(module)
            if found is not None and os.environ.get(variable):
                getattr(found, getter)()


def _global(module_name: str, name: str, getter: str) -> object:
    """Return the global provider the module holds: ``None`` when it is not set.

    Read from the API's module global, as its ``get_*_provider()`` does, without the
    environment lookup each of those calls makes (~1 us: a per-call cost when nothing is
    configured); through the public getter if an API version names it otherwise.
    """
    module = _modules.get(module_name)
    if module is None:
        return None
    provider = getattr(module, name, _State)
    if provider is _State:  # pragma: no cover - an API without the global: ask it
        module = _modules[module_name.removesuffix("._internal")]
        return getattr(module, getter)()
    return provider


_STATE: Final = _State()


def _instruments_for(tracer_provider: object, meter_provider: object) -> Instruments | None:
    """Make the instruments of the providers set, or ``None`` when neither is real."""
    tracer: Tracer | None = None
    meter: Meter | None = None
    if tracer_provider is not None:
        from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, TracerProvider

        if isinstance(tracer_provider, TracerProvider) and not isinstance(
            tracer_provider, (ProxyTracerProvider, NoOpTracerProvider)
        ):
            tracer = tracer_provider.get_tracer("trio_llm", __version__)
    if meter_provider is not None:
        from opentelemetry.metrics import MeterProvider, NoOpMeterProvider

        if (
            isinstance(meter_provider, MeterProvider)
            and not isinstance(meter_provider, NoOpMeterProvider)
            and not _is_proxy_meter_provider(meter_provider)
        ):
            meter = meter_provider.get_meter("trio_llm", __version__)
    if tracer is None and meter is None:
        return None
    return Instruments(tracer, meter)


def _is_proxy_meter_provider(provider: object) -> bool:
    """Whether ``provider`` is the API's stand-in for a meter provider not set yet."""
    try:
        from opentelemetry.metrics._internal import _ProxyMeterProvider
    except ImportError:  # pragma: no cover - a future API; then it counts as set
        return False
    return isinstance(provider, _ProxyMeterProvider)


@final
class Instruments:
    """A tracer and the GenAI histograms (either may be missing), made once per provider."""

    __slots__ = ("_servers", "duration", "first_chunk", "inject", "token_usage", "tracer")

    def __init__(self, tracer: Tracer | None, meter: Meter | None) -> None:
        self.tracer = tracer
        self.duration: Histogram | None = None
        self.token_usage: Histogram | None = None
        self.first_chunk: Histogram | None = None
        if meter is not None:
            self.duration = meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
            )
            self.token_usage = meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
            )
            self.first_chunk = meter.create_histogram(
                "gen_ai.client.operation.time_to_first_chunk",
                unit="s",
                description="Time to the first chunk of a streamed response.",
                explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
            )
        self.inject: Callable[[dict[str, str]], None] | None = None
        if tracer is not None:
            from opentelemetry.propagate import inject

            self.inject = inject
        self._servers: dict[str, tuple[str, int | None]] = {}

    def server(self, url: str) -> tuple[str, int | None]:
        """Return the host and port of ``url`` (looked up once per URL)."""
        found = self._servers.get(url)
        if found is None:
            parts = urlsplit(url)
            found = self._servers[url] = (parts.hostname or "", parts.port)
        return found

    def call(self, request: Request, body: Mapping[str, Any], *, provider: str) -> CallTrace:
        """Return the trace of one call about to be made (nothing is started yet)."""
        # An embeddings body has an input and no messages (as trio_llm._estimate tells).
        embeddings = "input" in body and "messages" not in body
        operation = "embeddings" if embeddings else "chat"
        return CallTrace(self, request, body, provider=provider, operation=operation)


def _error_type(error: BaseException) -> str:
    return type(error).__name__


@final
class _TracedStats:
    """The retry loop's statistics, counted by the client, and told to the call's span."""

    __slots__ = ("_stats", "_trace")

    def __init__(self, stats: Stats, trace: CallTrace) -> None:
        self._stats = stats
        self._trace = trace

    def count_retry(self, error: LLMError) -> None:
        self._stats.count_retry(error)
        self._trace.retrying(error)

    def count_failure(self, error: LLMError) -> None:
        self._stats.count_failure(error)


@final
class CallTrace:
    """One call's span, its attempts' spans and its metrics.

    Made by :meth:`Instruments.call` when the call's request is built; the lifecycle
    (:mod:`trio_llm._attempt`) runs the call through :meth:`run`, each attempt through
    :meth:`attempt`, and reports the reply (:meth:`replied`), a stream's failure
    (:meth:`failed`) and its end (:meth:`closed`).
    """

    __slots__ = (
        "_attempt_span",
        "_attempts",
        "_error",
        "_instruments",
        "_metric_attributes",
        "_pending",
        "_request",
        "_route",
        "_span",
        "_started",
        "_streaming",
    )

    def __init__(
        self,
        instruments: Instruments,
        request: Request,
        body: Mapping[str, Any],
        *,
        provider: str,
        operation: str,
    ) -> None:
        self._instruments = instruments
        self._request = request
        model = body.get("model")
        model = model if isinstance(model, str) else ""
        # The endpoint the call most likely goes to; sending() says where it went.
        self._route = route = request.route
        host, port = instruments.server(request.url)
        common: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "server.address": host,
            "trio_llm.endpoint": route.name,
        }
        if port is not None:
            common["server.port"] = port
        self._metric_attributes = common
        self._span: Span | None = None
        self._attempt_span: Span | None = None
        self._attempts = 0
        self._started = 0.0
        self._streaming = False
        self._error: BaseException | None = None
        # The span to start, by run(): (tracer, name, attributes).
        self._pending: tuple[Tracer, str, dict[str, Any]] | None = None
        tracer = instruments.tracer
        if tracer is not None:
            attributes = dict(common)
            for field, name in _REQUEST_NUMBERS.items():
                value = body.get(field)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    attributes[name] = value
            stop = body.get("stop", body.get("stop_sequences"))
            if isinstance(stop, str):
                stop = [stop]
            if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
                attributes["gen_ai.request.stop_sequences"] = stop
            if capture_content():
                attributes.update(input_messages(body))
            self._pending = (tracer, f"{operation} {model}".strip(), attributes)

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        policy: RetryPolicy | None,
        stats: Stats,
    ) -> T:
        """Run the call's attempts under ``policy`` (``call_with_retries``), traced.

        For a stream, the span stays open when this returns: :meth:`closed` ends it.
        """
        request = self._request
        self._started = _now()
        span = None
        pending = self._pending
        if pending is not None:
            from opentelemetry.trace import SpanKind, use_span

            tracer, name, attributes = pending
            span = self._span = tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
            scope: Any = use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            )
        else:
            scope = nullcontext()
        with scope:
            try:
                result = await call_with_retries(
                    attempt, policy, call=request, stats=_TracedStats(stats, self)
                )
            except BaseException as exc:
                self._end(exc)
                raise
        if request.stream:
            self._streaming = True
            seconds = _now() - self._started
            if span is not None:
                span.set_attribute("gen_ai.response.time_to_first_chunk", seconds)
            first_chunk = self._instruments.first_chunk
            if first_chunk is not None:
                first_chunk.record(seconds, self._metric_attributes)
        else:
            self._end(None)
        return result

    async def attempt(
        self,
        send: Callable[[Request, Callable[[Exchange], Awaitable[T]]], Awaitable[T]],
        request: Request,
        read: Callable[[Exchange], Awaitable[T]],
    ) -> T:
        """Make one attempt (``send(request, read)``: ``Requester.attempt``) in its span."""
        tracer = self._instruments.tracer
        self._attempts += 1
        if tracer is None:
            return await send(request, read)
        from opentelemetry.trace import SpanKind, use_span

        # The endpoint is not chosen yet: sending() sets its attributes.
        attributes: dict[str, Any] = {"http.request.method": "POST"}
        if self._attempts > 1:
            attributes["http.request.resend_count"] = self._attempts - 1
        span = self._attempt_span = tracer.start_span(
            "POST", kind=SpanKind.CLIENT, attributes=attributes
        )

        async def read_traced(exchange: Exchange) -> T:
            span.set_attribute("http.response.status_code", exchange.status_code)
            return await read(exchange)

        with use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            try:
                result = await send(request, read_traced)
            except BaseException as exc:
                self._attempt_span = None
                if isinstance(exc, APIStatusError):
                    span.set_attribute("http.response.status_code", exc.status_code)
                    error_type = str(exc.status_code)
                else:
                    error_type = _error_type(exc)
                _fail_span(span, exc, error_type)
                span.end()
                raise
        if not request.stream:
            self._attempt_span = None
            span.end()
        return result

    def sending(self, route: Route) -> dict[str, str]:
        """Record that the attempt goes to ``route``; return its headers (``traceparent``).

        The attempt's span gets the endpoint's name (``trio_llm.endpoint``), address and
        URL; the call's span and metrics the latest endpoint's, when it is not the one
        the call was first addressed to (a failover, say).
        """
        request = self._request
        host, port = self._instruments.server(request.url)
        if route is not self._route:
            self._route = route
            common = self._metric_attributes
            common["gen_ai.provider.name"] = route.provider.name
            common["gen_ai.request.model"] = request.model
            common["server.address"] = host
            common["trio_llm.endpoint"] = route.name
            if port is None:
                common.pop("server.port", None)
            else:
                common["server.port"] = port
            if self._span is not None:
                self._span.set_attributes(common)
        span = self._attempt_span
        if span is None:
            return {}
        attributes: dict[str, Any] = {
            "server.address": host,
            "trio_llm.endpoint": route.name,
            "url.full": request.shown_url,
        }
        if port is not None:
            attributes["server.port"] = port
        span.set_attributes(attributes)
        return self.headers()

    def headers(self) -> dict[str, str]:
        """Return the headers that carry the current span to the server (``traceparent``)."""
        carrier: dict[str, str] = {}
        inject = self._instruments.inject
        if inject is not None:
            inject(carrier)
        return carrier

    def retrying(self, error: LLMError) -> None:
        """Record that a retry was decided after ``error``."""
        span = self._span
        if span is None:
            return
        attributes: dict[str, Any] = {
            "error.type": _error_type(error),
            "trio_llm.attempt": self._attempts,
        }
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, (int, float)):
            attributes["trio_llm.retry_after"] = float(retry_after)
        span.add_event("retry", attributes)

    def replied(self, reply: ChatResponse | EmbeddingResponse) -> None:
        """Record a reply: its id, model, finish reasons, usage and cost."""
        usage = reply.usage
        if reply.model:
            self._metric_attributes["gen_ai.response.model"] = reply.model
        token_usage = self._instruments.token_usage
        if token_usage is not None:
            for kind, count in (
                ("input", usage.prompt_tokens),
                ("output", usage.completion_tokens),
            ):
                if count or kind == "input":
                    token_usage.record(
                        count, {**self._metric_attributes, "gen_ai.token.type": kind}
                    )
        span = self._span
        if span is None:
            return
        attributes: dict[str, Any] = {
            "gen_ai.usage.input_tokens": usage.prompt_tokens,
            "gen_ai.usage.output_tokens": usage.completion_tokens,
        }
        if reply.model:
            attributes["gen_ai.response.model"] = reply.model
        if usage.cache_read_tokens:
            attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_tokens
        if usage.cache_write_tokens:
            attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
        if reply.cost is not None:
            attributes["trio_llm.cost_usd"] = reply.cost
        if isinstance(reply, ChatResponse):
            if reply.id:
                attributes["gen_ai.response.id"] = reply.id
            attributes["gen_ai.response.finish_reasons"] = [
                choice.finish_reason for choice in reply.choices if choice.finish_reason
            ]
            if capture_content():
                attributes["gen_ai.output.messages"] = _json.dumps(
                    [output_message(choice) for choice in reply.choices]
                ).decode()
        span.set_attributes(attributes)

    def failed(self, error: BaseException) -> None:
        """Record that a stream failed after its first event (ended by :meth:`closed`)."""
        self._error = error

    def closed(self) -> None:
        """End a stream's spans once it is closed (nothing for an attempt that failed)."""
        if not self._streaming:
            return
        self._streaming = False
        span = self._attempt_span
        if span is not None:
            self._attempt_span = None
            if self._error is not None:
                _fail_span(span, self._error, _error_type(self._error))
            span.end()
        self._end(self._error)

    def _end(self, error: BaseException | None) -> None:
        """End the call: record its duration, and end its span."""
        attributes = self._metric_attributes
        if error is not None:
            attributes = {**attributes, "error.type": _error_type(error)}
        duration = self._instruments.duration
        if duration is not None:
            duration.record(_now() - self._started, attributes)
        span = self._span
        if span is not None:
            if error is not None:
                _fail_span(span, error, _error_type(error))
            span.end()


def _fail_span(span: Span, error: BaseException, error_type: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    if isinstance(error, Exception):
        span.record_exception(error)
