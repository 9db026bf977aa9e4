"""The gateway (trio_llm.serve) on Hypercorn's Trio worker, called by the official openai SDK."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx2
import openai
import pytest
import trio

from trio_llm import RateLimit, open_client
from trio_llm.serve import GenerationRecord, create_app, serve
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say something about Trio."}
]


@attrs.define
class Gateway:
    url: str
    upstream: FakeLLMServer
    records: list[GenerationRecord]
    shutdown: trio.Event


@asynccontextmanager
async def open_gateway(
    config: FakeLLMConfig | None = None, *, client_options: Any = None, **app_options: Any
) -> AsyncIterator[Gateway]:
    """Fake upstream, a client to it, and the gateway on port 0; shut down gracefully."""
    records: list[GenerationRecord] = []

    async def on_generation(record: GenerationRecord) -> None:
        records.append(record)

    options = {"retry": None, **(client_options or {})}
    async with (
        open_fake_llm(config or FakeLLMConfig()) as upstream,
        open_client(base_url=upstream.base_url, api_key="", model="fake-gpt", **options) as client,
        trio.open_nursery() as nursery,
    ):
        app = create_app(client, on_generation=on_generation, **app_options)
        shutdown = trio.Event()
        url = await nursery.start(
            functools.partial(serve, app, port=0, shutdown_trigger=shutdown.wait, grace=5)
        )
        try:
            yield Gateway(url=url, upstream=upstream, records=records, shutdown=shutdown)
        finally:
            shutdown.set()


@asynccontextmanager
async def open_sdk(gateway: Gateway, api_key: str = "sk-any") -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


@asynccontextmanager
async def open_http(gateway: Gateway) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        yield http


async def test_chat_completion() -> None:
    """A JSON chat completion goes through the gateway unchanged."""
    async with open_gateway() as gateway, open_sdk(gateway) as sdk:
        completion = await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES)
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.content
        assert completion.usage is not None
        assert completion.usage.completion_tokens > 0
    assert gateway.upstream.stats.requests_by_endpoint["/v1/chat/completions"] == 1


# The SDK leaves its SSE generators suspended after [DONE] (see test_openai_sdk.py).
_SDK_STREAM_WARNING = pytest.mark.filterwarnings(
    r"ignore:Async generator '(httpx2|httpcore2|openai)\..* was garbage collected:ResourceWarning"
)


@_SDK_STREAM_WARNING
async def test_stream_relays_chunks_and_usage() -> None:
    """A stream relays every chunk, the asked-for usage chunk, and the same text as JSON."""
    async with open_gateway() as gateway, open_sdk(gateway) as sdk:
        whole = await sdk.chat.completions.create(
            model="fake-gpt", messages=MESSAGES, max_tokens=12
        )
        stream = await sdk.chat.completions.create(
            model="fake-gpt",
            messages=MESSAGES,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        text = ""
        usage = None
        chunks = 0
        async with stream:
            async for chunk in stream:
                chunks += 1
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                usage = chunk.usage or usage
    assert chunks > 3
    assert text == whole.choices[0].message.content
    assert usage == whole.usage


async def test_stream_arrives_before_it_ends() -> None:
    """The first SSE event reaches the caller while the upstream is still generating."""
    config = FakeLLMConfig(tokens_per_second=20)
    async with open_gateway(config) as gateway, open_http(gateway) as http:
        body = {"messages": MESSAGES, "max_tokens": 20, "stream": True}
        start = trio.current_time()
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            first = await lines.__anext__()
            first_at = trio.current_time() - start
            rest = [line async for line in lines]
        total = trio.current_time() - start
    assert first.startswith("data: {")
    assert rest[-2:] == ["data: [DONE]", ""]
    assert first_at < total / 2


async def test_embeddings() -> None:
    """Embeddings go through, float and the SDK's default base64."""
    async with open_gateway() as gateway, open_sdk(gateway) as sdk:
        floats = await sdk.embeddings.create(
            model="fake-embed", input=["one", "two"], encoding_format="float"
        )
        default = await sdk.embeddings.create(model="fake-embed", input=["one", "two"])
    assert [len(item.embedding) for item in floats.data] == [32, 32]
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (404, openai.NotFoundError),
        (429, openai.RateLimitError),
        (503, openai.InternalServerError),
    ],
)
async def test_upstream_errors_pass_through(status: int, error: type[Exception]) -> None:
    """An upstream error status reaches the caller with its status and an OpenAI body."""
    config = FakeLLMConfig(error_rate=1.0, error_status=status)
    async with open_gateway(config) as gateway, open_sdk(gateway) as sdk:
        with pytest.raises(error) as info:
            await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES)
        with pytest.raises(error):
            await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES, stream=True)
    assert isinstance(info.value, openai.APIStatusError)
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"]
    assert gateway.upstream.stats.injected_errors == 2


