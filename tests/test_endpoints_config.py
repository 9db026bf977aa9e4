"""Endpoints as configuration: ``Endpoint`` checks, ``open_client(endpoints=)``, the TOML
file of ``--endpoints``, and the commands (``chat``, ``batch``, ``serve``) that take it."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

import trio_llm
from test_endpoints import dead_url, failing, fake_servers
from trio_llm import Endpoint, RateLimit
from trio_llm._endpoints_config import load_endpoints
from trio_llm.testing import FakeLLMConfig, open_fake_llm


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "ftp://host/v1"}, "base_url must be an http:// or https:// URL"),
        ({"base_url": "http://[::1/v1"}, "is not a valid URL"),
        ({"base_url": 8000}, "base_url must be a string"),
        ({"api_key": "k", "api_key_env": "K"}, "give api_key or api_key_env, not both"),
        ({"api_key": 12}, "api_key must be a string or None"),
        ({"api_key_env": ""}, "api_key_env must be a non-empty string or None"),
        ({"provider": "cohere"}, "unknown provider 'cohere'; supported: 'openai', 'anthropic'"),
        ({"provider": None}, "provider must be a string"),
        ({"model": ""}, "model must be a non-empty string or None"),
        ({"name": ""}, "name must be a non-empty string or None"),
        ({"priority": True}, "priority must be an int"),
        ({"priority": 0.5}, "priority must be an int"),
        ({"weight": 0}, "weight must be a number > 0"),
        ({"weight": float("inf")}, "weight must be a number > 0"),
        ({"weight": "2"}, "weight must be a number > 0"),
        ({"max_concurrency": 0}, "max_concurrency must be an int >= 1"),
        ({"rate_limit": {"requests_per_minute": 5}}, "rate_limit must be a RateLimit or None"),
    ],
)
def test_endpoint_refuses_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    """Each bad field is one ConfigurationError naming the field."""
    fields = {"base_url": "http://127.0.0.1:8000/v1", **kwargs}
    with pytest.raises(trio_llm.ConfigurationError, match=message.replace("[", r"\[")):
        Endpoint(fields.pop("base_url"), **fields)


def test_endpoint_defaults() -> None:
    """The name defaults to host and port; the URL loses its trailing slash; no key in repr."""
    assert Endpoint("http://127.0.0.2:8000/v1/").name == "127.0.0.2:8000"
    assert Endpoint("http://127.0.0.2:8000/v1/").base_url == "http://127.0.0.2:8000/v1"
    assert Endpoint("https://api.openai.com/v1").name == "api.openai.com:443"
    assert Endpoint("http://replica/v1").name == "replica:80"
    assert Endpoint("http://[::1]:8000/v1").name == "[::1]:8000"
    endpoint = Endpoint("http://h/v1", api_key="sk-secret", name="mine", weight=2)
    assert (endpoint.name, endpoint.weight, endpoint.priority) == ("mine", 2, 0)
    assert "sk-secret" not in repr(endpoint)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"base_url": "http://127.0.0.1:1/v1"}, "pass base_url= or endpoints=, not both"),
        ({"api_key": "sk"}, "give each Endpoint its api_key or api_key_env"),
    ],
)
async def test_endpoints_exclude_base_url_and_api_key(
    options: dict[str, Any], message: str
) -> None:
    """endpoints= is exclusive with base_url= and api_key=."""
    with pytest.raises(trio_llm.ConfigurationError, match=message):
        async with trio_llm.open_client(endpoints=[Endpoint("http://127.0.0.1:2/v1")], **options):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("endpoints", "message"),
    [
        ([], "endpoints= needs at least one trio_llm.Endpoint"),
        (["http://127.0.0.1:1/v1"], "endpoints= takes trio_llm.Endpoint objects"),
        (
            [Endpoint("http://127.0.0.1:1/v1"), Endpoint("http://127.0.0.1:1/v2")],
            "two endpoints are named '127.0.0.1:1': give each a distinct name=",
        ),
        ([Endpoint("https://remote.example/v1")], r"no API key for https://remote.example/v1"),
        (
            [Endpoint("https://remote.example/v1", api_key_env="TRIO_LLM_TEST_UNSET")],
            r"\$TRIO_LLM_TEST_UNSET is not set \(api_key_env of endpoint 'remote.example:443'\)",
        ),
    ],
)
async def test_open_client_refuses_bad_endpoints(endpoints: list[Any], message: str) -> None:
    """Bad endpoint lists fail when the client opens, with one line saying why."""
    with pytest.raises(trio_llm.ConfigurationError, match=message):
        async with trio_llm.open_client(endpoints=endpoints, model="m"):
            pass  # pragma: no cover


async def test_api_key_env_is_read_when_the_client_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each endpoint sends its own key, read from its variable."""
    async with fake_servers(FakeLLMConfig(api_key="key-a"), FakeLLMConfig(api_key="key-b")) as (
        a,
        b,
    ):
        monkeypatch.setenv("KEY_A", "key-a")
        endpoints = [
            Endpoint(a.base_url, name="a", api_key_env="KEY_A"),
            Endpoint(b.base_url, name="b", api_key="key-b"),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
            names = sorted([(await client.chat("hi")).endpoint for _ in range(4)])
    assert names == ["a", "a", "b", "b"]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "endpoints.toml"
    path.write_text(text)
    return str(path)


def test_load_endpoints_reads_every_field(tmp_path: Path) -> None:
    """One [[endpoint]] table per endpoint, with Endpoint's fields."""
    path = write(
        tmp_path,
        """
        [[endpoint]]
        base_url = "http://127.0.0.2:8000/v1"
        model = "llama-3.3-70b"

        [[endpoint]]
        base_url = "http://127.0.0.3:8000/v1"
        name = "big"
        weight = 2
        max_concurrency = 32

        [[endpoint]]
        base_url = "https://api.anthropic.com"
        provider = "anthropic"
        api_key_env = "ANTHROPIC_API_KEY"
        model = "claude-haiku-4-5"
        priority = 1
        rate_limit = { requests_per_minute = 50, tokens_per_minute = 40000 }
        """,
    )
    first, second, third = load_endpoints(path)
    assert first == Endpoint("http://127.0.0.2:8000/v1", model="llama-3.3-70b")
    assert second == Endpoint("http://127.0.0.3:8000/v1", name="big", weight=2, max_concurrency=32)
    assert third == Endpoint(
        "https://api.anthropic.com",
        provider="anthropic",
        api_key_env="ANTHROPIC_API_KEY",
        model="claude-haiku-4-5",
        priority=1,
        rate_limit=RateLimit(requests_per_minute=50, tokens_per_minute=40000),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[endpoint]\n", r"not valid TOML: .*\(at line 1, column \d+\)"),
        ('base_url = "http://h/v1"\n', "unknown top-level key 'base_url'; write one"),
        ("", "no .*endpoint.* table; write one per endpoint"),
        ("[endpoint]\nbase_url = 'http://h/v1'\n", "no .*endpoint.* table"),
        ("[[endpoint]]\nmodel = 'm'\n", r"\[\[endpoint\]\] #1: base_url is missing"),
        (
            "[[endpoint]]\nbase_url = 'http://h/v1'\n[[endpoint]]\nname = 'x'\nweigth = 2\n",
            r"\[\[endpoint\]\] #2 \('x'\): unknown field 'weigth' \(fields: base_url, api_key",
        ),
        (
            "[[endpoint]]\nbase_url = 'http://h/v1'\nweight = -1\n",
            r"#1: Endpoint weight must be a number > 0, not -1",
        ),
        (
            "[[endpoint]]\nbase_url = 'http://h/v1'\nrate_limit = 5\n",
            "rate_limit must be a table of requests_per_minute and tokens_per_minute",
        ),
        (
            "[[endpoint]]\nbase_url = 'http://h/v1'\nrate_limit = { rpm = 5 }\n",
            "rate_limit must be a table of",
        ),
        (
            "[[endpoint]]\nbase_url = 'http://h/v1'\nrate_limit = { requests_per_minute = 0 }\n",
            "#1: rate_limit: requests_per_minute must be a positive number",
        ),
    ],
)
def test_load_endpoints_says_what_is_wrong_and_where(
    tmp_path: Path, text: str, message: str
) -> None:
    """Every problem is one line naming the file, the table and the field."""
    path = write(tmp_path, text)
    with pytest.raises(trio_llm.ConfigurationError, match=message) as raised:
        load_endpoints(path)
    assert str(raised.value).startswith(path + ": ")
    assert "\n" not in str(raised.value)


