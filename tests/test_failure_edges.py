"""Failure edges: credentials in gateway logs and start lines, body fields named like the
client's arguments, malformed URLs, symlinked outputs, reply size limits, userinfo keys."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import trio

from trio_llm import APIResponseError, open_client, run_batch
from trio_llm._cli import main
from trio_llm._cli_options import EXIT_USAGE
from trio_llm._errors import redact_url
from trio_llm.serve import create_app, serve
from trio_llm.testing import FakeLLMConfig, open_fake_llm

SECRET = "s3cr3t-PASSWORD"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def test_gateway_log_of_a_refused_upstream_key_hides_url_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway's error line for an upstream 401 names the upstream without its password."""
    caplog.set_level(logging.DEBUG)
    async with open_fake_llm(FakeLLMConfig(api_key="upstream-key")) as upstream:
        host = upstream.base_url.split("//", 1)[1]
        url = f"http://user:{SECRET}@{host}"
        async with (
            open_client(base_url=url, api_key="stale", model="m", retry=None) as client,
            trio.open_nursery() as nursery,
        ):
            shutdown = trio.Event()
            gateway = await nursery.start(
                functools.partial(
                    serve, create_app(client), port=0, shutdown_trigger=shutdown.wait, grace=1
                )
            )
            async with httpx2.AsyncClient(base_url=gateway) as http:
                response = await http.post("/v1/chat/completions", json=CHAT)
            shutdown.set()
    assert response.status_code == 502
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("trio_llm")]
    assert any("refused the gateway's API key" in text for text in logged)
    assert not [text for text in logged if SECRET in text]


def test_serve_start_line_hides_upstream_credentials() -> None:
    """`trio-llm serve` announces its upstream without the password in --upstream."""
    upstream = f"http://user:{SECRET}@127.0.0.1:9/v1?api_key={SECRET}"
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_llm", "serve", "--upstream", upstream, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert process.stdout is not None
        announced = process.stdout.readline()
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert "listening on" in announced
    assert SECRET not in announced + out + err


@pytest.mark.parametrize(
    "extra", [{"retry": 1}, {"prompt_or_messages": "x"}], ids=["retry", "positional-name"]
)
async def test_gateway_body_fields_named_like_client_arguments_get_an_openai_error(
    extra: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """A body field that collides with a Client.chat argument is a 4xx JSON error, not a 500."""
    async with (
        open_fake_llm() as upstream,
        open_client(base_url=upstream.base_url, api_key="", model="m", retry=None) as client,
        trio.open_nursery() as nursery,
    ):
        shutdown = trio.Event()
        gateway = await nursery.start(
            functools.partial(
                serve, create_app(client), port=0, shutdown_trigger=shutdown.wait, grace=1
            )
        )
        async with httpx2.AsyncClient(base_url=gateway) as http:
            response = await http.post("/v1/chat/completions", json={**CHAT, **extra})
        shutdown.set()
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()


@pytest.mark.parametrize("command", ["chat", "batch", "serve"])
def test_a_malformed_url_flag_is_one_line_and_a_usage_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--base-url`/`--upstream http://[::1/v1` is one stderr line and exit 2, no traceback."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "prompt": "hi"}) + "\n")
    bad = "http://[::1/v1"
    argv = {
        "chat": ["chat", "--base-url", bad, "hi"],
        "batch": ["batch", str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", bad],
        "serve": ["serve", "--upstream", bad, "--port", "0"],
    }[command]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == EXIT_USAGE
    assert len(err.strip().splitlines()) == 1


async def test_an_output_path_that_is_a_symlink_to_a_new_file_is_created(tmp_path: Path) -> None:
    """`-o link` where link points to a file not yet created writes the answers there."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "prompt": "hi"}) + "\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(tmp_path / "target.jsonl")
    async with (
        open_fake_llm() as server,
        open_client(base_url=server.base_url, api_key="", model="m") as client,
    ):
        summary = await run_batch(source, link, client=client)
    assert summary.all_succeeded
    assert len((tmp_path / "target.jsonl").read_text().splitlines()) == 1


async def test_a_chunked_body_arriving_in_one_read_still_obeys_max_response_bytes() -> None:
    """A 5 KB chunked reply with max_response_bytes=1024 fails, however few reads bring it."""
    reply = {
        "id": "c1",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "x" * 5000},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    body = json.dumps(reply).encode()

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        head += b"transfer-encoding: chunked\r\n\r\n"
        await stream.send_all(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with open_client(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="",
            model="m",
            retry=None,
            max_response_bytes=1024,
        ) as client:
            with pytest.raises(APIResponseError, match="limit"):
                await client.chat("hi")
        nursery.cancel_scope.cancel()


def test_a_key_given_as_the_user_name_with_an_empty_password_is_redacted() -> None:
    """`http://KEY:@host` (the key as user name, Stripe style) shows no key once redacted."""
    assert SECRET not in redact_url(f"http://{SECRET}:@127.0.0.1:9/v1")