async def test_unreachable_upstream_is_502() -> None:
    """An upstream that refuses connections gives 502 with an OpenAI-style body."""
    async with open_fake_llm() as dead:
        url = dead.base_url
    async with (
        open_client(base_url=url, api_key="", model="m", retry=None) as client,
        trio.open_nursery() as nursery,
    ):
        shutdown = trio.Event()
        gateway_url = await nursery.start(
            functools.partial(serve, client, port=0, shutdown_trigger=shutdown.wait)
        )
        async with httpx2.AsyncClient(base_url=gateway_url) as http:
            response = await http.post("/generate", json={"prompt": "hi"})
        shutdown.set()
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"


async def test_disconnect_mid_stream_cancels_upstream() -> None:
    """A caller that leaves mid-stream makes the gateway cancel its upstream request."""
    config = FakeLLMConfig(tokens_per_second=50)
    async with open_gateway(config) as gateway:
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps({"messages": MESSAGES, "max_tokens": 200, "stream": True}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        # A bare socket, so that leaving is a plain close (no client-side generators).
        async with await trio.open_tcp_stream(host, int(port)) as sock:
            await sock.send_all(head + body)
            received = b""
            while b"data: {" not in received:
                received += await sock.receive_some()
        with trio.fail_after(5):
            # Nothing to wait on but the counters.
            while gateway.upstream.stats.disconnects < 1 or not gateway.records:  # noqa: ASYNC110
                await trio.sleep(0.01)
    assert received.startswith(b"HTTP/1.1 200")
    assert gateway.upstream.stats.disconnects == 1
    [record] = gateway.records
    assert record.status == 499
    assert record.stream


async def test_require_key() -> None:
    """With require_key, calls without the bearer key get 401; /healthz stays open."""
    async with open_gateway(require_key="gw-secret") as gateway:
        async with open_sdk(gateway, api_key="wrong") as sdk:
            with pytest.raises(openai.AuthenticationError) as info:
                await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES)
        assert isinstance(info.value.body, dict)
        assert info.value.body["code"] == "invalid_api_key"
        async with open_sdk(gateway, api_key="gw-secret") as sdk:
            completion = await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES)
            assert completion.choices[0].message.content
        async with open_http(gateway) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/metrics")).status_code == 401
    assert gateway.upstream.stats.requests_by_endpoint["/v1/chat/completions"] == 1


@pytest.mark.parametrize(
    ("content", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"{}", 422, "'messages' is required"),
        (b'{"messages": "hi"}', 422, "'messages' must be"),
        (b'{"messages": [{"role": "user", "content": "x"}], "model": 3}', 422, "'model'"),
    ],
)
async def test_invalid_bodies(content: bytes, status: int, fragment: str) -> None:
    """Malformed bodies get 400, invalid ones 422, both with an OpenAI-style error."""
    async with open_gateway() as gateway, open_http(gateway) as http:
        response = await http.post("/v1/chat/completions", content=content)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert gateway.upstream.stats.total_requests == 0


async def test_oversized_body_is_413() -> None:
    """Bodies over max_body_bytes get 413, declared or chunked."""
    async with open_gateway(max_body_bytes=1000) as gateway, open_http(gateway) as http:
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        declared = await http.post("/v1/chat/completions", content=big)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(big), 500):
                yield big[start : start + 500]

        chunked = await http.post("/v1/chat/completions", content=chunks())
    assert declared.status_code == 413
    assert chunked.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"
    assert gateway.upstream.stats.total_requests == 0


async def test_generate_models_healthz_and_unknown_route() -> None:
    """/generate answers generated_text; /v1/models lists the model; 404s are OpenAI-style."""
    async with open_gateway() as gateway, open_http(gateway) as http:
        generated = await http.post("/generate", json={"prompt": "Hello", "max_tokens": 5})
        missing = await http.post("/generate", json={"text": "Hello"})
        models = await http.get("/v1/models")
        health = await http.get("/healthz")
        unknown = await http.get("/v2/nothing")
    assert generated.status_code == 200
    assert generated.json()["generated_text"]
    assert missing.status_code == 422
    assert [model["id"] for model in models.json()["data"]] == ["fake-gpt"]
    assert health.json() == {"status": "ok"}
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error"


