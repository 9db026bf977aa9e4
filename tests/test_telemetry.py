"""OpenTelemetry: GenAI spans and metrics, checked with the SDK's in-memory exporters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx2
import pytest
import trio

import trio_llm
from trio_llm._routing import CHAT
from trio_llm._telemetry_content import input_messages
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import metrics, trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

MODEL = "gpt-4o-mini"


def _reset_globals() -> None:
    """Forget the global providers (as opentelemetry's own test utilities do)."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None


@attrs.define
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for found in scope.metrics
            if found.name == metric
            for point in found.data.data_points
        ]


@pytest.fixture
def otel() -> Iterator[Otel]:
    """Global SDK providers with in-memory exporters, set after trio_llm was imported."""
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    meter_provider = MeterProvider(metric_readers=[reader])
    _reset_globals()
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    try:
        yield Otel(spans, reader)
    finally:
        _reset_globals()
        tracer_provider.shutdown()
        meter_provider.shutdown()


def only(spans: list[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


async def test_a_chat_call_is_a_client_span_with_genai_attributes(
    otel: Otel, fake_llm: FakeLLMServer
) -> None:
    """One CLIENT span "chat MODEL" per call, with the GenAI attributes, over one POST span."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model=MODEL) as client:
        reply = await client.chat("Hello?", max_tokens=50, temperature=0.5)
    call = only(otel.finished(f"chat {MODEL}"))
    assert call.kind is SpanKind.CLIENT
    attributes = dict(call.attributes or {})
    port = int(fake_llm.base_url.split(":")[2].split("/")[0])
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": MODEL,
        "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.5,
        "server.address": "127.0.0.1",
        "server.port": port,
        "trio_llm.endpoint": f"127.0.0.1:{port}",
        "gen_ai.response.model": MODEL,
        "gen_ai.response.id": reply.id,
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": reply.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": reply.usage.completion_tokens,
        "trio_llm.cost_usd": reply.cost,
    }
    assert call.status.status_code is StatusCode.UNSET
    attempt = only(otel.finished("POST"))
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.parent is not None
    assert attempt.parent.span_id == call.context.span_id
    assert attempt.attributes is not None
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["url.full"] == fake_llm.base_url + "/chat/completions"
    assert attempt.attributes["trio_llm.endpoint"] == f"127.0.0.1:{port}"
    assert attempt.attributes["server.port"] == port
    assert "http.request.resend_count" not in attempt.attributes
    assert "gen_ai.input.messages" not in attributes  # content only when opted in
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 1
    assert dict(duration.attributes)["gen_ai.response.model"] == MODEL
    assert "error.type" not in duration.attributes
    usage = {
        dict(p.attributes)["gen_ai.token.type"]: p.sum
        for p in otel.points("gen_ai.client.token.usage")
    }
    assert usage == {"input": reply.usage.prompt_tokens, "output": reply.usage.completion_tokens}


async def test_a_stream_spans_until_it_is_closed(otel: Otel, fake_llm: FakeLLMServer) -> None:
    """A stream's span ends when its block is left, with its time to first chunk and usage."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model=MODEL) as client:
        async with client.stream("Tell me about rivers.") as stream:
            async for _ in stream:
                assert otel.finished() == []  # still open while it streams
        reply = stream.response
    call = only(otel.finished(f"chat {MODEL}"))
    attributes = call.attributes or {}
    assert attributes["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    first_chunk = attributes["gen_ai.response.time_to_first_chunk"]
    assert isinstance(first_chunk, float)
    assert call.end_time is not None
    assert call.start_time is not None
    assert 0 < first_chunk <= (call.end_time - call.start_time) / 1e9
    attempt = only(otel.finished("POST"))
    assert attempt.end_time is not None
    assert attempt.end_time <= call.end_time
    (point,) = otel.points("gen_ai.client.operation.time_to_first_chunk")
    assert point.count == 1


async def test_retries_show_as_attempts_and_events(
    otel: Otel, autojump_clock: trio.abc.Clock
) -> None:
    """A retried call: a retry event, and one POST span per attempt (503, then 200)."""
    replies = iter([503, 200])
    seen: list[httpx2.Request] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        status = next(replies)
        if status != 200:
            return httpx2.Response(status, json={"error": {"message": "busy"}})
        body = {
            "id": "chatcmpl-9",
            "model": MODEL,
            "choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        return httpx2.Response(200, json=body)

    policy = trio_llm.RetryPolicy(attempts=3, wait_initial=1.0, wait_jitter=0)
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1",
        model=MODEL,
        transport=httpx2.MockTransport(handle),
        retry=policy,
    ) as client:
        await client.chat("Hi")
    call = only(otel.finished(f"chat {MODEL}"))
    (event,) = call.events
    assert event.name == "retry"
    assert dict(event.attributes or {}) == {"error.type": "ServerError", "trio_llm.attempt": 1}
    first, second = sorted(otel.finished("POST"), key=lambda s: s.start_time or 0)
    assert first.attributes is not None
    assert second.attributes is not None
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "503"
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1
    assert first.end_time is not None
    assert second.start_time is not None
    assert second.start_time > first.end_time  # the wait between them
    # Each attempt carries its own span to the server.
    for request, span in zip(seen, (first, second), strict=True):
        ids = [f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"]
        assert request.headers["traceparent"].split("-")[1:3] == ids


async def test_a_failover_names_each_attempts_endpoint(
    otel: Otel, autojump_clock: trio.abc.Clock
) -> None:
    """Each POST span carries the endpoint it went to (trio_llm.endpoint, server.address,
    server.port, url.full); the call's span and metrics end on the one that answered, with
    its provider and the model sent there."""
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=503)) as local,
        open_fake_llm() as hosted,
    ):
        endpoints = [
            trio_llm.Endpoint(local.base_url, name="local"),
            trio_llm.Endpoint(
                hosted.root_url,
                name="hosted",
                provider="anthropic",
                model="claude-haiku-4-5",
                priority=1,
            ),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model=MODEL) as client:
            reply = await client.chat("Hi")
    assert reply.endpoint == "hosted"
    first, second = sorted(otel.finished("POST"), key=lambda s: s.start_time or 0)
    for span, server, name, url in (
        (first, local, "local", local.base_url + "/chat/completions"),
        (second, hosted, "hosted", hosted.root_url + "/v1/messages"),
    ):
        attributes = dict(span.attributes or {})
        port = int(server.base_url.split(":")[2].split("/")[0])
        assert attributes["trio_llm.endpoint"] == name
        assert (attributes["server.address"], attributes["server.port"]) == ("127.0.0.1", port)
        assert attributes["url.full"] == url
    assert dict(first.attributes or {})["http.response.status_code"] == 503
    assert dict(second.attributes or {})["http.response.status_code"] == 200
    call = only(otel.finished(f"chat {MODEL}"))  # named for the call as made
    attributes = dict(call.attributes or {})
    assert attributes["trio_llm.endpoint"] == "hosted"
    assert attributes["gen_ai.provider.name"] == "anthropic"
    assert attributes["gen_ai.request.model"] == "claude-haiku-4-5"
    assert attributes["trio_llm.cost_usd"] == reply.cost
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert dict(duration.attributes)["trio_llm.endpoint"] == "hosted"


async def test_a_cache_hit_makes_no_span(
    otel: Otel, fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """A traced call that uses the cache: the miss is spanned, the hit sends nothing."""
    cache = tmp_path / "replies.sqlite"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model=MODEL, cache=cache) as client:
        first = await client.chat("Hi")
        again = await client.chat("Hi")
    assert (first.cached, again.cached, again.cost) == (False, True, 0.0)
    call = only(otel.finished(f"chat {MODEL}"))
    assert dict(call.attributes or {})["trio_llm.cost_usd"] == first.cost
    assert len(otel.finished("POST")) == 1
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 1


async def test_a_failed_call_records_its_error(otel: Otel, fake_llm: FakeLLMServer) -> None:
    """A call that fails: error.type and an ERROR status on its span and duration."""
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=400)) as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL) as client,
    ):
        with pytest.raises(trio_llm.BadRequestError):
            await client.chat("Hi")
    call = only(otel.finished(f"chat {MODEL}"))
    assert call.status.status_code is StatusCode.ERROR
    assert (call.attributes or {})["error.type"] == "BadRequestError"
    assert [event.name for event in call.events] == ["exception"]
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert dict(duration.attributes)["error.type"] == "BadRequestError"
    assert otel.points("gen_ai.client.token.usage") == []


