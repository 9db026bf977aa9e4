"""The response cache seen from the client: over real sockets, the fake server counting.

Each test opens a client with ``cache=`` an SQLite file (or a cache object) against the
fake server on 127.0.0.1, and checks what reached the server: a hit sends nothing, takes
no capacity and counts no tokens; anything that changes the body misses; errors are not
stored; streams replay and are stored; identical calls made at once send one request.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import trio_llm
from trio_llm._routing import CHAT
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


def chat_requests(server: FakeLLMServer) -> int:
    """Chat requests the fake server received."""
    return server.stats.requests_by_endpoint.get("/v1/chat/completions", 0)


def cache_file(tmp_path: Path) -> str:
    return str(tmp_path / "replies.sqlite")


async def test_repeated_call_sends_nothing(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """A repeated call is answered from the cache: equal reply, marked, no request, no tokens."""
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        first = await client.chat("Explain trio.", temperature=0.7)
        second = await client.chat("Explain trio.", temperature=0.7)
        stats = client.statistics()
    assert chat_requests(fake_llm) == 1
    assert first.cached is False
    assert second.cached is True
    assert second == first  # raw payload, usage, request id, text: all equal
    assert second.raw == first.raw
    assert second.request_id == first.request_id
    assert (stats.sent, stats.succeeded, stats.cache_hits) == (1, 1, 1)
    assert stats.prompt_tokens == first.usage.prompt_tokens  # counted once
    assert stats.completion_tokens == first.usage.completion_tokens
    assert (stats.in_flight, stats.waiting) == (0, 0)


async def test_a_new_client_hits_what_an_earlier_one_stored(
    fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """Replies are committed when the client closes: the next client on the file hits."""
    path = cache_file(tmp_path)
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=path) as client:
        first = await client.chat("Persist me.")
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=path) as client:
        again = await client.chat("Persist me.")
    assert chat_requests(fake_llm) == 1
    assert again == first
    assert again.cached


async def test_any_change_to_the_body_misses(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """Model, messages, temperature, max_tokens or any extra field: each is a new request."""
    variants: list[tuple[Any, dict[str, Any]]] = [
        ("Hi.", {}),
        ("Hi!", {}),
        ("Hi.", {"temperature": 0.0}),
        ("Hi.", {"temperature": 1.0}),
        ("Hi.", {"max_tokens": 5}),
        ("Hi.", {"seed": 1}),
        ("Hi.", {"model": "other"}),
        ("Hi.", {"user": "someone"}),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}], {}),
    ]
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        for prompt, params in variants:
            assert not (await client.chat(prompt, **params)).cached
        for prompt, params in variants:  # each is stored under its own key
            assert (await client.chat(prompt, **params)).cached
    assert chat_requests(fake_llm) == len(variants)


async def test_key_ignores_order_base_url_and_api_key(tmp_path: Path) -> None:
    """Key order, the server's URL and the API key are not part of the key."""
    path = cache_file(tmp_path)
    async with open_fake_llm() as one, open_fake_llm() as two:
        async with trio_llm.open_client(
            base_url=one.base_url, api_key="key-1", model="m", cache=path
        ) as client:
            first = await client.chat("Same.", temperature=0.2, max_tokens=50)
        async with trio_llm.open_client(
            base_url=two.base_url, api_key="key-2", model="m", cache=path
        ) as client:
            again = await client.chat("Same.", max_tokens=50, temperature=0.2)
        assert (chat_requests(one), chat_requests(two)) == (1, 0)
    assert again == first
    assert again.cached