def test_load_endpoints_of_a_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read says so."""
    path = str(tmp_path / "nowhere.toml")
    with pytest.raises(trio_llm.ConfigurationError, match=f"cannot read {path}: No such file"):
        load_endpoints(path)


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "trio_llm", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


def endpoints_file(tmp_path: Path, *urls: str, extra: str = "") -> str:
    tables = [
        f'[[endpoint]]\nbase_url = "{url}"\nname = "e{i}"\n{extra}' for i, url in enumerate(urls)
    ]
    return write(tmp_path, "\n".join(tables))


async def test_chat_command_with_endpoints(tmp_path: Path) -> None:
    """`trio-llm chat --endpoints FILE` answers through the endpoints, past a dead one."""
    async with fake_servers(FakeLLMConfig(), failing()) as (good, broken):
        path = endpoints_file(tmp_path, dead_url(), broken.base_url, good.base_url)
        done = await run_cli("chat", "--endpoints", path, "--json", "What is Trio?")
        async with trio_llm.open_client(base_url=good.base_url, model="gpt-4o-mini") as direct:
            expected = await direct.chat([{"role": "user", "content": "What is Trio?"}])
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["choices"][0]["message"]["content"] == expected.text


async def test_batch_command_with_endpoints(tmp_path: Path) -> None:
    """`trio-llm batch --endpoints FILE` answers every line, spread over the endpoints."""
    async with fake_servers(FakeLLMConfig(latency=0.01), FakeLLMConfig(latency=0.01)) as (a, b):
        path = endpoints_file(tmp_path, a.base_url, b.base_url)
        source = tmp_path / "in.jsonl"
        lines = [json.dumps({"custom_id": f"q{i}", "prompt": f"question {i}"}) for i in range(40)]
        source.write_text("\n".join(lines) + "\n")
        output = tmp_path / "out.jsonl"
        done = await run_cli("batch", str(source), "-o", str(output), "--endpoints", path)
    assert done.returncode == 0, done.stderr.decode()
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(answer["custom_id"] for answer in answers) == sorted(f"q{i}" for i in range(40))
    assert all(answer["error"] is None for answer in answers)
    assert a.stats.total_requests > 5
    assert b.stats.total_requests > 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["chat", "--base-url", "http://127.0.0.1:1/v1"],
            "give --endpoints or --base-url, not both",
        ),
        (
            ["chat", "--simulate"],
            "--simulate answers from the built-in fake server: drop --endpoints",
        ),
        (["serve", "--port", "0"], None),
    ],
)
async def test_endpoints_flag_conflicts(
    tmp_path: Path, args: list[str], message: str | None
) -> None:
    """--endpoints with a URL flag or --simulate is a usage error (exit 2), in one line."""
    path = endpoints_file(tmp_path, "http://127.0.0.1:1/v1")
    if message is None:  # serve: --upstream and --endpoints are one required choice
        done = await run_cli(*args, "--upstream", "http://127.0.0.1:1/v1", "--endpoints", path)
        assert done.returncode == 2
        assert b"not allowed with argument" in done.stderr
        done = await run_cli(*args)
        assert done.returncode == 2
        assert b"one of the arguments --upstream --endpoints is required" in done.stderr
        return
    done = await run_cli(*args, "--endpoints", path, "hi")
    assert done.returncode == 2
    assert done.stderr.decode().strip().splitlines() == [f"trio-llm chat: error: {message}"]


async def test_bad_endpoints_file_is_a_usage_error(tmp_path: Path) -> None:
    """A bad file ends the command with status 2 and the loader's line."""
    path = write(tmp_path, "[[endpoint]]\nbase_url = 'http://h/v1'\nweight = 0\n")
    done = await run_cli("chat", "--endpoints", path, "hi")
    assert done.returncode == 2
    assert f"{path}: [[endpoint]] #1: Endpoint weight must be" in done.stderr.decode()


