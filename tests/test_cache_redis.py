"""The response cache in Redis (``cache="redis://..."``, ``--cache redis://...``) and
shared rate limits with several endpoints (``--redis`` with ``--endpoints``), against a
real redis-server and the fake LLM server.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import trio

import trio_llm
from trio_llm import CacheError, Endpoint, RateLimit
from trio_llm._cache_redis import KEY_PREFIX, open_redis_cache
from trio_llm._cli import build_parser, main
from trio_llm._cli_options import cli_endpoints
from trio_llm._ratelimit_redis import limit_key
from trio_llm._redis import open_redis
from trio_llm.testing import FakeLLMServer, open_fake_llm
from trio_llm.testing._redis_server import RedisServer, free_port

# coredis leaves streams unclosed when a connection attempt fails (see conftest.py).
redis_goes_away = pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning")


def chat_requests(server: FakeLLMServer) -> int:
    return server.stats.requests_by_endpoint.get("/v1/chat/completions", 0)


def dead_url() -> str:
    """The base URL of a port where nothing listens: any request to it fails."""
    return f"http://127.0.0.1:{free_port()}/v1"


async def test_a_second_client_hits_what_the_first_stored(
    redis_server: RedisServer, fake_llm: FakeLLMServer
) -> None:
    """Two clients (two processes, two machines) of one Redis share its replies."""
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=redis_server.url
    ) as first_client:
        first = await first_client.chat("Explain trio.", max_tokens=20)
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=redis_server.url
    ) as second_client:
        second = await second_client.chat("Explain trio.", max_tokens=20)
        stats = second_client.statistics()
    assert chat_requests(fake_llm) == 1
    assert (first.cached, second.cached) == (False, True)
    assert second == first
    assert (stats.sent, stats.cache_hits) == (0, 1)


async def test_ttl_is_each_entrys_redis_expiry(redis_server: RedisServer) -> None:
    """ttl= sets the Redis expiry of every entry; without it entries never expire."""
    async with (
        open_redis_cache(redis_server.url, ttl=0.2) as short,
        open_redis_cache(redis_server.url) as lasting,
        open_redis(redis_server.url) as redis,
    ):
        await short.set("a" * 64, b"brief")
        await lasting.set("b" * 64, b"kept")
        assert await lasting.get("a" * 64) == b"brief"
        assert 0 < await redis._client.pttl(KEY_PREFIX + "a" * 64) <= 200
        assert await redis._client.pttl(KEY_PREFIX + "b" * 64) == -1  # no expiry
        await trio.sleep(0.3)  # Redis's own clock: no trio clock drives it
        assert await short.get("a" * 64) is None
        assert await short.get("b" * 64) == b"kept"


@pytest.mark.parametrize("ttl", [0, -1.0, "1", True])
async def test_a_bad_ttl_is_refused(ttl: object) -> None:
    with pytest.raises(trio_llm.ConfigurationError, match="ttl must be"):
        async with open_redis_cache("redis://127.0.0.1:1/0", ttl=ttl):  # type: ignore[arg-type]
            pass  # pragma: no cover


@redis_goes_away
async def test_redis_down_at_open_is_a_clear_cache_error() -> None:
    """A cache whose Redis does not answer fails the client's opening, in one line."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(CacheError) as caught:
        async with trio_llm.open_client(base_url="http://127.0.0.1:9/v1", model="m", cache=url):
            pass  # pragma: no cover
    message = str(caught.value)
    assert message.startswith("cannot use the response cache's Redis at redis://***@127.0.0.1")
    assert "hunter2" not in message
    with warnings.catch_warnings():  # coredis's streams (see conftest.py)
        warnings.simplefilter("ignore", ResourceWarning)
        del caught


@redis_goes_away
async def test_redis_gone_mid_run_sends_the_calls_to_the_server(
    redis_server: RedisServer, fake_llm: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Lookups and stores that Redis no longer answers are misses, logged once."""
    caplog.set_level(logging.WARNING, "trio_llm.cache")
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=redis_server.url
    ) as client:
        await client.chat("one", max_tokens=8)
        await trio.sleep(0.1)  # written behind: in Redis by now
        redis_server.kill()
        replies = [await client.chat(text, max_tokens=8) for text in ("one", "two", "three")]
    assert not any(reply.cached for reply in replies)
    assert chat_requests(fake_llm) == 4
    warned = [r for r in caplog.records if "response cache at" in r.getMessage()]
    assert len(warned) == 1
    assert "calls go to the server meanwhile" in warned[0].getMessage()


def test_chat_and_batch_take_a_redis_cache(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--cache redis://...: a repeat answers with the server gone, for chat and batch."""
    assert main(["chat", "--simulate", "--cache", redis_server.url, "Say hi."]) == 0
    first = capsys.readouterr().out
    offline = ["--base-url", dead_url(), "--max-attempts", "1", "--cache", redis_server.url]
    assert main(["chat", *offline, "Say hi."]) == 0
    assert capsys.readouterr().out == first
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
        '"body": {"messages": [{"role": "user", "content": "x"}]}}\n'
    )
    argv = ["batch", str(source), "--cache", redis_server.url]
    assert main([*argv, "-o", str(tmp_path / "1.jsonl"), "--simulate"]) == 0
    capsys.readouterr()
    assert main([*argv, "-o", str(tmp_path / "2.jsonl"), *offline[:4]]) == 0
    assert "of which from the cache" in capsys.readouterr().err


