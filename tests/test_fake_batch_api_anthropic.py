"""The fake server's Message Batches API, driven by the official ``anthropic`` package."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import attrs
import httpx2
import pytest
import trio

from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

KEY = "sk-ant-test"


def request(custom_id: str, text: str = "hello", **params: Any) -> dict[str, Any]:
    """One batch request asking the Messages endpoint about ``text``."""
    body = {
        "model": "fake-claude",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": text}],
        **params,
    }
    return {"custom_id": custom_id, "params": body}


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with open_fake_llm(FakeLLMConfig(api_key=KEY, batch_delay=100.0)) as fake:
        yield fake


@pytest.fixture
async def client(server: FakeLLMServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(
        base_url=server.root_url,
        api_key=KEY,
        max_retries=0,
        timeout=3600,
        _strict_response_validation=True,
    )
    try:
        yield sdk
    finally:
        await sdk.close()


@pytest.fixture
async def http(server: FakeLLMServer) -> AsyncIterator[httpx2.AsyncClient]:
    headers = {"x-api-key": KEY}
    async with httpx2.AsyncClient(base_url=server.root_url, timeout=3600, headers=headers) as h:
        yield h


async def finish(client: anthropic.AsyncAnthropic, batch_id: str) -> Any:
    while True:
        batch = await client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        await trio.sleep(1)


async def results(client: anthropic.AsyncAnthropic, batch_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async for entry in await client.messages.batches.results(batch_id):
        assert entry.custom_id not in out
        out[entry.custom_id] = entry.result
    return out


async def test_batch_answers_like_the_online_endpoint(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: anthropic.AsyncAnthropic
) -> None:
    """create, retrieve until ended, results: each message is what /v1/messages answers."""
    requests = [request(f"q-{i}", f"question {i}") for i in range(3)]
    batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert batch.id.startswith("msgbatch_")
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 3
    assert batch.results_url is None
    assert (batch.expires_at - batch.created_at).total_seconds() == 24 * 3600
    with pytest.raises(anthropic.NotFoundError, match="not ended"):
        await server_results(server, batch.id)
    done = await finish(client, batch.id)
    assert done.request_counts.model_dump() == {
        "processing": 0,
        "succeeded": 3,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert 99 <= (done.ended_at - done.created_at).total_seconds() <= 101
    assert done.results_url == f"{server.root_url}/v1/messages/batches/{batch.id}/results"
    got = await results(client, batch.id)
    assert set(got) == {"q-0", "q-1", "q-2"}
    for custom_id, result in got.items():
        assert result.type == "succeeded"
        online = await client.messages.create(
            model="fake-claude",
            max_tokens=16,
            messages=[{"role": "user", "content": f"question {custom_id[2:]}"}],
        )
        assert result.message.content == online.content
        assert result.message.usage == online.usage
    assert server.stats.batches_created == {"/v1/messages/batches": 1}
    assert server.stats.batch_lines == 3
    assert server.message_batches == [done.model_dump(mode="json", exclude_unset=True)]


async def server_results(server: FakeLLMServer, batch_id: str) -> None:
    """GET the results route directly, raising the SDK's error for a 404."""
    async with httpx2.AsyncClient(headers={"x-api-key": KEY}) as plain:
        response = await plain.get(f"{server.root_url}/v1/messages/batches/{batch_id}/results")
    if response.status_code == 404:
        message = response.json()["error"]["message"]
        raise anthropic.NotFoundError(message, response=response, body=response.json())


async def test_errored_and_expired_requests(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: anthropic.AsyncAnthropic
) -> None:
    """Refused params and injected errors are 'errored'; drawn lines 'expired'; counts agree."""
    server.config = attrs.evolve(
        server.config, batch_error_ids=("bad",), batch_line_expire_rate=0.5, seed=3
    )
    requests = [request("bad"), {"custom_id": "nomax", "params": {"model": "m", "messages": []}}]
    requests += [request(f"r{i}") for i in range(30)]
    batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    done = await finish(client, batch.id)
    got = await results(client, batch.id)
    kinds = {custom_id: result.type for custom_id, result in got.items()}
    counts = done.request_counts
    assert counts.errored == list(kinds.values()).count("errored")
    assert counts.expired == list(kinds.values()).count("expired")
    assert counts.succeeded == list(kinds.values()).count("succeeded")
    assert counts.errored + counts.expired + counts.succeeded == 32
    assert 0 < counts.expired < 30
    for custom_id in ("bad", "nomax"):
        if kinds[custom_id] == "errored":
            error = got[custom_id].error
            assert error.type == "error"
            assert error.error.type == "invalid_request_error"
    assert kinds["nomax"] in ("errored", "expired")


@pytest.mark.parametrize(
    ("knob", "kind"), [("batch_fail_rate", "errored"), ("batch_expire_rate", "expired")]
)
async def test_whole_batch_fails_or_expires(
    autojump_clock: trio.abc.Clock,
    server: FakeLLMServer,
    client: anthropic.AsyncAnthropic,
    knob: str,
    kind: str,
) -> None:
    """A failing batch has every request errored; an expiring one every request expired."""
    server.config = attrs.evolve(server.config, **{knob: 1.0})
    batch = await client.messages.batches.create(
        requests=[request("a"), request("b")]  # type: ignore[list-item]
    )
    done = await finish(client, batch.id)
    assert getattr(done.request_counts, kind) == 2
    got = await results(client, batch.id)
    assert {result.type for result in got.values()} == {kind}