async def test_errors_are_not_cached(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """An error reply is not stored: the next call is sent, and its success is stored."""
    fake_llm.config = attrs.evolve(fake_llm.config, error_rate=1.0, error_status=400)
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        with pytest.raises(trio_llm.BadRequestError):
            await client.chat("Fail first.")
        fake_llm.config = attrs.evolve(fake_llm.config, error_rate=0.0)
        reply = await client.chat("Fail first.")
        again = await client.chat("Fail first.")
    assert chat_requests(fake_llm) == 2
    assert not reply.cached
    assert again.cached


async def test_a_cut_stream_is_not_cached(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """A stream that breaks after its first event stores nothing."""
    fake_llm.config = attrs.evolve(fake_llm.config, disconnect_rate=1.0, tokens_per_second=500.0)
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        async with client.stream("Break me.", retry=None) as stream:
            with pytest.raises(trio_llm.StreamError):
                async for _ in stream:
                    pass
        fake_llm.config = attrs.evolve(fake_llm.config, disconnect_rate=0.0)
        assert not (await client.chat("Break me.")).cached
    assert chat_requests(fake_llm) == 2


async def test_a_hit_takes_no_slot_and_no_rate_capacity(
    fake_llm: FakeLLMServer, autojump_clock: trio.abc.Clock
) -> None:
    """With the only slot held and the rate limit spent, a hit still returns at once."""
    # A cache in memory: the SQLite cache's thread would let the clock jump meanwhile.
    async with trio_llm.open_client(
        base_url=fake_llm.base_url,
        model="m",
        max_concurrency=1,
        rate_limit=trio_llm.RateLimit(requests_per_minute=1),
        cache=MemoryCache(),
    ) as client:
        first = await client.chat("Cached.")
        async with client.stream("Holds the only slot.", cache=False):
            assert client.statistics().in_flight == 1
            start = trio.current_time()
            with trio.fail_after(1):
                again = await client.chat("Cached.")
            assert trio.current_time() == start  # waited for neither slot nor rate
    assert again == first
    assert again.cached


async def test_cache_false_neither_reads_nor_writes(
    fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """cache=False sends the call even if stored, and stores nothing."""
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        await client.chat("Stored.")
        assert not (await client.chat("Stored.", cache=False)).cached
        assert not (await client.chat("Never stored.", cache=False)).cached
        assert not (await client.chat("Never stored.")).cached
        async with client.stream("Stored.", cache=False) as stream:
            async for _ in stream:
                pass
        assert not stream.response.cached
        embedded = await client.embed("x", cache=False)
        assert not (await client.embed("x")).cached
        assert not embedded.cached
        assert client.statistics().cache_hits == 0
    assert chat_requests(fake_llm) == 5


async def test_streams_hit_and_are_stored(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """A completed stream is stored aggregated; streams and plain calls hit each other."""
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        async with client.stream("Stream me.") as stream:
            streamed = "".join([chunk.text async for chunk in stream])
        original = stream.response
        plain = await client.chat("Stream me.")
        async with client.stream("Stream me.") as replay:
            chunks = [chunk async for chunk in replay]
        plain_first = await client.chat("Plain first.")
        async with client.stream("Plain first.") as replay_of_plain:
            replayed_text = "".join([chunk.text async for chunk in replay_of_plain])
        stats = client.statistics()
    assert chat_requests(fake_llm) == 2
    assert not original.cached
    assert plain.cached
    assert plain == original
    assert plain.text == streamed
    assert "".join(chunk.text for chunk in chunks) == streamed
    assert chunks[-1].finish_reason == original.finish_reason == "stop"
    assert replay.response == original
    assert replay.response.cached
    assert replay.response.usage == original.usage
    assert original.usage.total_tokens > 0
    assert replayed_text == plain_first.text
    assert replay_of_plain.response == plain_first
    assert replay_of_plain.response.cached
    assert stats.cache_hits == 3


async def test_stream_many_replays(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """stream_many answers stored prompts from the cache and sends only the others."""
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        stored = await client.chat("one")
        async with client.stream_many(["one", "two"]) as streams:
            texts = {0: "", 1: ""}
            async for index, item in streams:
                if isinstance(item, trio_llm.ChatChunk):
                    texts[index] += item.text
        results = streams.results
    assert chat_requests(fake_llm) == 2
    assert results[0].unwrap() == stored
    assert results[0].unwrap().cached
    assert texts[0] == stored.text
    assert not results[1].unwrap().cached
    assert texts[1] == results[1].unwrap().text


async def test_leaving_a_replayed_stream_at_the_finish_reason(
    fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """The common `if chunk.finish_reason: break` leaves a replay complete."""
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        stored = await client.chat("Break at the end.")
        async with client.stream("Break at the end.") as stream:
            async for chunk in stream:
                if chunk.finish_reason:
                    break
    assert stream.response == stored
    assert stream.statistics().chunks_delivered == 1


async def test_tool_calls_replay_as_stream(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """A stored reply with tool calls replays them as indexed deltas of one chunk."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        stored = await client.chat("Use the tool.", tools=tools, tool_choice="required")
        async with client.stream("Use the tool.", tools=tools, tool_choice="required") as stream:
            chunks = [chunk async for chunk in stream]
    assert stored.tool_calls
    assert [call["index"] for call in chunks[0].tool_calls] == list(range(len(stored.tool_calls)))
    assert chunks[0].tool_calls[0]["function"] == stored.tool_calls[0]["function"]
    assert stream.response.tool_calls == stored.tool_calls


async def test_embeddings_are_cached(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """Embeddings hit like chat replies: same vectors, no request; another input misses."""
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="e", cache=cache_file(tmp_path)
    ) as client:
        first = await client.embed(["a", "b"], dimensions=8)
        again = await client.embed(["a", "b"], dimensions=8)
        other = await client.embed(["a", "b"], dimensions=4)
    assert fake_llm.stats.requests_by_endpoint["/v1/embeddings"] == 2
    assert again == first
    assert again.cached
    assert again.vectors == first.vectors
    assert not other.cached
    assert len(other.vectors[0]) == 4


async def test_anthropic_replies_are_cached(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """With the Messages API a plain reply keeps its own shape; a stream its aggregation."""
    async with trio_llm.open_client(
        provider="anthropic", base_url=fake_llm.root_url, model="claude", cache=cache_file(tmp_path)
    ) as client:
        first = await client.chat("Bonjour.")
        again = await client.chat("Bonjour.")
        async with client.stream("Streamed.") as stream:
            async for _ in stream:
                pass
        plain = await client.chat("Streamed.")
        async with client.stream("Bonjour.") as replay:
            text = "".join([chunk.text async for chunk in replay])
    assert fake_llm.stats.requests_by_endpoint["/v1/messages"] == 2
    assert again == first
    assert again.cached
    assert again.raw["type"] == "message"
    assert plain == stream.response
    assert plain.cached
    assert text == first.text
    assert replay.response == first


async def test_providers_do_not_share_entries(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """The provider is part of the key: the same prompt through another API is sent."""
    path = cache_file(tmp_path)
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=path) as client:
        await client.chat("Either API.")
    async with trio_llm.open_client(
        provider="anthropic", base_url=fake_llm.root_url, model="m", cache=path
    ) as client:
        assert not (await client.chat("Either API.")).cached


async def test_identical_calls_at_once_send_one_request(
    fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """Many tasks asking the same at once: one request; the others replay its reply."""
    fake_llm.config = attrs.evolve(fake_llm.config, latency=0.2)
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        results = await client.chat_many(["Same question."] * 20 + ["Other question."])
        stats = client.statistics()
    replies = [result.unwrap() for result in results]
    assert chat_requests(fake_llm) == 2
    assert all(reply == replies[0] for reply in replies[:20])
    assert sum(reply.cached for reply in replies) == 19
    assert stats.cache_hits == 19
    assert stats.sent == 2


async def test_waiters_send_their_own_when_the_first_call_fails(tmp_path: Path) -> None:
    """If the call others wait for fails, they are sent after all (errors are not shared)."""
    # Seed 1 draws 0.134 then 0.847: the first request fails, the second succeeds.
    config = FakeLLMConfig(error_rate=0.5, error_status=400, seed=1)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(
            base_url=server.base_url, model="m", cache=cache_file(tmp_path)
        ) as client,
    ):
        results = await client.chat_many(["Fails first."] * 3)
        assert chat_requests(server) == 2  # the failed first call, then one more
    assert [result.ok for result in results].count(False) == 1
    assert sorted(result.unwrap().cached for result in results if result.ok) == [False, True]


async def test_a_cancelled_waiter_leaves_the_others_alone(
    fake_llm: FakeLLMServer, tmp_path: Path
) -> None:
    """Cancelling one of the calls waiting for an identical call cancels only that one."""
    fake_llm.config = attrs.evolve(fake_llm.config, latency=0.2)
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="m", cache=cache_file(tmp_path)
    ) as client:
        replies: list[trio_llm.ChatResponse] = []

        async def ask() -> None:
            replies.append(await client.chat("Wait."))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(0.05)
            with trio.move_on_after(0.05) as scope:
                await client.chat("Wait.")
            assert scope.cancelled_caught
        assert len(replies) == 1
        assert (await client.chat("Wait.")).cached
    assert chat_requests(fake_llm) == 1


async def test_cache_object_protocol(fake_llm: FakeLLMServer) -> None:
    """Any object with async get and set is a cache (here a dict in memory)."""
    cache = MemoryCache()
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=cache) as client:
        first = await client.chat("In memory.")
    assert len(cache.values) == 1
    (key,) = cache.values
    assert len(key) == 64
    assert all(c in "0123456789abcdef" for c in key)
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=cache) as client:
        assert await client.chat("In memory.") == first
    assert chat_requests(fake_llm) == 1


async def test_a_failing_cache_object(
    fake_llm: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A get that raises fails the call; a set that raises is logged once, calls go on."""

    class Broken:
        async def get(self, key: str) -> bytes | None:
            await trio.lowlevel.checkpoint()
            if key == self.refused:
                raise trio_llm.CacheError("unreachable")
            return None

        async def set(self, key: str, value: bytes) -> None:
            await trio.lowlevel.checkpoint()
            raise OSError("disk full")

        refused = ""

    broken = Broken()
    with caplog.at_level(logging.WARNING, logger="trio_llm"):
        async with trio_llm.open_client(
            base_url=fake_llm.base_url, model="m", cache=broken
        ) as client:
            assert not (await client.chat("a")).cached
            assert not (await client.chat("b")).cached
    assert [r.message for r in caplog.records].count(
        "response cache: a reply was not stored: OSError('disk full')"
    ) == 1
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=broken) as client:
        broken.refused = (
            client._requester.request(CHAT, "a", "m", {}, cache=True).cache_key  # chat("a")
            or ""
        )
        with pytest.raises(trio_llm.CacheError, match="unreachable"):
            await client.chat("a")


async def test_unreadable_entries_are_misses(fake_llm: FakeLLMServer) -> None:
    """A value that is not an entry of this version (or not of this kind) is a miss."""
    planted = MemoryCache()
    values = planted.values
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=planted) as client:
        await client.chat("x")
        await trio.testing.wait_all_tasks_blocked()  # written behind
        (key,) = values
        for junk in (
            b"not json",
            b"[]",
            b'{"format": 99, "payload": {}, "stored_at": 1}',
            b'{"format": 1, "payload": [], "stored_at": 1}',
        ):
            values[key] = junk
            assert not (await client.chat("x")).cached
            await trio.testing.wait_all_tasks_blocked()
        assert (await client.chat("x")).cached
        await client.embed("y")
        await trio.testing.wait_all_tasks_blocked()
        (embed_key,) = set(values) - {key}
        values[embed_key] = b'{"format": 1, "native": true, "payload": {"data": 5}, "stored_at": 1}'
        assert not (await client.embed("y")).cached  # a payload that does not parse
    assert chat_requests(fake_llm) == 5


async def test_bad_cache_setting() -> None:
    """cache= must be a path or a cache object."""
    for bad in (123, True, object()):
        with pytest.raises(trio_llm.ConfigurationError, match="cache must be a path"):
            async with trio_llm.open_client(base_url="http://127.0.0.1:9/v1", cache=bad):
                pass  # pragma: no cover


async def test_exceptions_of_the_block_come_out_as_raised(tmp_path: Path) -> None:
    """A cache's tasks do not wrap the block's own exception in a group."""
    with pytest.raises(KeyError):
        async with trio_llm.open_client(
            base_url="http://127.0.0.1:9/v1", cache=cache_file(tmp_path)
        ):
            raise KeyError("mine")


_OTHER_PROCESS = textwrap.dedent(
    """
    import sys, trio, trio_llm

    async def main(path, base_url, prompt):
        async with trio_llm.open_client(base_url=base_url, model="m", cache=path) as client:
            reply = await client.chat(prompt)
        print("cached" if reply.cached else "sent", reply.text)

    trio.run(main, *sys.argv[1:])
    """
)


async def other_process(path: str, base_url: str, prompt: str) -> str:
    """Run one chat call in a child process sharing the cache file; return what it says."""
    done = await trio.run_process(
        [sys.executable, "-c", _OTHER_PROCESS, path, base_url, prompt],
        capture_stdout=True,
        capture_stderr=True,
    )
    return done.stdout.decode().strip()


async def test_processes_share_the_file(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """An entry one process stores, another process hits, both ways, while both are open."""
    path = cache_file(tmp_path)
    async with (
        trio_llm.open_sqlite_cache(path) as cache,
        trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=cache) as client,
    ):
        mine = await client.chat("Stored here.")
        await trio.testing.wait_all_tasks_blocked()  # written behind: handed to the cache
        await cache.commit()  # (else within 50 ms)
        assert await other_process(path, fake_llm.base_url, "Stored here.") == f"cached {mine.text}"
        said = await other_process(path, fake_llm.base_url, "Stored there.")
        assert said.startswith("sent ")
        theirs = await client.chat("Stored there.")
        assert theirs.cached
        assert said == f"sent {theirs.text}"
    assert chat_requests(fake_llm) == 2


async def test_many_processes_write_at_once(fake_llm: FakeLLMServer, tmp_path: Path) -> None:
    """Several processes filling one file at once: every entry is kept, nothing is lost."""
    path = cache_file(tmp_path)
    prompts = [f"Process {i}" for i in range(4)]
    async with trio.open_nursery() as nursery:
        for prompt in prompts:
            nursery.start_soon(other_process, path, fake_llm.base_url, prompt)
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=path) as client:
        replies = [await client.chat(prompt) for prompt in prompts]
    assert all(reply.cached for reply in replies)
    assert chat_requests(fake_llm) == len(prompts)


def test_key_material() -> None:
    """The key hashes provider, kind and body; stream flags are left out; unsortable: None."""
    from trio_llm._cache import cache_key

    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 1}
    key = cache_key("openai", "chat", body)
    assert key == cache_key("openai", "chat", {**body, "stream": True, "stream_options": {}})
    assert key == cache_key("openai", "chat", dict(reversed(body.items())))
    assert key != cache_key("anthropic", "chat", body)
    assert key != cache_key("openai", "embeddings", body)
    assert key != cache_key("openai", "chat", {**body, "temperature": 1.5})
    bias = cache_key("openai", "chat", {**body, "logit_bias": {"50256": -100, "1": 5}})
    assert bias == cache_key("openai", "chat", {**body, "logit_bias": {1: 5, 50256: -100}})
    assert cache_key("openai", "chat", {**body, "x": {1, 2}}) is None  # not JSON: not cached


def test_entry_round_trip() -> None:
    """A stored entry reads back as it was written."""
    from trio_llm._cache import CachedReply

    entry = CachedReply(
        payload={"id": "x", "choices": []},
        native=True,
        request_id="req-1",
        usage=trio_llm.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        stored_at=12.5,
    )
    assert CachedReply.from_bytes(entry.to_bytes()) == entry


async def test_stores_beyond_the_write_behind_buffer_are_dropped() -> None:
    """A cache slower than the server: replies beyond the buffer are not stored (no wait)."""
    from trio_llm._cache import CacheHook

    send, receive = trio.open_memory_channel[tuple[str, bytes]](1)
    hook = CacheHook(MemoryCache(), send)
    async with trio_llm.open_client(base_url="http://127.0.0.1:9/v1", model="m") as client:
        requester = client._requester
        requests = []
        for n in range(3):
            request = requester.request(CHAT, str(n), "m", {})
            hook.address(request, {"n": n})
            requests.append(request)
        unkeyed = requester.request(CHAT, "x", "m", {})
    usage = trio_llm.Usage()
    for request in requests[:2]:
        hook.store(request, "req", {"id": "r"}, usage)
    assert receive.receive_nowait()[0] == requests[0].cache_key  # the first, buffered
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()  # the second was dropped: the buffer was full
    await receive.aclose()
    hook.store(requests[2], "req", {"id": "r"}, usage)  # closed: dropped quietly
    hook.store(unkeyed, None, {}, usage)  # a call that does not use the cache


async def test_a_cache_taking_stores_at_once(
    fake_llm: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache with set_nowait gets each reply at once; its failure is logged once."""

    class Immediate(MemoryCache):
        def set_nowait(self, key: str, value: bytes) -> None:
            if self.values:
                raise OSError("full")
            self.values[key] = value

    cache = Immediate()
    with caplog.at_level(logging.WARNING, logger="trio_llm"):
        async with trio_llm.open_client(
            base_url=fake_llm.base_url, model="m", cache=cache
        ) as client:
            await client.chat("first")
            assert len(cache.values) == 1  # stored by the call itself, no task in between
            for prompt in ("second", "third"):
                assert not (await client.chat(prompt)).cached
            assert (await client.chat("first")).cached
    assert sum("was not stored: OSError('full')" in r.message for r in caplog.records) == 1
