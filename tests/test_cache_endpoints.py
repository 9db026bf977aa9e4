"""The response cache in a client with several endpoints.

The key is the provider, the kind of call and the body built for the endpoint the call
most likely goes to (never the endpoint's name or URL); a reply is stored only if the
endpoint that answered was sent that same body. Over real sockets against fake servers
on 127.0.0.1; failover tests run on trio's MockClock (cooldowns are virtual seconds).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

import trio_llm
from trio_llm import Endpoint
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm


class MemoryCache:
    """A cache object in memory: the protocol is two coroutines."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self.values.get(key)

    async def set(self, key: str, value: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.values[key] = value


@asynccontextmanager
async def fake_servers(*configs: FakeLLMConfig) -> AsyncIterator[list[FakeLLMServer]]:
    """Run one fake server per config."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_fake_llm(config)) for config in configs]


def requests_to(*servers: FakeLLMServer) -> int:
    """Requests the servers received, of any kind."""
    return sum(sum(server.stats.requests_by_endpoint.values()) for server in servers)


def dead_url() -> str:
    """A URL on a loopback port that nobody listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def failing() -> FakeLLMConfig:
    return FakeLLMConfig(error_rate=1.0, error_status=503)


async def test_replicas_share_one_key_and_a_hit_names_the_endpoint(tmp_path: Path) -> None:
    """Two replicas and an SQLite cache: a repeat (chat, stream, embeddings) sends nothing.

    A hit is ``cached`` and names the endpoint that answered the stored reply; another
    client whose endpoints have other names, URLs and order hits the same entries.
    """
    path = str(tmp_path / "replies.sqlite")
    async with fake_servers(FakeLLMConfig(), FakeLLMConfig()) as (a, b):
        endpoints = [Endpoint(a.base_url, name="a"), Endpoint(b.base_url, name="b")]
        async with trio_llm.open_client(endpoints=endpoints, model="m", cache=path) as client:
            first = await client.chat("Explain trio.", temperature=0.5)
            again = await client.chat("Explain trio.", temperature=0.5)
            async with client.stream("Explain trio.", temperature=0.5) as stream:
                text = "".join([chunk.text async for chunk in stream])
            vectors = await client.embed(["x", "y"])
            vectors_again = await client.embed(["x", "y"])
            stats = client.statistics()
        assert requests_to(a, b) == 2  # one chat, one embeddings
        assert (first.cached, again.cached) == (False, True)
        assert first.endpoint in ("a", "b")
        assert again == first
        assert again.endpoint == first.endpoint
        assert stream.response is not None
        assert stream.response.cached
        assert text == first.text
        assert stream.response.endpoint == first.endpoint
        assert vectors_again.cached
        assert vectors_again.vectors == vectors.vectors
        assert vectors_again.endpoint == vectors.endpoint
        assert stats.cache_hits == 3
        assert stats.sent == 2
        assert sum(endpoint.sent for endpoint in stats.endpoints) == 2

        others = [Endpoint(b.base_url + "/", name="second"), Endpoint(a.base_url, name="first")]
        async with trio_llm.open_client(endpoints=others, model="m", cache=path) as other:
            hit = await other.chat("Explain trio.", temperature=0.5)
            assert other.statistics().sent == 0
        assert hit.cached
        assert hit.text == first.text
        assert hit.endpoint == first.endpoint
        assert requests_to(a, b) == 2


async def test_a_fallback_of_another_model_answers_but_is_not_stored(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The primary fails: a fallback of another model answers, and its reply is not kept.

    The key is the primary's body (model ``m``): a reply of ``other`` stored under it
    would later answer a request for ``m``. A repeat asks the server again.
    """
    cache = MemoryCache()
    async with fake_servers(failing(), FakeLLMConfig()) as (primary, fallback):
        endpoints = [
            Endpoint(primary.base_url, name="primary"),
            Endpoint(fallback.base_url, name="fallback", model="other", priority=1),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model="m", cache=cache) as client:
            first = await client.chat("Explain trio.")
            again = await client.chat("Explain trio.")
            stats = client.statistics()
    assert (first.endpoint, first.model) == ("fallback", "other")
    assert not first.cached
    assert not again.cached
    assert stats.cache_hits == 0
    assert cache.values == {}
    assert requests_to(fallback) == 2


async def test_a_fallback_of_another_provider_is_not_stored(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An Anthropic fallback of an OpenAI primary: its reply is not stored under its key."""
    cache = MemoryCache()
    async with fake_servers(failing(), FakeLLMConfig()) as (primary, hosted):
        endpoints = [
            Endpoint(primary.base_url, name="primary", model="m"),
            Endpoint(hosted.root_url, name="claude", provider="anthropic", model="c", priority=1),
        ]
        async with trio_llm.open_client(endpoints=endpoints, cache=cache) as client:
            first = await client.chat("Explain trio.", max_tokens=20)
            async with client.stream("Explain trio.", max_tokens=20) as stream:
                async for _ in stream:
                    pass
            again = await client.chat("Explain trio.", max_tokens=20)
    assert first.endpoint == again.endpoint == "claude"
    assert stream.response is not None
    assert not stream.response.cached
    assert not again.cached
    assert cache.values == {}
    assert requests_to(hosted) == 3


async def test_a_fallback_taking_the_same_body_is_stored(autojump_clock: trio.abc.Clock) -> None:
    """A lower-priority replica of the same model answers for a failing primary: stored.

    What decides is the body sent, not the endpoint: the repeat is a hit that names the
    fallback, and the failing primary gets no further request.
    """
    cache = MemoryCache()
    async with fake_servers(failing(), FakeLLMConfig()) as (primary, backup):
        endpoints = [
            Endpoint(primary.base_url, name="primary"),
            Endpoint(backup.base_url, name="backup", priority=1),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model="m", cache=cache) as client:
            first = await client.chat("Explain trio.")
            await trio.testing.wait_all_tasks_blocked()  # written behind
            sent_before = requests_to(primary, backup)
            again = await client.chat("Explain trio.")
            stats = client.statistics()
    assert (first.endpoint, first.cached) == ("backup", False)
    assert (again.endpoint, again.cached) == ("backup", True)
    assert again == first
    assert len(cache.values) == 1
    assert requests_to(primary, backup) == sent_before
    assert stats.cache_hits == 1


async def test_chat_command_with_endpoints_and_a_cache(tmp_path: Path) -> None:
    """`trio-llm chat --endpoints FILE --cache C`: a rerun whose endpoints are all dead
    (other URLs, other names) is answered from the cache."""
    cache = str(tmp_path / "c.sqlite")

    def endpoints_file(name: str, *urls: str) -> str:
        path = tmp_path / name
        tables = [f'[[endpoint]]\nbase_url = "{url}"\nname = "e{i}"' for i, url in enumerate(urls)]
        path.write_text("\n".join(tables) + "\n")
        return str(path)

    async def chat(endpoints: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["chat", "--endpoints", endpoints, "--cache", cache, "--max-attempts", "1"]
        return await trio.run_process(
            [sys.executable, "-m", "trio_llm", *argv, "What is Trio?"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )

    async with fake_servers(FakeLLMConfig()) as (server,):
        first = await chat(endpoints_file("live.toml", server.base_url))
    assert first.returncode == 0, first.stderr.decode()
    again = await chat(endpoints_file("dead.toml", dead_url(), dead_url()))
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout == first.stdout
    assert first.stdout.strip()