async def test_a_stream_cut_midway_ends_its_span_in_error(otel: Otel) -> None:
    """A stream that breaks after its first event: StreamError on its span when closed."""
    async with (
        open_fake_llm(FakeLLMConfig(disconnect_rate=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL) as client,
    ):

        async def read_all() -> None:
            async with client.stream("Tell me a long story.", max_tokens=40) as stream:
                async for _ in stream:
                    pass

        with pytest.raises(trio_llm.StreamError):
            await read_all()
    call = only(otel.finished(f"chat {MODEL}"))
    assert (call.attributes or {})["error.type"] == "StreamError"
    attempt = only(otel.finished("POST"))
    assert (attempt.attributes or {})["error.type"] == "StreamError"


async def test_chat_many_inside_a_span_gives_child_spans(
    otel: Otel, fake_llm: FakeLLMServer
) -> None:
    """Trio copies the context into each worker: chat_many's calls are the caller's children."""
    tracer = trace.get_tracer("test")
    async with trio_llm.open_client(base_url=fake_llm.base_url, model=MODEL) as client:
        with tracer.start_as_current_span("job") as job:
            results = await client.chat_many([f"Item {i}" for i in range(6)], limit=3)
        await client.chat("Outside")
    assert all(result.ok for result in results)
    calls = otel.finished(f"chat {MODEL}")
    assert len(calls) == 7
    children = [c for c in calls if c.parent and c.parent.span_id == job.get_span_context().span_id]
    assert len(children) == 6
    assert all(c.context.trace_id == job.get_span_context().trace_id for c in children)
    (outside,) = [c for c in calls if c.parent is None]
    assert outside.context.trace_id != job.get_span_context().trace_id


async def test_embeddings_and_anthropic_spans(otel: Otel) -> None:
    """Operation and provider names follow the call: embeddings, and Anthropic's chat."""
    async with open_fake_llm() as server:
        async with trio_llm.open_client(base_url=server.base_url) as client:
            await client.embed(["a", "b"], model="text-embedding-3-small")
        async with trio_llm.open_client(
            base_url=server.root_url, provider="anthropic", model="claude-sonnet-4-5"
        ) as client:
            await client.chat(
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
            )
    embeddings = only(otel.finished("embeddings text-embedding-3-small"))
    assert (embeddings.attributes or {})["gen_ai.operation.name"] == "embeddings"
    assert "gen_ai.response.finish_reasons" not in (embeddings.attributes or {})
    chat = only(otel.finished("chat claude-sonnet-4-5"))
    assert (chat.attributes or {})["gen_ai.provider.name"] == "anthropic"


async def test_content_is_recorded_only_when_asked(
    otel: Otel, fake_llm: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts and replies are recorded with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    async with trio_llm.open_client(base_url=fake_llm.base_url, model=MODEL) as client:
        reply = await client.chat([{"role": "user", "content": "Hello?"}])
    attributes = only(otel.finished(f"chat {MODEL}")).attributes or {}
    assert json.loads(str(attributes["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": "Hello?"}]}
    ]
    assert json.loads(str(attributes["gen_ai.output.messages"])) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": reply.text}],
            "finish_reason": "stop",
        }
    ]


