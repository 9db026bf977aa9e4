"""Rate limits shared through Redis: the same reserve / settle / pause / update calls as the
local limiter, with buckets every process of the limit shares (a real redis-server).

Times here are real (the buckets run on Redis's clock, which no trio clock drives), and
kept short: limits are set so that one request refills in 0.1 s to 1 s.
"""

from __future__ import annotations

import functools
import gc
import logging
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio

import trio_llm
from conftest import UNCLOSED_STREAM
from trio_llm import RateLimit, SharedLimitError, _redis
from trio_llm._ratelimit import RateLimiter, RateLimitLevel, RateLimitLevels
from trio_llm._ratelimit_redis import KEY_PREFIX, _Pending, limit_key, open_rate_limiter
from trio_llm._redis import open_redis
from trio_llm.testing import FakeLLMConfig, open_fake_llm
from trio_llm.testing._redis_server import RedisServer, RedisServerError, free_port

# coredis leaves streams unclosed when a connection attempt fails (see conftest.py).
redis_goes_away = pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning")


def shared(server: RedisServer, name: str = "test", **limits: float) -> RateLimit:
    return RateLimit(shared=server.url, name=name, **limits)


@asynccontextmanager
async def limiter(limit: RateLimit) -> AsyncIterator[RateLimiter]:
    """A limiter with its own connection to Redis: one 'process' of the shared limit."""
    async with open_rate_limiter(limit, base_url="http://127.0.0.1:1/v1", api_key=None) as rate:
        assert rate is not None
        yield rate


async def acquired(
    rate: RateLimiter, *, task_status: trio.TaskStatus[trio.Event] = trio.TASK_STATUS_IGNORED
) -> None:
    """Acquire one request in the background; the event says when it is taken."""
    taken = trio.Event()
    task_status.started(taken)
    await rate.acquire(0)
    taken.set()


async def settled() -> None:
    """Let the limiters' background tasks send what they queued."""
    await trio.sleep(0.05)


async def test_processes_share_the_requests_bucket(redis_server: RedisServer) -> None:
    """What one limiter takes, the other no longer finds: it waits for the refill."""
    limit = shared(redis_server, requests_per_minute=60)  # 1 a second
    async with limiter(limit) as first, limiter(limit) as second:
        taking = trio.current_time()
        for _ in range(60):
            await first.acquire(0)
        started = trio.current_time()
        await second.acquire(0)
        waited = trio.current_time() - started
    # The refill during the 60 takes shortens the wait; a second is the most.
    assert 0.9 - (started - taking) <= waited < 1.2


async def test_a_refund_gives_the_capacity_to_the_others(redis_server: RedisServer) -> None:
    """A reservation refunded in one process is found by a waiter in another within a
    second (it asks again at least that often), long before the refill."""
    limit = shared(redis_server, requests_per_minute=6)  # one request every 10 s
    async with limiter(limit) as first, limiter(limit) as second:
        reservations = [await first.acquire(0) for _ in range(6)]
        async with trio.open_nursery() as nursery:
            taken = await nursery.start(acquired, second)
            await trio.sleep(0.1)
            reservations[0].refund()
            with trio.fail_after(1.5):
                await taken.wait()


async def test_a_refund_wakes_a_waiter_of_the_same_process(redis_server: RedisServer) -> None:
    """Within a process, a refund wakes its first waiter once Redis has it."""
    limit = shared(redis_server, requests_per_minute=6)
    async with limiter(limit) as rate:
        reservations = [await rate.acquire(0) for _ in range(6)]
        async with trio.open_nursery() as nursery:
            taken = await nursery.start(acquired, rate)
            await trio.sleep(0.1)
            started = trio.current_time()
            reservations[0].refund()
            await taken.wait()
            assert trio.current_time() - started < 0.3


async def test_reconcile_gives_back_or_charges_the_difference(redis_server: RedisServer) -> None:
    """Settled with its real usage, a token estimate is corrected for every process."""
    limit = shared(redis_server, tokens_per_minute=1000)
    async with limiter(limit) as first, limiter(limit) as second:
        reservation = await first.acquire(1000)
        reservation.reconcile(100)  # 900 come back
        with trio.fail_after(2):
            await second.acquire(850)
        second_reservation = await first.acquire(0)
        second_reservation.reconcile(400)  # charged 400 more than estimated: below zero
        await settled()
        with trio.move_on_after(1) as scope:
            await second.acquire(100)
        assert scope.cancelled_caught
        assert second.statistics().tokens_available is not None


