"""The fake server's Batch API test hooks: route holds, partial answers, knobs on the CLI."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx2
import pytest
import trio

from trio_llm._cli import _fake_server_config, build_parser
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm
from trio_llm.testing._batch_store import count_lines, iter_lines, match_batch_route

CHAT = "/v1/chat/completions"


def line(custom_id: str) -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": custom_id}]}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with open_fake_llm(FakeLLMConfig(batch_delay=10.0)) as fake:
        yield fake


@pytest.fixture
async def http(server: FakeLLMServer) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=server.root_url, timeout=3600) as client:
        yield client


async def upload(http: httpx2.AsyncClient, count: int) -> str:
    blob = "".join(json.dumps(line(f"r{i}")) + "\n" for i in range(count)).encode()
    files = {"file": ("in.jsonl", blob)}
    response = await http.post("/v1/files", data={"purpose": "batch"}, files=files)
    file_id: str = response.json()["id"]
    return file_id


def create_body(file_id: str) -> dict[str, Any]:
    return {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}


async def test_held_create_has_created_the_batch_before_its_answer(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, http: httpx2.AsyncClient
) -> None:
    """A held POST /v1/batches: the batch exists and is listed; a client that leaves is gone."""
    file_id = await upload(http, 1)
    hold = server.hold("POST /v1/batches")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(http.post, "/v1/batches", json=create_body(file_id)))
        await hold.wait_arrived()
        assert hold.waiting == 1
        [batch] = server.openai_batches
        listed = (await http.get("/v1/batches")).json()["data"]
        assert [b["id"] for b in listed] == [batch["id"]]
        nursery.cancel_scope.cancel()  # the client dies with the answer in flight
    await trio.sleep(1)
    assert hold.waiting == 0
    assert server.stats.disconnects == 1
    assert server.stats.batches_created == {"/v1/batches": 1}
    hold.release()
    response = await http.post("/v1/batches", json=create_body(file_id))
    assert response.status_code == 200
    assert len(server.openai_batches) == 2


async def test_release_lets_held_answers_go(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, http: httpx2.AsyncClient
) -> None:
    """Released answers arrive whole; wait_arrived counts every request that reached the hold."""
    hold = server.hold("POST /v1/messages/batches")
    body = {"requests": [{"custom_id": "a", "params": {"model": "m", "max_tokens": 5}}]}
    answers: list[int] = []

    async def create() -> None:
        answers.append((await http.post("/v1/messages/batches", json=body)).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create)
        nursery.start_soon(create)
        await hold.wait_arrived(2)
        assert answers == []
        assert len(server.message_batches) == 2
        hold.release()
    assert answers == [200, 200]
    assert hold.arrived == 2
    await hold.wait_arrived(2)  # already there: returns at once
    assert server.stats.batches_created == {"/v1/messages/batches": 2}


async def test_partial_hold_sends_whole_lines_then_waits(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, http: httpx2.AsyncClient
) -> None:
    """partial=0.5 on the content route: half the lines arrive, the rest after release."""
    file_id = await upload(http, 10)
    whole = (await http.get(f"/v1/files/{file_id}/content")).content
    hold = server.hold("GET /v1/files/{file_id}/content", partial=0.5)
    received = b""
    async with http.stream("GET", f"/v1/files/{file_id}/content") as response:
        assert response.headers["content-length"] == str(len(whole))
        chunks = response.aiter_raw()
        while received.count(b"\n") < 5:
            received += await chunks.__anext__()
        await hold.wait_arrived()
        assert received.count(b"\n") == 5
        assert received.endswith(b"\n")
        assert len(received) < len(whole)
        await trio.sleep(5)
        assert hold.waiting == 1
        hold.release()
        async for chunk in chunks:
            received += chunk
    assert received == whole


async def test_partial_zero_sends_only_the_head(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, http: httpx2.AsyncClient
) -> None:
    """partial=0.0 sends the status line and headers, then waits for the release."""
    file_id = await upload(http, 2)
    hold = server.hold("GET /v1/files/{file_id}/content", partial=0.0)
    async with http.stream("GET", f"/v1/files/{file_id}/content") as response:
        assert response.status_code == 200
        await hold.wait_arrived()
        hold.release()
        body = await response.aread()
    assert body.count(b"\n") == 2


async def test_hold_of_a_streamed_reply_waits_before_it(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, http: httpx2.AsyncClient
) -> None:
    """Any route may be held; a streamed chat reply waits whole (partial applies to bodies)."""
    hold = server.hold("POST /v1/chat/completions", partial=0.5)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(http.post, "/v1/chat/completions", json=body))
        await hold.wait_arrived()
        assert server.stats.requests_by_status == {}
        hold.release()
    assert server.stats.requests_by_status == {200: 1}


async def test_release_during_latency_lets_the_answer_through(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, http: httpx2.AsyncClient
) -> None:
    """A hold released while its request still waits out the latency does not hold it."""
    server.config = FakeLLMConfig(latency=5.0)
    hold = server.hold("POST /v1/chat/completions")
    answers: list[int] = []
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    async def chat() -> None:
        answers.append((await http.post("/v1/chat/completions", json=body)).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chat)
        await trio.sleep(1)
        hold.release()
    assert answers == [200]
    assert hold.arrived == 0


async def test_hold_refuses_unknown_routes_twice_held_and_bad_shares(server: FakeLLMServer) -> None:
    """hold() names a known 'METHOD /template' once; partial is in [0, 1)."""
    with pytest.raises(ValueError, match="unknown route"):
        server.hold("/v1/batches")
    with pytest.raises(ValueError, match="unknown route"):
        server.hold("POST /v1/batches/batch_123")
    with pytest.raises(ValueError, match="partial"):
        server.hold("GET /v1/files/{file_id}/content", partial=1.0)
    hold = server.hold("GET /v1/batches/{batch_id}")
    with pytest.raises(ValueError, match="already held"):
        server.hold("GET /v1/batches/{batch_id}")
    hold.release()
    server.hold("GET /v1/batches/{batch_id}").release()


async def test_default_delay_ends_batches_at_once() -> None:
    """With batch_delay 0 (the default) a batch ends a few scheduler ticks after its create."""
    async with open_fake_llm() as fake, httpx2.AsyncClient(base_url=fake.base_url) as plain:
        files = {"file": ("in.jsonl", (json.dumps(line("a")) + "\n").encode())}
        uploaded = (await plain.post("/files", data={"purpose": "batch"}, files=files)).json()
        batch = (await plain.post("/batches", json=create_body(uploaded["id"]))).json()
        assert batch["status"] == "validating"
        await trio.sleep(0.05)
        done = (await plain.get(f"/batches/{batch['id']}")).json()
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 1, "completed": 1, "failed": 0}


async def test_a_broken_batch_is_logged_and_the_server_keeps_serving(
    server: FakeLLMServer,
    http: httpx2.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected error inside a batch's processing is logged; other requests still work."""

    def broken(*_args: object) -> tuple[int, bytes]:
        raise RuntimeError("boom")

    monkeypatch.setattr(server._app, "answer_line", broken)
    server.config = FakeLLMConfig()
    file_id = await upload(http, 1)
    with caplog.at_level(logging.ERROR, logger="trio_llm.testing"):
        await http.post("/v1/batches", json=create_body(file_id))
        await trio.sleep(0.05)
    assert "unexpected error while processing a batch" in caplog.text
    assert (await http.get("/v1/models")).status_code == 200