async def test_a_provider_set_after_import_is_picked_up(fake_llm: FakeLLMServer) -> None:
    """No provider: nothing recorded; one set mid-run: the next call is traced."""
    _reset_globals()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    try:
        async with trio_llm.open_client(base_url=fake_llm.base_url, model=MODEL) as client:
            await client.chat("Before")
            assert spans.get_finished_spans() == ()
            trace.set_tracer_provider(provider)
            await client.chat("After")
        assert [s.name for s in spans.get_finished_spans()] == ["POST", f"chat {MODEL}"]
    finally:
        _reset_globals()
        provider.shutdown()


async def test_the_gateway_continues_a_callers_trace(otel: Otel) -> None:
    """A request with a traceparent: the gateway's upstream call joins that trace."""
    from test_serve import open_gateway, open_http

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    async with open_gateway() as gateway, open_http(gateway) as http:
        reply = await http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}]},
            headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        )
        assert reply.status_code == 200
        await http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
    first, second = otel.finished("chat fake-gpt")
    assert f"{first.context.trace_id:032x}" == trace_id
    # Its ancestors up to the caller's span (FastAPI's own server spans may come between).
    by_id = {span.context.span_id: span for span in otel.finished()}
    top = first
    while top.parent is not None and top.parent.span_id in by_id:
        top = by_id[top.parent.span_id]
    assert top.parent is not None
    assert top.parent.is_remote
    assert f"{top.parent.span_id:016x}" == parent
    assert second.context.trace_id != first.context.trace_id  # no traceparent: its own


