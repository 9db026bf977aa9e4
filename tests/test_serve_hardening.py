"""The gateway under hostile or unlucky conditions (issue 15, item 10)."""

from __future__ import annotations

import functools
import hmac
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx2
import pytest
import trio

from trio_llm import Client, RetryPolicy, Timeouts, open_client
from trio_llm.serve import GenerationRecord, create_app, serve
from trio_llm.serve._app import DEFAULT_MAX_BODY_BYTES, MAX_JSON_DEPTH
from trio_llm.serve._logs import configure_logging
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

CHAT = {"messages": [{"role": "user", "content": "Say something about Trio."}]}


@attrs.define
class Gateway:
    url: str
    upstream: FakeLLMServer
    client: Client
    records: list[GenerationRecord]


@asynccontextmanager
async def open_gateway(
    config: FakeLLMConfig | None = None,
    *,
    api_key: str = "",
    upstream_url: str | None = None,
    client_options: dict[str, Any] | None = None,
    **app_options: Any,
) -> AsyncIterator[Gateway]:
    """Fake upstream, a client to it (or to ``upstream_url``), and the gateway on port 0."""
    records: list[GenerationRecord] = []

    async def on_generation(record: GenerationRecord) -> None:
        records.append(record)

    options = {"retry": None, **(client_options or {})}
    async with (
        open_fake_llm(config or FakeLLMConfig()) as upstream,
        open_client(
            base_url=upstream_url or upstream.base_url, api_key=api_key, model="fake-gpt", **options
        ) as client,
        trio.open_nursery() as nursery,
    ):
        app = create_app(client, on_generation=on_generation, **app_options)
        shutdown = trio.Event()
        url = await nursery.start(
            functools.partial(serve, app, port=0, shutdown_trigger=shutdown.wait, grace=5)
        )
        try:
            yield Gateway(url=url, upstream=upstream, client=client, records=records)
        finally:
            shutdown.set()


async def wait_for(condition: Any) -> None:
    """Poll ``condition()`` (counters of servers in this process) for up to 5 s."""
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - counters, nothing to wait on
            await trio.sleep(0.01)


async def test_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bearer key is checked with hmac.compare_digest; odd bytes get 401, not 500."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with (
        open_gateway(require_key="gw-secret") as gateway,
        httpx2.AsyncClient(base_url=gateway.url) as http,
    ):
        wrong = await http.post(
            "/generate", json={"prompt": "hi"}, headers={"authorization": "Bearer gw-secreT"}
        )
        odd = await http.post(
            "/generate", json={"prompt": "hi"}, headers={"authorization": b"Bearer \xff\xfe"}
        )
        right = await http.post(
            "/generate", json={"prompt": "hi"}, headers={"authorization": "Bearer gw-secret"}
        )
    assert (wrong.status_code, odd.status_code, right.status_code) == (401, 401, 200)
    assert odd.json()["error"]["code"] == "invalid_api_key"
    assert compared == [
        (b"gw-secreT", b"gw-secret"),
        (b"\xff\xfe", b"gw-secret"),
        (b"gw-secret", b"gw-secret"),
    ]