async def test_metrics() -> None:
    """/metrics shows the client's statistics and responses by route and status."""
    async with open_gateway() as gateway, open_http(gateway) as http:
        await http.post("/generate", json={"prompt": "Hello"})
        await http.post("/generate", json={})
        text = (await http.get("/metrics")).text
    assert "# TYPE trio_llm_client_sent_total counter" in text
    assert "trio_llm_client_succeeded_total 1\n" in text
    assert "trio_llm_client_max_concurrency 64\n" in text
    assert 'trio_llm_serve_requests_total{route="/generate",status="200"} 1\n' in text
    assert 'trio_llm_serve_requests_total{route="/generate",status="422"} 1\n' in text


async def test_rate_limit_holds_for_three_callers() -> None:
    """Three callers pushing at once share the gateway's rate limit: no upstream 429."""
    config = FakeLLMConfig(requests_per_minute=600)
    # One request per 100 ms: 12 requests take about 1 s, all admitted by the fake server.
    limit = {"rate_limit": RateLimit(requests_per_minute=600)}
    async with open_gateway(config, client_options=limit) as gateway:

        async def caller() -> None:
            async with open_sdk(gateway) as sdk:
                for _ in range(4):
                    await sdk.chat.completions.create(model="fake-gpt", messages=MESSAGES)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(caller)
    stats = gateway.upstream.stats
    assert stats.requests_by_status == {200: 12}
    assert stats.rate_limited == 0


async def test_background_log_drained_at_shutdown() -> None:
    """Records queued before shutdown are all handled before the lifespan ends."""
    records: list[GenerationRecord] = []

    async def slow_hook(record: GenerationRecord) -> None:
        await trio.sleep(0.05)
        records.append(record)

    async with (
        open_fake_llm() as upstream,
        open_client(base_url=upstream.base_url, api_key="", model="fake-gpt") as client,
    ):
        app = create_app(client, on_generation=slow_hook)
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                functools.partial(serve, app, port=0, shutdown_trigger=shutdown.wait)
            )
            async with httpx2.AsyncClient(base_url=url) as http:
                for _ in range(5):
                    assert (await http.post("/generate", json={"prompt": "hi"})).status_code == 200
            assert len(records) < 5  # the hook is still working through the queue
            shutdown.set()
    assert [record.route for record in records] == ["/generate"] * 5
    assert all(record.status == 200 and record.completion_tokens > 0 for record in records)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def test_example_runs() -> None:
    """examples/serve.py serves /generate, calls it once, prints the reply and the log line."""
    result = await trio.run_process(
        [sys.executable, str(EXAMPLES / "serve.py")], capture_stdout=True, capture_stderr=True
    )
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2
    assert lines[0]
    assert lines[1].startswith("[log] 12 chars in")


async def test_cli_serves_and_stops_gracefully_on_sigterm() -> None:
    """`trio-llm serve` relays requests, and SIGTERM lets the one in flight finish."""
    config = FakeLLMConfig(latency=0.5)
    async with open_fake_llm(config) as upstream, trio.open_nursery() as nursery:
        command = [sys.executable, "-m", "trio_llm", "serve", "--upstream", upstream.base_url]
        command += ["--port", "0", "--model", "fake-gpt", "--grace", "5"]
        process = await nursery.start(
            functools.partial(
                trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        )
        assert process.stdout is not None
        banner = b""
        with trio.fail_after(20):
            while b"\n" not in banner:
                banner += await process.stdout.receive_some()
        url = banner.decode().split("listening on ")[1].split()[0]
        result: list[httpx2.Response] = []
        async with httpx2.AsyncClient(base_url=url) as http, trio.open_nursery() as requests:

            async def call() -> None:
                result.append(await http.post("/generate", json={"prompt": "hi"}))

            requests.start_soon(call)
            with trio.fail_after(5):
                while upstream.stats.in_flight == 0:  # noqa: ASYNC110 - a counter
                    await trio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    assert result[0].status_code == 200
    assert result[0].json()["generated_text"]