def test_nothing_is_imported_from_opentelemetry_without_it() -> None:
    """With opentelemetry absent (imports blocked), every path runs and imports none of it."""
    program = textwrap.dedent(
        """
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Blocker())
        import trio
        import trio_llm
        from trio_llm.testing import open_fake_llm

        async def main():
            async with open_fake_llm() as server, trio_llm.open_client(
                base_url=server.base_url, model="gpt-4o-mini"
            ) as client:
                await client.chat("Hi")
                async with client.stream("Hi") as stream:
                    async for _ in stream:
                        pass
                await client.chat_many(["a", "b"])
                await client.embed("x")

        trio.run(main)
        loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
        assert not loaded, loaded
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


async def test_unconfigured_opentelemetry_records_nothing(fake_llm: FakeLLMServer) -> None:
    """opentelemetry imported but no provider set (the API's proxies): no instruments."""
    from trio_llm._telemetry import instruments

    _reset_globals()
    assert "opentelemetry.trace" in sys.modules
    assert instruments() is None
    async with trio_llm.open_client(base_url=fake_llm.base_url, model=MODEL) as client:
        request = client._requester.request(CHAT, "Hi", MODEL, {})
    assert request.telemetry is None
    await trio.lowlevel.checkpoint()


async def test_the_middleware_continues_the_trace_of_any_asgi_app(
    otel: Otel, fake_llm: FakeLLMServer
) -> None:
    """ContinueTrace makes a traceparent the parent, unless a span is current already."""
    from trio_llm.serve._tracing import ContinueTrace

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model=MODEL) as client:

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await client.chat("Hi")

        scope = {
            "type": "http",
            "headers": [(b"traceparent", f"00-{trace_id}-{parent}-01".encode())],
        }
        await ContinueTrace(app)(scope, None, None)  # type: ignore[arg-type]
        with trace.get_tracer("test").start_as_current_span("server") as server:
            await ContinueTrace(app)(scope, None, None)  # type: ignore[arg-type]
        await ContinueTrace(app)({"type": "http", "headers": []}, None, None)  # type: ignore[arg-type]
    continued, inside, alone = otel.finished(f"chat {MODEL}")
    assert continued.parent is not None
    assert continued.parent.is_remote
    assert f"{continued.parent.span_id:016x}" == parent
    assert f"{continued.context.trace_id:032x}" == trace_id
    assert inside.parent is not None
    assert inside.parent.span_id == server.get_span_context().span_id
    assert alone.parent is None


def test_a_provider_named_in_the_environment_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_PYTHON_TRACER_PROVIDER names a provider: it is loaded and used."""
    from trio_llm._telemetry import _State

    _reset_globals()
    monkeypatch.setenv("OTEL_PYTHON_TRACER_PROVIDER", "sdk_tracer_provider")
    state = _State()
    found = state.current()
    assert found is not None
    assert found.tracer is not None
    assert isinstance(trace.get_tracer_provider(), TracerProvider)
    assert state.current() is found  # the same provider: the same instruments


def _reply_transport(statuses: list[int], usage: dict[str, Any]) -> httpx2.MockTransport:
    """Answer with each status in turn (429s ask for a 1 s wait), then a tool-calling reply."""
    replies = iter(statuses)

    def handle(_request: httpx2.Request) -> httpx2.Response:
        status = next(replies, 200)
        if status != 200:
            return httpx2.Response(
                status, json={"error": {"message": "slow down"}}, headers={"retry-after": "1"}
            )
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "rivers"}'},
                }
            ],
        }
        body = {
            "id": "chatcmpl-7",
            "model": MODEL,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
            "usage": usage,
        }
        return httpx2.Response(200, json=body)

    return httpx2.MockTransport(handle)


async def test_content_tools_cache_and_waits_asked_by_the_server(
    otel: Otel, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """System text, parts, tool calls, cache tokens, stop sequences and a Retry-After wait."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "1")
    usage = {
        "prompt_tokens": 2_000,
        "completion_tokens": 9,
        "total_tokens": 2_009,
        "prompt_tokens_details": {"cached_tokens": 1_024},
        "cache_creation_input_tokens": 512,
    }
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image_url"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c0", "content": "done"},
    ]
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1",
        model=MODEL,
        transport=_reply_transport([429], usage),
        retry=trio_llm.RetryPolicy(attempts=2, wait_jitter=0),
    ) as client:
        await client.chat(messages, system="Be brief.", stop="END")
    call = only(otel.finished(f"chat {MODEL}"))
    attributes = call.attributes or {}
    assert attributes["gen_ai.request.stop_sequences"] == ("END",)
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 1_024
    assert attributes["gen_ai.usage.cache_creation.input_tokens"] == 512
    assert json.loads(str(attributes["gen_ai.system_instructions"])) == [
        {"type": "text", "content": "Be brief."}
    ]
    assert json.loads(str(attributes["gen_ai.input.messages"])) == [
        {
            "role": "user",
            "parts": [{"type": "text", "content": "Look"}, {"type": "image_url"}],
        },
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "id": "c0", "name": "f", "arguments": "{}"}],
        },
        {"role": "tool", "parts": [{"type": "text", "content": "done"}]},
    ]
    (output,) = json.loads(str(attributes["gen_ai.output.messages"]))
    assert output["parts"] == [
        {"type": "tool_call", "id": "call_1", "name": "lookup", "arguments": '{"q": "rivers"}'}
    ]
    assert output["finish_reason"] == "tool_calls"
    # What is not a message (the providers refuse it before) is left out.
    assert input_messages({"messages": ["not a message"]}) == {"gen_ai.input.messages": "[]"}
    (event,) = call.events
    assert dict(event.attributes or {}) == {
        "error.type": "RateLimitError",
        "trio_llm.attempt": 1,
        "trio_llm.retry_after": 1.0,
    }