# --- Shared rate limits with several endpoints ----------------------------------------


def _keys(client: trio_llm.Client) -> dict[str, str]:
    routes = client._requester.router.routes
    return {route.name: route.rate._shared.key for route in routes}  # type: ignore[union-attr]


async def test_each_endpoint_shares_its_limit_under_its_own_key(redis_server: RedisServer) -> None:
    """A shared limit with several endpoints: one set of buckets per endpoint, keyed by
    its URL and key (or NAME:ENDPOINT); an endpoint's own shared limit keeps its name."""
    async with open_fake_llm() as one, open_fake_llm() as two, open_fake_llm() as three:
        endpoints = [
            Endpoint(one.base_url, api_key="k1", name="a"),
            Endpoint(two.base_url, api_key="k2", name="b"),
            Endpoint(
                three.base_url,
                name="c",
                rate_limit=RateLimit(shared=redis_server.url, name="own"),
            ),
        ]
        limit = RateLimit(requests_per_minute=60, shared=redis_server.url)
        async with trio_llm.open_client(endpoints=endpoints, model="m", rate_limit=limit) as client:
            keys = _keys(client)
            reply = await client.chat("q", max_tokens=8)
        assert keys == {
            "a": limit_key(limit, one.base_url, "k1"),
            "b": limit_key(limit, two.base_url, "k2"),
            "c": "trio-llm:limit:own",
        }
        named = RateLimit(shared=redis_server.url, name="job")
        async with trio_llm.open_client(endpoints=endpoints, model="m", rate_limit=named) as client:
            keys = _keys(client)
    assert reply.endpoint == "a"
    assert keys == {
        "a": "trio-llm:limit:job:a",
        "b": "trio-llm:limit:job:b",
        "c": "trio-llm:limit:own",
    }


def test_redis_shares_the_limits_of_an_endpoints_file(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """--redis (and --limit-name) with --endpoints: each endpoint's own limit from the
    file is shared too, under NAME:ENDPOINT; one already shared in the file is kept."""
    path = tmp_path / "endpoints.toml"
    path.write_text(
        '[[endpoint]]\nbase_url = "http://127.0.0.1:1/v1"\nname = "near"\n'
        "rate_limit = { requests_per_minute = 100 }\n"
        '[[endpoint]]\nbase_url = "http://127.0.0.1:2/v1"\nname = "far"\n'
        '[[endpoint]]\nbase_url = "http://127.0.0.1:3/v1"\nname = "set"\n'
        f'rate_limit = {{ shared = "{redis_server.url}", name = "mine" }}\n'
    )
    argv = ["chat", "--endpoints", str(path), "--redis", redis_server.url]
    args = build_parser().parse_args([*argv, "--limit-name", "job", "hi"])
    near, far, kept = cli_endpoints(args, url_flag="--base-url") or []
    assert near.rate_limit == RateLimit(
        requests_per_minute=100, shared=redis_server.url, name="job:near"
    )
    assert far.rate_limit is None  # it takes the client's, named job:far by open_client
    assert kept.rate_limit == RateLimit(shared=redis_server.url, name="mine")
    plain = cli_endpoints(build_parser().parse_args([*argv[:3], "hi"]), url_flag="--base-url")
    assert plain is not None
    assert plain[0].rate_limit == RateLimit(requests_per_minute=100)


def test_chat_with_endpoints_and_redis_end_to_end(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """chat --endpoints --redis --limit-name: the endpoint answering keeps its buckets in
    Redis under NAME:ENDPOINT."""

    async def run() -> tuple[int, int]:
        async with open_fake_llm() as server:
            path = tmp_path / "endpoints.toml"
            path.write_text(
                f'[[endpoint]]\nbase_url = "{server.base_url}"\nname = "first"\n'
                f'[[endpoint]]\nbase_url = "{dead_url()}"\nname = "second"\npriority = 1\n'
            )
            argv = ["chat", "--endpoints", str(path), "--redis", redis_server.url]
            code = await trio.to_thread.run_sync(main, [*argv, "--limit-name", "e2e", "hi"])
        async with open_redis(redis_server.url) as redis:
            found: int = await redis._client.exists(["trio-llm:limit:e2e:first"])
        return code, found

    assert trio.run(run) == (0, 1)
    assert capsys.readouterr().out.strip()