def test_batch_knobs_are_fake_server_flags() -> None:
    """The batch knobs are flags of `trio-llm fake-server`, several ids after one flag."""
    args = build_parser().parse_args(
        [
            "fake-server",
            "--batch-delay",
            "5",
            "--batch-error-ids",
            "a",
            "b",
            "--batch-line-expire-rate",
            "0.1",
            "--batch-poll-throttle",
            "2",
        ]
    )
    config = _fake_server_config(args)
    assert config.batch_delay == 5.0
    assert config.batch_error_ids == ("a", "b")
    assert config.batch_line_expire_rate == 0.1
    assert config.batch_poll_throttle == 2


def test_batch_knobs_are_validated() -> None:
    """Rates are fractions, delays and counts non-negative."""
    with pytest.raises(ValueError, match="batch_error_rate"):
        FakeLLMConfig(batch_error_rate=1.5)
    with pytest.raises(ValueError, match="batch_delay"):
        FakeLLMConfig(batch_delay=-1)
    with pytest.raises(ValueError, match="batch_poll_throttle"):
        FakeLLMConfig(batch_poll_throttle=-1)
    assert FakeLLMConfig(batch_error_ids="only").batch_error_ids == ("only",)


def test_lines_of_a_blob() -> None:
    """Blank lines are skipped but counted in line numbers; a last line needs no newline."""
    blob = b'{"a":1}\n\n  \n{"b":2}\r\n{"c":3}'
    assert [number for number, _ in iter_lines(blob)] == [1, 4, 5]
    assert count_lines(blob) == 3
    assert count_lines(b"") == 0


def test_route_templates() -> None:
    """Batch API paths map to their route template and the id inside them."""
    assert match_batch_route("/v1/batches") == ("/v1/batches", None)
    assert match_batch_route("/v1/batches/b1/cancel") == ("/v1/batches/{batch_id}/cancel", "b1")
    assert match_batch_route("/v1/messages/batches/m1/results") == (
        "/v1/messages/batches/{message_batch_id}/results",
        "m1",
    )
    assert match_batch_route("/v1/batches/b1/else") is None