@pytest.mark.parametrize("kind", ["traces", "metrics"])
async def test_one_kind_of_provider_alone(kind: str, fake_llm: FakeLLMServer) -> None:
    """A tracer provider alone gives spans only; a meter provider alone, metrics only."""
    _reset_globals()
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    meter_provider = MeterProvider(metric_readers=[reader])
    if kind == "traces":
        trace.set_tracer_provider(tracer_provider)
    else:
        metrics.set_meter_provider(meter_provider)
    try:
        async with trio_llm.open_client(base_url=fake_llm.base_url, model=MODEL) as client:
            await client.chat("Hi")
            async with client.stream("Hi") as stream:
                async for _ in stream:
                    pass
    finally:
        _reset_globals()
    recorded = Otel(spans, reader)
    if kind == "traces":
        assert len(recorded.finished(f"chat {MODEL}")) == 2
        assert reader.get_metrics_data() is None
    else:
        assert recorded.finished() == []
        assert len(recorded.points("gen_ai.client.operation.duration")) == 1
        assert recorded.points("gen_ai.client.operation.duration")[0].count == 2
    tracer_provider.shutdown()
    meter_provider.shutdown()


async def test_no_op_providers_record_nothing() -> None:
    """Providers set to the API's no-op ones count as none."""
    from trio_llm._telemetry import _State

    _reset_globals()
    try:
        trace.set_tracer_provider(trace.NoOpTracerProvider())
        metrics.set_meter_provider(metrics.NoOpMeterProvider())
        assert _State().current() is None
    finally:
        _reset_globals()
    await trio.lowlevel.checkpoint()


async def test_a_cancelled_call_ends_its_span(otel: Otel, fake_llm: FakeLLMServer) -> None:
    """A call cancelled by its caller ends its spans, marked as such."""
    async with (
        open_fake_llm(FakeLLMConfig(latency=10)) as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL) as client,
    ):
        with trio.move_on_after(0.2):
            await client.chat("Hi")
    call = only(otel.finished(f"chat {MODEL}"))
    assert (call.attributes or {})["error.type"] == "Cancelled"
    assert [event.name for event in call.events] == []  # no exception event for it
    assert (only(otel.finished("POST")).attributes or {})["error.type"] == "Cancelled"