async def test_serve_command_in_front_of_several_replicas(tmp_path: Path) -> None:
    """`trio-llm serve --endpoints FILE` balances callers over the replicas; /metrics shows them."""
    replicas = (FakeLLMConfig(latency=0.05), FakeLLMConfig(latency=0.05))
    async with fake_servers(*replicas) as (a, b), trio.open_nursery() as nursery:
        path = endpoints_file(tmp_path, a.base_url, b.base_url, dead_url())
        command = [sys.executable, "-m", "trio_llm", "serve", "--endpoints", path, "--port", "0"]
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
        assert b"gateway to 3 endpoints (e0, e1, e2)" in banner
        url = banner.decode().split("listening on ")[1].split()[0]
        async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
            async with trio.open_nursery() as callers:
                for i in range(20):
                    post = functools.partial(http.post, "/generate", json={"prompt": f"q{i}"})
                    callers.start_soon(post)
            responses = [await http.post("/generate", json={"prompt": "hi"}) for _ in range(2)]
            metrics = (await http.get("/metrics")).text
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    assert all(response.status_code == 200 for response in responses)
    assert a.stats.total_requests >= 5
    assert b.stats.total_requests >= 5
    assert 'trio_llm_endpoint_up{endpoint="e2"} 0\n' in metrics
    assert 'trio_llm_endpoint_up{endpoint="e0"} 1\n' in metrics
    assert "# TYPE trio_llm_endpoint_sent_total counter" in metrics