async def test_cancel_keeps_answers_and_cancels_the_rest(
    autojump_clock: trio.abc.Clock, client: anthropic.AsyncAnthropic
) -> None:
    """canceling, then ended: answered requests kept, the rest 'canceled'; 409 once ended."""
    requests = [request(f"r{i}") for i in range(2000)]
    batch = await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    await trio.sleep(45)
    canceling = await client.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert (await client.messages.batches.cancel(batch.id)).processing_status == "canceling"
    done = await finish(client, batch.id)
    assert 0 < done.request_counts.canceled < 2000
    assert done.request_counts.succeeded + done.request_counts.canceled == 2000
    got = await results(client, batch.id)
    assert sum(result.type == "canceled" for result in got.values()) == (
        done.request_counts.canceled
    )
    with pytest.raises(anthropic.APIStatusError) as caught:
        await client.messages.batches.cancel(batch.id)
    assert caught.value.status_code == 409


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"requests": []}, "requests"),
        ({}, "requests"),
        ({"requests": ["x"]}, "requests.0"),
        ({"requests": [request("has space")]}, "requests.0.custom_id"),
        ({"requests": [request("x" * 65)]}, "requests.0.custom_id"),
        ({"requests": [request("a"), request("a")]}, "requests.1.custom_id"),
        ({"requests": [{"custom_id": "a", "params": "p"}]}, "requests.0.params"),
    ],
)
async def test_create_is_validated(
    server: FakeLLMServer, http: httpx2.AsyncClient, body: dict[str, Any], where: str
) -> None:
    """Bad requests are refused with 400 invalid_request_error naming where; no batch."""
    response = await http.post("/v1/messages/batches", json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(where + ":")
    assert server.message_batches == []


async def test_custom_id_pattern_accepts_its_whole_alphabet(
    client: anthropic.AsyncAnthropic,
) -> None:
    """Letters, digits, '_' and '-' up to 64 characters are a valid custom_id."""
    custom_id = ("aZ09_-" * 11)[:64]
    batch = await client.messages.batches.create(
        requests=[request(custom_id)]  # type: ignore[list-item]
    )
    assert batch.request_counts.processing == 1


async def test_at_most_100000_requests(server: FakeLLMServer, http: httpx2.AsyncClient) -> None:
    """100,001 requests are refused with 400."""
    one = {"custom_id": "x", "params": {}}
    response = await http.post("/v1/messages/batches", json={"requests": [one] * 100_001})
    assert response.status_code == 400
    assert "at most 100000" in response.json()["error"]["message"]


async def test_list_newest_first_with_paging(
    client: anthropic.AsyncAnthropic, http: httpx2.AsyncClient
) -> None:
    """list: newest first, limit, after_id, before_id, has_more, and SDK auto-paging."""
    ids = []
    for i in range(5):
        batch = await client.messages.batches.create(
            requests=[request(f"r{i}")]  # type: ignore[list-item]
        )
        ids.append(batch.id)
    newest = ids[::-1]
    page = await client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest[:2]
    assert (page.has_more, page.first_id, page.last_id) == (True, newest[0], newest[1])
    assert [b.id async for b in client.messages.batches.list(limit=2)] == newest
    after = await http.get("/v1/messages/batches", params={"limit": 2, "after_id": newest[3]})
    assert [b["id"] for b in after.json()["data"]] == [newest[4]]
    assert after.json()["has_more"] is False
    before = await http.get("/v1/messages/batches", params={"limit": 2, "before_id": newest[3]})
    payload = before.json()
    assert [b["id"] for b in payload["data"]] == newest[1:3]
    assert payload["has_more"] is True
    everything = await http.get("/v1/messages/batches", params={"before_id": newest[1]})
    assert [b["id"] for b in everything.json()["data"]] == newest[:1]
    assert everything.json()["has_more"] is False
    gone = await http.get("/v1/messages/batches", params={"after_id": "msgbatch_gone"})
    assert gone.json() == {"data": [], "has_more": False, "first_id": None, "last_id": None}
    bad = await http.get("/v1/messages/batches", params={"limit": 0})
    assert bad.status_code == 400
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve("msgbatch_nope")


async def test_polls_are_throttled_in_anthropic_format(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, http: httpx2.AsyncClient
) -> None:
    """batch_poll_throttle answers the first retrievals 429 rate_limit_error + Retry-After."""
    server.config = attrs.evolve(server.config, batch_poll_throttle=1, batch_retry_after=0.2)
    created = await http.post("/v1/messages/batches", json={"requests": [request("a")]})
    batch_id = created.json()["id"]
    first = await http.get(f"/v1/messages/batches/{batch_id}")
    assert first.status_code == 429
    assert first.json()["error"]["type"] == "rate_limit_error"
    assert first.headers["retry-after"] == "1"
    assert "request-id" in first.headers
    second = await http.get(f"/v1/messages/batches/{batch_id}")
    assert second.status_code == 200
    assert second.headers["request-id"] == second.headers["x-request-id"]


async def test_routes_need_the_key(server: FakeLLMServer) -> None:
    """Message batches are behind x-api-key like /v1/messages."""
    async with httpx2.AsyncClient(base_url=server.root_url) as anonymous:
        response = await anonymous.get("/v1/messages/batches")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


async def test_results_are_one_jsonl_line_each(
    autojump_clock: trio.abc.Clock, client: anthropic.AsyncAnthropic, http: httpx2.AsyncClient
) -> None:
    """The results body is JSONL: one object per request, custom_id and result."""
    batch = await client.messages.batches.create(
        requests=[request("a"), request("b")]  # type: ignore[list-item]
    )
    done = await finish(client, batch.id)
    response = await http.get(done.results_url)
    lines = [json.loads(raw) for raw in response.content.splitlines()]
    assert [(x["custom_id"], x["result"]["type"]) for x in lines] == [
        ("a", "succeeded"),
        ("b", "succeeded"),
    ]
    assert lines[0]["result"]["message"]["id"].startswith("msg_")
    assert response.content.endswith(b"\n")