async def test_keep_settles_at_the_estimate(redis_server: RedisServer) -> None:
    """keep() gives nothing back: the estimate stays charged for everyone."""
    limit = shared(redis_server, tokens_per_minute=600)
    async with limiter(limit) as first, limiter(limit) as second:
        (await first.acquire(600)).keep()
        await settled()
        with trio.move_on_after(0.5) as scope:
            await second.acquire(100)
        assert scope.cancelled_caught


async def test_a_pause_stops_every_process(redis_server: RedisServer) -> None:
    """A 429's pause in one process holds the others too, for as long as it says."""
    limit = shared(redis_server, requests_per_minute=6000)
    async with limiter(limit) as first, limiter(limit) as second:
        first.pause(0.6)
        await settled()
        started = trio.current_time()
        await second.acquire(1)
        assert trio.current_time() - started >= 0.5
        assert first.statistics().pause_remaining <= 0.6


async def test_learned_levels_are_shared(redis_server: RedisServer) -> None:
    """Limits and levels learned from one process's response headers bind the others."""
    limit = shared(redis_server)  # no limit of its own: adopts the server's
    async with limiter(limit) as first, limiter(limit) as second:
        (await first.acquire(10)).keep()
        first.update(
            RateLimitLevels(
                # Exhausted: its next request is due in 30 s / 60 = 0.5 s.
                requests=RateLimitLevel(limit=60, remaining=0, reset_seconds=30),
                tokens=RateLimitLevel(limit=100_000, remaining=50_000),
            )
        )
        await settled()
        started = trio.current_time()
        await second.acquire(10)
        assert trio.current_time() - started >= 0.4
        stats = second.statistics()
        assert stats.requests_per_minute == 60
        assert stats.tokens_per_minute == 100_000
        # Lowered to the reported 50,000, refilled since (1,667 a second): not full.
        assert stats.tokens_available is not None
        assert stats.tokens_available < 55_000


async def test_fifo_within_a_process(redis_server: RedisServer) -> None:
    """Within a process, waiters are served in the order they came."""
    limit = shared(redis_server, requests_per_minute=600)  # 10 a second
    order: list[int] = []
    async with limiter(limit) as rate:
        for _ in range(600):
            await rate.acquire(0)

        async def take(index: int) -> None:
            await rate.acquire(0)
            order.append(index)

        async with trio.open_nursery() as nursery:
            for index in range(5):
                nursery.start_soon(take, index)
                await trio.sleep(0.01)
    assert order == [0, 1, 2, 3, 4]


async def test_a_cancelled_acquire_takes_nothing(redis_server: RedisServer) -> None:
    """Cancelled while waiting (or while Redis answers), an acquire leaves the buckets."""
    limit = shared(redis_server, requests_per_minute=60)
    async with limiter(limit) as rate:
        for _ in range(59):
            await rate.acquire(0)
        with trio.move_on_after(0.0001):
            await rate.acquire(0)  # cancelled as Redis takes it, or before
        await settled()
        with trio.fail_after(0.5):
            await rate.acquire(0)  # the last one is still there
        assert rate.statistics().waiting == 0


def test_keys_name_the_url_and_a_hash_of_the_api_key() -> None:
    """The default key is the base URL and a hash: never the API key itself."""
    limit = RateLimit(shared="redis://127.0.0.1:6379/0")
    key = limit_key(limit, "https://api.example.com/v1", "sk-secret-key")
    assert key.startswith(KEY_PREFIX + "https://api.example.com/v1:")
    assert "sk-secret" not in key
    assert key == limit_key(limit, "https://api.example.com/v1", "sk-secret-key")
    assert key != limit_key(limit, "https://api.example.com/v1", "sk-other-key")
    assert key != limit_key(limit, "https://other.example.com/v1", "sk-secret-key")
    named = RateLimit(shared="redis://127.0.0.1:6379/0", name="team-a")
    assert limit_key(named, "https://api.example.com/v1", "k") == KEY_PREFIX + "team-a"
    hidden = limit_key(limit, "https://user:pw@api.example.com/v1", None)
    assert "pw" not in hidden