async def test_a_fallback_model_needs_no_key_on_loopback() -> None:
    """Endpoints on this machine need no key, as base_url clients do (localhost too)."""
    async with open_fake_llm() as server:
        local = server.base_url.replace("127.0.0.1", "localhost")
        endpoints = [Endpoint(local, model="fake-gpt")]
        async with trio_llm.open_client(endpoints=endpoints) as client:
            reply = await client.chat("hi")
    assert reply.model == "fake-gpt"


async def test_cli_client_of_an_endpoints_file(tmp_path: Path) -> None:
    """open_cli_client reads --endpoints; --model goes to endpoints naming none."""
    from trio_llm._cli import build_parser
    from trio_llm._cli_options import open_cli_client

    async with fake_servers(FakeLLMConfig(), FakeLLMConfig()) as (a, b):
        path = write(
            tmp_path,
            f'[[endpoint]]\nbase_url = "{a.base_url}"\nname = "a"\nmodel = "model-a"\n'
            f'[[endpoint]]\nbase_url = "{b.base_url}"\nname = "b"\n',
        )
        args = build_parser().parse_args(["chat", "--endpoints", path, "--model", "m", "hi"])
        async with open_cli_client(args) as client:
            replies = [await client.chat("hi") for _ in range(2)]
    assert sorted((r.endpoint, r.model) for r in replies) == [("a", "model-a"), ("b", "m")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--base-url", "http://127.0.0.1:1/v1"], "give --endpoints or --base-url, not both"),
        (["--simulate"], "--simulate answers from the built-in fake server: drop --endpoints"),
        (["--api-key-env", "KEY"], "--api-key-env is for one URL: with --endpoints, give each"),
    ],
)
def test_cli_endpoints_conflicts_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    """The same usage errors, through the command's own entry point."""
    from trio_llm._cli import main

    path = endpoints_file(tmp_path, "http://127.0.0.1:1/v1")
    assert main(["chat", "--endpoints", path, *extra, "hi"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"trio-llm chat: error: {message}")