def _raw_request(path: str, host: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


@pytest.mark.parametrize("phase", ["stalled", "backing off"])
async def test_disconnect_cancels_non_streaming_call(phase: str) -> None:
    """A JSON caller that leaves cancels its upstream call, stalled or between retries."""
    if phase == "stalled":
        config = FakeLLMConfig(stall_rate=1.0)
        retry = None
    else:
        config = FakeLLMConfig(error_rate=1.0, error_status=503)
        retry = RetryPolicy(
            attempts=5, wait_initial=1000, wait_max=1000, wait_jitter=0, deadline=None
        )
    async with open_gateway(config, client_options={"retry": retry}) as gateway:
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        # A bare socket, so that leaving is a plain close.
        async with await trio.open_tcp_stream(host, int(port)) as sock:
            await sock.send_all(_raw_request("/generate", host, {"prompt": "hi"}))
            if phase == "stalled":
                await wait_for(lambda: gateway.upstream.stats.in_flight == 1)
            else:
                await wait_for(lambda: gateway.client.statistics().retried == 1)
        await wait_for(lambda: gateway.records)
        statistics = gateway.client.statistics()
        upstream = gateway.upstream.stats
        assert statistics.in_flight == statistics.waiting == 0
        assert upstream.in_flight == 0
        assert upstream.total_requests == 1
        assert upstream.disconnects == (1 if phase == "stalled" else 0)
    [record] = gateway.records
    assert (record.status, record.error) == (499, "client disconnected")


@pytest.mark.parametrize("depth", [100_000, MAX_JSON_DEPTH + 1])
async def test_deeply_nested_json_is_400(depth: int, caplog: pytest.LogCaptureFixture) -> None:
    """JSON nested deeper than the limit gets the usual JSON 400, and no traceback."""
    # The body object is the first level.
    nested = b"[" * (depth - 1) + b"]" * (depth - 1)
    content = b'{"prompt": "hi", "metadata": ' + nested + b"}"
    async with open_gateway() as gateway, httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/generate", content=content)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert f"deeper than {MAX_JSON_DEPTH} levels" in error["message"]
    assert gateway.upstream.stats.total_requests == 0
    assert not [r for r in caplog.records if r.exc_info]


async def test_json_at_the_depth_limit_is_accepted() -> None:
    """JSON nested exactly MAX_JSON_DEPTH deep is read (and passed on) as before."""
    inner = "[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2)
    content = '{"prompt": "hi", "metadata": {"deep": ' + inner + "}}"
    async with open_gateway() as gateway, httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.post("/generate", content=content)
    assert response.status_code != 400 or "deeper" not in response.text
    assert gateway.upstream.stats.total_requests == 1


async def test_upstream_refusing_gateway_key_is_502(caplog: pytest.LogCaptureFixture) -> None:
    """The upstream's 401 to the gateway's own key is a 502 for callers and an error log."""
    config = FakeLLMConfig(api_key="upstream-secret")
    async with (
        open_gateway(config, api_key="stale-key", require_key="gw-secret") as gateway,
        httpx2.AsyncClient(
            base_url=gateway.url, headers={"authorization": "Bearer gw-secret"}
        ) as http,
    ):
        plain = await http.post("/v1/chat/completions", json=CHAT)
        stream = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    for response in (plain, stream):
        assert response.status_code == 502
        error = response.json()["error"]
        assert "refused the gateway's credentials" in error["message"]
        assert (error["type"], error["code"]) == ("upstream_error", "upstream_auth_failed")
    assert gateway.upstream.stats.requests_by_status == {401: 2}
    logged = [
        r for r in caplog.records if r.name == "trio_llm.serve" and r.levelno >= logging.ERROR
    ]
    assert len(logged) == 2
    assert "refused the gateway's API key" in logged[0].getMessage()
    assert gateway.upstream.base_url in logged[0].getMessage()


async def test_error_bodies_do_not_name_the_upstream() -> None:
    """502, 504 and mid-stream error bodies leave out the upstream URL; the log keeps it."""
    async with open_fake_llm() as dead:
        dead_url = dead.base_url
    async with (
        open_gateway(upstream_url=dead_url) as refused,
        httpx2.AsyncClient(base_url=refused.url) as http,
    ):
        unreachable = await http.post("/generate", json={"prompt": "hi"})
        unreachable_stream = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    timeouts = {"timeouts": Timeouts(read=0.2, stream_idle=0.2)}
    async with (
        open_gateway(FakeLLMConfig(stall_rate=1.0), client_options=timeouts) as stalled,
        httpx2.AsyncClient(base_url=stalled.url) as http,
    ):
        timed_out = await http.post("/generate", json={"prompt": "hi"})
    cut_config = FakeLLMConfig(disconnect_rate=1.0, tokens_per_second=1000)
    async with (
        open_gateway(cut_config) as cut,
        httpx2.AsyncClient(base_url=cut.url) as http,
    ):
        body = {**CHAT, "stream": True, "max_tokens": 40}
        cut_stream = await http.post("/v1/chat/completions", json=body)
    assert [r.status_code for r in (unreachable, unreachable_stream, timed_out)] == [502, 502, 504]
    assert cut_stream.status_code == 200
    assert "stream_error" in cut_stream.text
    host_port = dead_url.removeprefix("http://").split("/")[0]
    for response in (unreachable, unreachable_stream):
        assert host_port not in response.text
        assert response.json()["error"]["code"] == "bad_gateway"
    assert stalled.upstream.base_url.split("/v1")[0] not in timed_out.text
    assert cut.upstream.base_url.split("/v1")[0] not in cut_stream.text
    assert cut.records[0].status == 502
    assert refused.records[0].error is not None
    assert host_port in refused.records[0].error


async def test_stream_records_keep_their_status() -> None:
    """A stream that ends, or fails, is recorded with its status, not as a disconnect (499)."""
    async with open_fake_llm() as dead:
        dead_url = dead.base_url
    body = {**CHAT, "stream": True, "max_tokens": 40}
    async with open_gateway() as ok, httpx2.AsyncClient(base_url=ok.url) as http:
        completed = await http.post("/v1/chat/completions", json=body)
        await wait_for(lambda: ok.records)
    async with (
        open_gateway(upstream_url=dead_url) as refused,
        httpx2.AsyncClient(base_url=refused.url) as http,
    ):
        await http.post("/v1/chat/completions", json=body)
        await wait_for(lambda: refused.records)
    assert completed.text.endswith("data: [DONE]\n\n")
    assert (ok.records[0].status, ok.records[0].error) == (200, None)
    assert ok.records[0].completion_tokens > 0
    assert refused.records[0].status == 502


async def test_access_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    """Each request gets one access line: client, method, path, status and duration."""
    caplog.set_level(logging.INFO, logger="trio_llm.serve.access")
    async with open_gateway() as gateway, httpx2.AsyncClient(base_url=gateway.url) as http:
        await http.post("/generate", json={"prompt": "hi"})
        await http.post("/generate", json={})
        await http.get("/v2/nothing%0Aforged 200")
    lines = [r.getMessage() for r in caplog.records if r.name == "trio_llm.serve.access"]
    assert len(lines) == 3
    assert re.fullmatch(r"127\.0\.0\.1 POST /generate 200 \d+\.\dms", lines[0])
    assert re.fullmatch(r"127\.0\.0\.1 POST /generate 422 \d+\.\dms", lines[1])
    assert lines[2].startswith("127.0.0.1 GET '/v2/nothing\\nforged 200' 404 ")


async def test_configure_logging_shows_access_lines_only_when_verbose() -> None:
    """configure_logging(verbose=True) prints access lines; without it, warnings only."""
    outputs = []
    for verbose in (True, False):
        stream = io.StringIO()
        handler = configure_logging(verbose=verbose, stream=stream)
        try:
            async with open_gateway() as gateway, httpx2.AsyncClient(base_url=gateway.url) as http:
                await http.get("/healthz")
            logging.getLogger("trio_llm.serve").warning("a warning")
        finally:
            logging.getLogger("trio_llm").removeHandler(handler)
            logging.getLogger("trio_llm").setLevel(logging.NOTSET)  # as it was: no leak
            logging.getLogger("trio_llm").setLevel(logging.NOTSET)
        outputs.append(stream.getvalue())
    verbose_out, quiet_out = outputs
    assert "trio_llm.serve.access INFO 127.0.0.1 GET /healthz 200 " in verbose_out
    assert "a warning" in verbose_out
    assert "GET /healthz" not in quiet_out
    assert "trio_llm.serve WARNING a warning" in quiet_out


def test_serving_docs_document_limits_and_flags() -> None:
    """docs/serving.md documents the body limit, its flag and option, the depth limit and -v."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    assert DEFAULT_MAX_BODY_BYTES == 4 * 1024 * 1024
    for needle in (
        "--max-body-bytes",
        "max_body_bytes=",
        "4 MiB",
        f"{MAX_JSON_DEPTH} levels",
        "-v/--verbose",
        "trio_llm.serve.access",
    ):
        assert needle in text, needle