def test_rate_limit_checks_its_shared_settings() -> None:
    """A bad URL or a name without shared= are refused; a password never shows."""
    with pytest.raises(ValueError, match=r"redis://, rediss:// or unix://"):
        RateLimit(shared="http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="needs shared="):
        RateLimit(name="team")
    with pytest.raises(ValueError, match="non-empty"):
        RateLimit(shared="redis://h", name="")
    limit = RateLimit(shared="redis://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in repr(limit)
    assert RateLimit(shared="unix:///run/redis.sock").shared == "unix:///run/redis.sock"


async def test_clients_of_one_key_share_by_default(redis_server: RedisServer) -> None:
    """Two clients of the same base URL and key share a limit without naming it."""
    async with open_fake_llm() as server:
        limit = RateLimit(requests_per_minute=60, shared=redis_server.url)
        async with (
            trio_llm.open_client(
                base_url=server.base_url, api_key="k1", model="m", rate_limit=limit
            ) as first,
            trio_llm.open_client(
                base_url=server.base_url, api_key="k1", model="m", rate_limit=limit
            ) as second,
            trio_llm.open_client(
                base_url=server.base_url, api_key="k2", model="m", rate_limit=limit
            ) as other,
        ):
            await first.chat_many(["q"] * 60, max_tokens=8)
            with trio.move_on_after(0.3) as scope:
                await second.chat("q", max_tokens=8)
            assert scope.cancelled_caught  # the key's 60 are spent
            with trio.fail_after(2):
                await other.chat("q", max_tokens=8)  # another key: its own limit


@redis_goes_away
async def test_unreachable_redis_fails_at_open() -> None:
    """A Redis that does not answer is a clear error when the client opens, not later."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(SharedLimitError) as caught:
        async with trio_llm.open_client(
            base_url="http://127.0.0.1:9/v1", model="m", rate_limit=RateLimit(shared=url)
        ):
            pass  # pragma: no cover
    with warnings.catch_warnings():  # coredis's streams (see conftest.py)
        warnings.filterwarnings("ignore", UNCLOSED_STREAM, ResourceWarning)
        gc.collect()
    message = str(caught.value)
    assert "cannot use the shared rate limit's Redis at redis://***@127.0.0.1:" in message
    assert "hunter2" not in message
    assert "hunter2" not in caught.value.url


async def test_missing_extra_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the redis extra, a shared limit says what to install."""
    monkeypatch.setitem(sys.modules, "coredis", None)
    with pytest.raises(trio_llm.ConfigurationError, match=r"pip install 'trio-llm\[redis\]'"):
        async with open_rate_limiter(
            RateLimit(shared="redis://127.0.0.1:1/0"), base_url="http://h/v1", api_key=None
        ):
            pass  # pragma: no cover


async def test_an_error_in_the_block_comes_out_as_raised(redis_server: RedisServer) -> None:
    """The client's tasks (and Redis's) do not wrap the block's exception in a group."""
    async with open_fake_llm() as server:
        with pytest.raises(KeyError):
            async with trio_llm.open_client(
                base_url=server.base_url, model="m", rate_limit=shared(redis_server)
            ):
                raise KeyError("mine")


@redis_goes_away
async def test_calls_wait_for_redis_to_come_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis gone mid-run: calls wait (never unlimited) and go on once it is back."""
    caplog.set_level(logging.WARNING, "trio_llm.ratelimit")
    async with open_fake_llm() as server:
        limit = shared(redis_server, requests_per_minute=6000)
        async with trio_llm.open_client(
            base_url=server.base_url, model="m", rate_limit=limit
        ) as client:
            await client.chat("before", max_tokens=8)
            redis_server.kill()
            done: list[float] = []

            async def call() -> None:
                await client.chat("during", max_tokens=8)
                done.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await trio.sleep(0.5)
                assert not done  # waiting for Redis, not sent without its limit
                assert server.stats.total_requests == 1
                back = trio.current_time()
                await trio.to_thread.run_sync(redis_server.start)
            assert done
            assert done[0] >= back
    messages = [record.getMessage() for record in caplog.records]
    assert any("does not answer" in message for message in messages)
    assert any("answers again" in message for message in messages)


@redis_goes_away
async def test_a_call_fails_clearly_when_redis_stays_away(redis_server: RedisServer) -> None:
    """Redis still away at the call's deadline: SharedLimitError says so, nothing sent."""
    async with (
        open_fake_llm(FakeLLMConfig()) as server,
        trio_llm.open_client(
            base_url=server.base_url,
            model="m",
            rate_limit=shared(redis_server, requests_per_minute=6000),
            retry=trio_llm.RetryPolicy(deadline=0.5),
        ) as client,
    ):
        redis_server.kill()
        with pytest.raises(SharedLimitError, match=r"has not answered for \d"):
            await client.chat("q")
        assert server.stats.total_requests == 0


_HOLDER = """
import sys, trio
from trio_llm import RateLimit
from trio_llm._ratelimit_redis import open_rate_limiter

async def main():
    limit = RateLimit(tokens_per_minute=600, shared=sys.argv[1], name="held")
    async with open_rate_limiter(limit, base_url="http://h/v1", api_key=None) as rate:
        reservations = [await rate.acquire(300) for _ in range(2)]  # never settled
        print("taken", flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_a_killed_process_leaks_nothing_past_the_window(redis_server: RedisServer) -> None:
    """A process killed with reservations held: what it took refills at the limit's
    rate like any use (all of it within the window), and its key expires after it."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _HOLDER, redis_server.url], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(30):
            assert (await process.stdout.receive_some()).startswith(b"taken")
        taken = trio.current_time()
    finally:
        process.kill()
        await process.wait()
    limit = shared(redis_server, name="held", tokens_per_minute=600)  # 10 a second
    async with limiter(limit) as rate:
        started = trio.current_time()
        await rate.acquire(10)  # the bucket was empty: a second of refill since then
        waited = trio.current_time() - started
        assert 0.9 - (started - taken) <= waited < 1.5
        tokens = rate.statistics().tokens_available
        assert tokens is not None
        # Back to full at 10 a second: the 600 taken are back within the window.
        assert (600 - tokens) / 10 <= 60
    async with open_redis(redis_server.url) as redis:
        ttl = await redis._client.pttl(KEY_PREFIX + "held")
    assert 0 < ttl <= 61_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--requirepass", "pw"), "must be called with the client already authenticated"),
        (
            ("--user", "default", "on", "nopass", "~*", "&*", "+@all", "-@scripting"),
            "no permissions to run the 'evalsha' command",
        ),
    ],
    ids=["password-missing", "scripts-refused"],
)
async def test_a_redis_that_refuses_fails_at_open(
    args: tuple[str, ...], message: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    """A Redis that answers but refuses (no password, no right to run scripts): a clear
    error when the client opens, with Redis's reason."""
    with (
        RedisServer(tmp_path, args=args) as refusing,
        pytest.raises(SharedLimitError, match=message),
    ):
        async with open_redis_limiter(refusing.url):
            pass  # pragma: no cover


async def test_a_missing_unix_socket_fails_at_open(tmp_path: Path) -> None:
    """unix:// names a socket file: one that is not there is said so at once."""
    url = f"unix://{tmp_path}/redis.sock"
    with pytest.raises(SharedLimitError, match="No such file"):
        async with open_rate_limiter(RateLimit(shared=url), base_url="http://h/v1", api_key=None):
            pass  # pragma: no cover


async def test_a_silent_server_fails_at_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something that accepts connections but never answers: no answer, within the
    timeout (its own cancel scope), is the error."""
    monkeypatch.setattr(_redis, "_CONNECT_TIMEOUT", 0.1)
    monkeypatch.setattr(_redis, "COMMAND_TIMEOUT", 0.1)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(SharedLimitError, match=r"no answer within 0\.2 s"):
            async with open_redis_limiter(f"redis://127.0.0.1:{port}/0"):
                pass  # pragma: no cover
        nursery.cancel_scope.cancel()


async def silent(stream: trio.SocketStream) -> None:
    async with stream:
        await trio.sleep_forever()


def open_redis_limiter(url: str) -> AbstractAsyncContextManager[RateLimiter | None]:
    return open_rate_limiter(RateLimit(shared=url), base_url="http://h/v1", api_key=None)


async def test_an_unusable_url_is_a_configuration_error(redis_server: RedisServer) -> None:
    """A URL the Redis client cannot use is a ConfigurationError naming it."""
    with pytest.raises(trio_llm.ConfigurationError, match="is not a usable Redis URL"):
        async with open_redis_limiter(redis_server.url + "?db=x"):
            pass  # pragma: no cover


@redis_goes_away
async def test_settlements_left_when_redis_is_gone_are_dropped_with_a_warning(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing while Redis is gone: the settlements not sent are dropped, said once."""
    caplog.set_level(logging.WARNING, "trio_llm.ratelimit")
    async with limiter(shared(redis_server, requests_per_minute=60)) as rate:
        reservation = await rate.acquire(0)
        redis_server.kill()
        reservation.refund()
    assert any("could not reach Redis" in record.getMessage() for record in caplog.records)


def test_pending_settlements_add_up() -> None:
    """Settlements queued while a send failed add to the later ones; the last levels win."""
    first, later = _Pending(), _Pending()
    first.requests, first.tokens, first.pause_until = 1, 10, 5.0
    later.requests, later.tokens, later.pause_until = 2, -3, 4.0
    levels = RateLimitLevels(requests=RateLimitLevel(limit=60))
    later.levels = (levels, 1, 2)
    first.merge(later)
    assert (first.requests, first.tokens, first.pause_until) == (3, 7, 5.0)
    assert first.levels == (levels, 1, 2)
    assert not _Pending()


def test_the_redis_server_helper_says_what_is_wrong(tmp_path: Path) -> None:
    """The test helper names a missing executable, and the log of one that did not start."""
    with pytest.raises(RedisServerError, match="not installed"):
        RedisServer(tmp_path, executable="no-such-redis-server")
    server = RedisServer(tmp_path, args=("--no-such-option", "1"))
    with pytest.raises(RedisServerError, match="did not start"):
        server.start()
    assert not server.running


@redis_goes_away
async def test_settlements_made_while_redis_is_away_reach_it_later(tmp_path: Path) -> None:
    """A refund made while Redis is gone is kept, and sent once Redis is back (here a
    Redis that keeps its data across the restart)."""
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    with RedisServer(tmp_path, args=durable) as server:
        limit = shared(server, requests_per_minute=6)  # one request every 10 s
        async with limiter(limit) as first:
            reservations = [await first.acquire(0) for _ in range(6)]
            server.kill()
            reservations[0].refund()
            await trio.sleep(0.3)  # the sender tries, fails, and waits to try again
            await trio.to_thread.run_sync(server.start)
            async with limiter(limit) as second:
                with trio.fail_after(3):
                    await second.acquire(0)  # the refunded request, long before a refill


@redis_goes_away
async def test_a_refund_sent_into_a_stalled_redis_is_not_applied_twice(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settlement whose command timed out may still run once Redis answers again (it
    waited in the socket): sending its refund again would give the capacity back twice.
    """
    import os
    import signal

    monkeypatch.setattr(_redis, "COMMAND_TIMEOUT", 0.3)
    limit = shared(redis_server, requests_per_minute=6)  # one request every 10 s
    async with limiter(limit) as first, limiter(limit) as second:
        reservations = [await first.acquire(0) for _ in range(6)]
        process = redis_server._process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)  # stalled: commands wait, unanswered
        try:
            reservations[0].refund()
            await trio.sleep(1.0)  # the sender times out, and tries again
        finally:
            os.kill(process.pid, signal.SIGCONT)
        await trio.sleep(0.5)
        with trio.fail_after(2):
            await second.acquire(0)  # the refunded request
        with trio.move_on_after(1) as scope:
            await second.acquire(0)  # none more: the next one refills in 10 s
        assert scope.cancelled_caught
