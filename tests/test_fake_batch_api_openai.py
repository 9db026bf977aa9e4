"""The fake server's OpenAI Files and Batch APIs, driven by the official ``openai`` package."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Final

import attrs
import httpx2
import openai
import pytest
import trio

from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

KEY = "sk-test"
CHAT: Final = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")


def line(custom_id: str, text: str = "hello", *, url: str = CHAT, **body: Any) -> dict[str, Any]:
    """One batch input line asking the chat endpoint about ``text``."""
    payload = {"model": "fake-gpt", "messages": [{"role": "user", "content": text}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": payload}


def jsonl(records: list[Any]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def parse(blob: bytes) -> dict[str, dict[str, Any]]:
    """Output or error file lines by custom_id (each custom_id once)."""
    out: dict[str, dict[str, Any]] = {}
    for raw in blob.splitlines():
        record = json.loads(raw)
        assert record["custom_id"] not in out
        out[record["custom_id"]] = record
    return out


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with open_fake_llm(FakeLLMConfig(api_key=KEY, batch_delay=100.0)) as fake:
        yield fake


@pytest.fixture
async def client(server: FakeLLMServer) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(
        base_url=server.base_url,
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
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx2.AsyncClient(base_url=server.base_url, timeout=3600, headers=headers) as h:
        yield h


async def submit(
    client: openai.AsyncOpenAI, records: list[Any], endpoint: str = CHAT, **extra: Any
) -> openai.types.Batch:
    uploaded = await client.files.create(file=("in.jsonl", jsonl(records)), purpose="batch")
    return await client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        **extra,
    )


async def finish(
    client: openai.AsyncOpenAI, batch_id: str, every: float = 1.0
) -> openai.types.Batch:
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        await trio.sleep(every)


async def content(client: openai.AsyncOpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    return parse((await client.files.content(file_id)).content)


async def test_batch_answers_like_the_online_endpoint(
    autojump_clock: trio.abc.Clock,
    server: FakeLLMServer,
    client: openai.AsyncOpenAI,
) -> None:
    """A completed batch's output lines hold what /v1/chat/completions answers online."""
    records = [line(f"r{i}", f"question {i}", max_tokens=12) for i in range(3)]
    batch = await submit(client, records, metadata={"job": "j1", "part": "0"})
    assert batch.status == "validating"
    assert batch.metadata == {"job": "j1", "part": "0"}
    assert batch.request_counts is not None
    assert batch.request_counts.total == 0
    assert batch.expires_at == batch.created_at + 24 * 3600
    done = await finish(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (3, 3)
    assert done.request_counts.failed == 0
    assert done.error_file_id is None
    assert done.model == "fake-gpt"
    assert done.in_progress_at is not None
    assert done.finalizing_at is not None
    assert done.completed_at is not None
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.completed_at - done.created_at in (99, 100, 101)  # batch_delay, trio time
    output = await content(client, done.output_file_id)
    assert set(output) == {"r0", "r1", "r2"}
    for custom_id, record in output.items():
        assert record["id"].startswith("batch_req_")
        assert record["error"] is None
        assert record["response"]["status_code"] == 200
        assert record["response"]["request_id"].startswith("req_")
        online = await client.chat.completions.create(
            model="fake-gpt",
            messages=[{"role": "user", "content": f"question {custom_id[1:]}"}],
            max_tokens=12,
        )
        body = record["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == online.choices[0].message.model_dump(
            exclude_none=True
        ) | {"refusal": None}
        assert body["usage"] == online.usage.model_dump(exclude_none=True)  # type: ignore[union-attr]
    output_file = await client.files.retrieve(done.output_file_id or "")
    assert output_file.purpose == "batch_output"
    assert output_file.filename == f"{batch.id}_output.jsonl"
    assert server.stats.files_uploaded == 1
    assert server.stats.batches_created == {"/v1/batches": 1}
    assert server.stats.batch_lines == 3
    assert server.openai_batches == [done.model_dump(mode="json", exclude_unset=True)]


async def test_statuses_move_with_trio_time(
    autojump_clock: trio.abc.Clock, client: openai.AsyncOpenAI
) -> None:
    """validating, in_progress with growing counts, finalizing, completed: each in its tenth."""
    batch = await submit(client, [line(f"r{i}") for i in range(2000)])
    start = trio.current_time()
    seen: list[tuple[str, int]] = []
    while True:
        current = await client.batches.retrieve(batch.id)
        assert current.request_counts is not None
        seen.append((current.status, current.request_counts.completed))
        if current.status == "completed":
            break
        await trio.sleep(start + 5 * len(seen) - trio.current_time())
    statuses = [status for status, _ in seen]
    assert statuses[:2] == ["validating", "validating"]  # 0 s and 5 s of 100
    assert statuses.count("in_progress") >= 14
    assert "finalizing" in statuses
    progress = [done for status, done in seen if status == "in_progress"]
    assert progress == sorted(progress)
    assert 0 < progress[len(progress) // 2] < 2000  # answered bit by bit
    assert seen[-1] == ("completed", 2000)


async def test_embeddings_batch(autojump_clock: trio.abc.Clock, client: openai.AsyncOpenAI) -> None:
    """An /v1/embeddings batch answers each line with the online embedding."""
    records = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "fake-embed", "input": f"text {i}"},
        }
        for i in range(2)
    ]
    done = await finish(client, (await submit(client, records, "/v1/embeddings")).id)
    assert done.status == "completed"
    output = await content(client, done.output_file_id)
    online = await client.embeddings.create(
        model="fake-embed", input="text 1", encoding_format="float"
    )
    body = output["e1"]["response"]["body"]
    assert body["data"][0]["embedding"] == pytest.approx(online.data[0].embedding)


async def test_refused_lines_go_to_the_error_file_with_status_400(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: openai.AsyncOpenAI
) -> None:
    """Injected refusals and bodies the endpoint refuses: status_code 400, error null."""
    server.config = attrs.evolve(server.config, batch_error_ids=("bad",))
    no_model = {"custom_id": "nomodel", "method": "POST", "url": CHAT, "body": {"messages": []}}
    records = [line("ok"), line("bad"), no_model, line("streamed", stream=True)]
    done = await finish(client, (await submit(client, records)).id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 3)
    assert set(await content(client, done.output_file_id)) == {"ok"}
    errors = await content(client, done.error_file_id)
    assert set(errors) == {"bad", "nomodel", "streamed"}
    for record in errors.values():
        assert record["error"] is None
        assert record["response"]["status_code"] == 400
        assert record["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert errors["streamed"]["response"]["body"]["error"]["param"] == "stream"
    error_file = await client.files.retrieve(done.error_file_id or "")
    assert error_file.filename == f"{done.id}_error.jsonl"


async def test_error_rate_is_drawn_per_line_from_the_seed(autojump_clock: trio.abc.Clock) -> None:
    """batch_error_rate refuses about that share of lines, the same ones for the same seed."""
    refused: list[set[str]] = []
    for _ in range(2):
        config = FakeLLMConfig(batch_error_rate=0.5, seed=7)
        async with (
            open_fake_llm(config) as fake,
            openai.AsyncOpenAI(
                base_url=fake.base_url, api_key="k", max_retries=0, timeout=3600
            ) as sdk,
        ):
            done = await finish(sdk, (await submit(sdk, [line(f"r{i}") for i in range(60)])).id)
            refused.append(set(await content(sdk, done.error_file_id)))
            answered = set(await content(sdk, done.output_file_id))
            assert answered | refused[-1] == {f"r{i}" for i in range(60)}
    assert refused[0] == refused[1]
    assert 15 < len(refused[0]) < 45


async def test_expired_lines_end_the_batch_expired(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: openai.AsyncOpenAI
) -> None:
    """With lines drawn to expire the batch ends 'expired'; the rest are answered."""
    server.config = attrs.evolve(server.config, batch_line_expire_rate=0.5)
    done = await finish(client, (await submit(client, [line(f"r{i}") for i in range(40)])).id)
    assert done.status == "expired"
    assert done.expired_at is not None
    assert done.completed_at is None
    output = await content(client, done.output_file_id)
    errors = await content(client, done.error_file_id)
    assert 0 < len(errors) < 40
    assert len(output) + len(errors) == 40
    assert done.request_counts is not None
    assert done.request_counts.completed == len(output)
    for record in errors.values():
        assert record["response"] is None
        assert record["error"]["code"] == "batch_expired"


async def test_whole_batch_expires_with_no_line_answered(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: openai.AsyncOpenAI
) -> None:
    """batch_expire_rate=1: status expired, every line batch_expired, no output file."""
    server.config = attrs.evolve(server.config, batch_expire_rate=1.0)
    done = await finish(client, (await submit(client, [line("a"), line("b")])).id)
    assert done.status == "expired"
    assert done.output_file_id is None
    errors = await content(client, done.error_file_id)
    assert {r["error"]["code"] for r in errors.values()} == {"batch_expired"}
    assert set(errors) == {"a", "b"}


async def test_whole_batch_fails_validation(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, client: openai.AsyncOpenAI
) -> None:
    """batch_fail_rate=1: status failed with an error list, no files, failed_at set."""
    server.config = attrs.evolve(server.config, batch_fail_rate=1.0)
    done = await finish(client, (await submit(client, [line("a")])).id)
    assert done.status == "failed"
    assert done.failed_at is not None
    assert done.in_progress_at is None
    assert done.errors is not None
    assert done.errors.object == "list"
    assert [e.code for e in done.errors.data or []] == ["invalid_request"]
    assert (done.output_file_id, done.error_file_id) == (None, None)
    assert server.stats.batch_lines == 0


LINE_PROBLEMS = [
    ([line("a"), line("b", url="/v1/embeddings")], "mismatched_url", 2),
    ([line("a"), b"{not json"], "invalid_json_line", 2),
    ([b"[1, 2]"], "invalid_json_line", 1),
    ([line("a"), line("a")], "duplicate_custom_id", 2),
    ([{**line("a"), "custom_id": ""}], "missing_custom_id", 1),
    ([{**line("a"), "method": "GET"}], "invalid_method", 1),
    ([{**line("a"), "body": "text"}], "invalid_body", 1),
    (
        [line("a"), {**line("b"), "body": {**line("b")["body"], "model": "other"}}],
        "mismatched_model",
        2,
    ),
    ([], "empty_file", None),
]


@pytest.mark.parametrize(("records", "code", "line_number"), LINE_PROBLEMS)
async def test_invalid_input_fails_the_batch(
    autojump_clock: trio.abc.Clock,
    client: openai.AsyncOpenAI,
    records: list[Any],
    code: str,
    line_number: int | None,
) -> None:
    """Each kind of bad input line makes the batch 'failed' with its code and line number."""
    blob = b"".join(r if isinstance(r, bytes) else jsonl([r]) for r in records)
    uploaded = await client.files.create(file=("in.jsonl", blob + b"\n"), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
    )
    done = await finish(client, batch.id)
    assert done.status == "failed"
    assert done.errors is not None
    [error] = done.errors.data or []
    assert (error.code, error.line) == (code, line_number)
    assert error.message


async def test_too_many_lines_fail_the_batch() -> None:
    """A file over 50,000 lines fails validation with too_many_requests."""
    one = json.dumps(line("x")).encode()
    blob = b"".join(one.replace(b'"x"', b'"%d"' % i) + b"\n" for i in range(50_001))
    # Real time: a MockClock may jump past the client's timeout while megabytes move.
    async with (
        open_fake_llm() as fake,
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=0) as sdk,
    ):
        uploaded = await sdk.files.create(file=("in.jsonl", blob), purpose="batch")
        batch = await sdk.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
        )
        done = await finish(sdk, batch.id, every=0.05)
    assert done.status == "failed"
    assert [e.code for e in done.errors.data or []] == ["too_many_requests"]  # type: ignore[union-attr]
    assert done.request_counts is not None
    assert done.request_counts.total == 50_001


CREATE_PROBLEMS = [
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", 400),
    ({"metadata": {"part": 1}}, "metadata.part", 400),
    ({"metadata": {"k" * 65: "v"}}, "metadata", 400),
    ({"metadata": {"k": "v" * 513}}, "metadata.k", 400),
    ({"metadata": ["a"]}, "metadata", 400),
    ({"completion_window": "1h"}, "completion_window", 400),
    ({"endpoint": "/v1/responses"}, "endpoint", 400),
    ({"endpoint": "/v1/nowhere"}, "endpoint", 400),
    ({"input_file_id": None}, "input_file_id", 400),
    ({"input_file_id": "file-missing"}, "id", 404),
]


@pytest.mark.parametrize(("override", "param", "status"), CREATE_PROBLEMS)
async def test_create_is_validated_like_the_real_api(
    http: httpx2.AsyncClient,
    server: FakeLLMServer,
    override: dict[str, Any],
    param: str,
    status: int,
) -> None:
    """A bad create request is refused at once (400/404) with the param named; no batch."""
    files = {"file": ("in.jsonl", jsonl([line("a")]))}
    uploaded = (await http.post("/files", data={"purpose": "batch"}, files=files)).json()
    body = {"input_file_id": uploaded["id"], "endpoint": CHAT, "completion_window": "24h"}
    response = await http.post("/batches", json={**body, **override})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert server.stats.batches_created == {}
    assert server.openai_batches == []


async def test_sixteen_string_metadata_pairs_are_accepted(client: openai.AsyncOpenAI) -> None:
    """The limit is inclusive: 16 pairs of 64-character keys and 512-character values."""
    metadata = {f"{i:02d}".ljust(64, "k"): "v" * 512 for i in range(16)}
    batch = await submit(client, [line("a")], metadata=metadata)
    assert batch.metadata == metadata


async def test_create_refuses_a_file_not_meant_for_batches(client: openai.AsyncOpenAI) -> None:
    """An input file uploaded with another purpose is refused with BadRequestError."""
    uploaded = await client.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await client.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
        )


@pytest.mark.parametrize(
    ("data", "files", "message"),
    [
        ({}, {"file": ("in.jsonl", b"{}")}, "purpose"),
        ({"purpose": "nonsense"}, {"file": ("in.jsonl", b"{}")}, "purpose"),
        ({"purpose": "batch"}, None, "'file'"),
        ({"purpose": "batch"}, {"file": ("in.csv", b"{}")}, ".jsonl"),
    ],
)
async def test_upload_is_validated(
    http: httpx2.AsyncClient, data: dict[str, str], files: Any, message: str
) -> None:
    """Uploads need a known purpose and a file; batch files must be named *.jsonl."""
    if files is None:
        files = {"other": ("x", b"")}
    response = await http.post("/files", data=data, files=files)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{}"),
        ("multipart/form-data", b"--x\r\n"),
        ("multipart/form-data; boundary=x", b"no delimiter here"),
        ("multipart/form-data; boundary=x", b'--x\r\ncontent-disposition: form-data; name="a"'),
        (None, b"{}"),
    ],
)
async def test_malformed_multipart_is_refused(
    http: httpx2.AsyncClient, content_type: str | None, body: bytes
) -> None:
    """A body that is not well-formed multipart/form-data gets a 400 saying so."""
    headers = {} if content_type is None else {"content-type": content_type}
    response = await http.post("/files", content=body, headers=headers)
    assert response.status_code == 400
    assert "multipart" in response.json()["error"]["message"]


async def test_parts_without_a_name_are_ignored(http: httpx2.AsyncClient) -> None:
    """Parts with no Content-Disposition name do not count as fields."""
    body = (
        b"--b\r\ncontent-type: text/plain\r\n\r\nstray\r\n"
        b"--b\r\ncontent-disposition: form-data\r\n\r\nnameless\r\n"
        b'--b\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        b"{}\n\r\n--b--\r\n"
    )
    headers = {"content-type": 'multipart/form-data; boundary="b"'}
    response = await http.post("/files", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == 3


async def test_input_file_over_the_size_limit_fails_the_batch(
    autojump_clock: trio.abc.Clock, client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input file over the batch size limit (200 MB; 10 bytes here) fails validation."""
    monkeypatch.setattr("trio_llm.testing._batch_openai.MAX_INPUT_BYTES", 10)
    done = await finish(client, (await submit(client, [line("a")])).id)
    assert done.status == "failed"
    assert [e.code for e in done.errors.data or []] == ["file_too_large"]  # type: ignore[union-attr]


async def test_upload_larger_than_the_ordinary_body_limit(
    server: FakeLLMServer, client: openai.AsyncOpenAI
) -> None:
    """A 40 MiB batch file is stored whole (other routes stop at 32 MiB) and read back."""
    blob = (b"x" * 1023 + b"\n") * (40 * 1024)
    uploaded = await client.files.create(file=("big.jsonl", blob), purpose="batch")
    assert uploaded.bytes == len(blob)
    assert (await client.files.content(uploaded.id)).content == blob
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x" * (33 * 1024 * 1024)}]
        )
    assert caught.value.status_code == 413


async def test_files_retrieve_list_and_page(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    """Files are listed newest first, filtered by purpose, paged with limit/after; 404 else."""
    ids = []
    for i in range(3):
        uploaded = await client.files.create(file=(f"f{i}.jsonl", b"{}\n"), purpose="batch")
        ids.append(uploaded.id)
    other = await client.files.create(file=("o.txt", b"x"), purpose="user_data")
    assert (await client.files.retrieve(ids[0])).filename == "f0.jsonl"
    listed = [f.id async for f in client.files.list(purpose="batch")]
    assert listed == ids[::-1]
    page = (await http.get("/files", params={"limit": 2})).json()
    assert [f["id"] for f in page["data"]] == [other.id, ids[2]]
    assert (page["has_more"], page["first_id"], page["last_id"]) == (True, other.id, ids[2])
    rest = (await http.get("/files", params={"limit": 2, "after": ids[2]})).json()
    assert [f["id"] for f in rest["data"]] == [ids[1], ids[0]]
    assert rest["has_more"] is False
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError):
        await client.files.content("file-nope")
    response = await http.get("/files", params={"limit": "zero"})
    assert response.status_code == 400


async def test_batches_list_newest_first_with_paging(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    """GET /v1/batches: newest first, limit/after/has_more, and the SDK's auto-paging."""
    ids = [(await submit(client, [line("a")], metadata={"n": str(i)})).id for i in range(5)]
    page = await client.batches.list(limit=2)
    assert [b.id for b in page.data] == [ids[4], ids[3]]
    assert page.has_more is True
    raw = (await http.get("/batches", params={"limit": 2, "after": ids[3]})).json()
    assert raw["object"] == "list"
    assert [b["id"] for b in raw["data"]] == [ids[2], ids[1]]
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (ids[2], ids[1], True)
    everything = [b.id async for b in client.batches.list(limit=2)]
    assert everything == ids[::-1]
    assert (await http.get("/batches", params={"after": "batch_gone"})).json()["data"] == []
    assert (await http.get("/batches", params={"limit": 101})).status_code == 400
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")


async def test_cancel_in_progress_keeps_answers_and_cancels_the_rest(
    autojump_clock: trio.abc.Clock, client: openai.AsyncOpenAI
) -> None:
    """cancelling, then cancelled: answered lines in the output, the rest batch_cancelled."""
    batch = await submit(client, [line(f"r{i}") for i in range(2000)])
    await trio.sleep(50)  # in progress, about half answered
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    again = await client.batches.cancel(batch.id)
    assert again.status == "cancelling"
    done = await finish(client, batch.id)
    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    assert done.completed_at is None
    assert done.finalizing_at is None
    output = await content(client, done.output_file_id)
    errors = await content(client, done.error_file_id)
    assert 0 < len(output) < 2000
    assert len(output) + len(errors) == 2000
    assert {r["error"]["code"] for r in errors.values()} == {"batch_cancelled"}
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)


async def test_cancel_while_validating_answers_nothing(
    autojump_clock: trio.abc.Clock, client: openai.AsyncOpenAI
) -> None:
    """A batch cancelled before it starts has every line cancelled, no output file."""
    batch = await submit(client, [line("a"), line("b")])
    assert (await client.batches.cancel(batch.id)).status == "cancelling"
    done = await finish(client, batch.id)
    assert done.status == "cancelled"
    assert done.in_progress_at is None
    assert done.output_file_id is None
    assert set(await content(client, done.error_file_id)) == {"a", "b"}


async def test_cancel_of_a_finished_batch_conflicts(
    autojump_clock: trio.abc.Clock, client: openai.AsyncOpenAI
) -> None:
    """A completed batch cannot be cancelled (409)."""
    done = await finish(client, (await submit(client, [line("a")])).id)
    with pytest.raises(openai.ConflictError, match="completed"):
        await client.batches.cancel(done.id)


async def test_first_polls_are_throttled_with_retry_after(
    autojump_clock: trio.abc.Clock, server: FakeLLMServer, http: httpx2.AsyncClient
) -> None:
    """batch_poll_throttle=2: the first two retrievals of each batch are 429 + Retry-After."""
    server.config = attrs.evolve(server.config, batch_poll_throttle=2, batch_retry_after=7.5)
    files = {"file": ("in.jsonl", jsonl([line("a")]))}
    uploaded = (await http.post("/files", data={"purpose": "batch"}, files=files)).json()
    body = {"input_file_id": uploaded["id"], "endpoint": CHAT, "completion_window": "24h"}
    batch = (await http.post("/batches", json=body)).json()
    statuses = []
    for _ in range(3):
        response = await http.get(f"/batches/{batch['id']}")
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.headers["retry-after"] == "8"
            assert response.headers["retry-after-ms"] == "7500"
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert statuses == [429, 429, 200]
    assert server.stats.rate_limited == 2


async def test_batch_routes_need_the_key(server: FakeLLMServer) -> None:
    """The Files and Batch routes are behind the same authentication as the rest."""
    async with httpx2.AsyncClient(base_url=server.base_url) as anonymous:
        assert (await anonymous.get("/batches")).status_code == 401
        assert (await anonymous.get("/files/file-x/content")).status_code == 401


async def test_wrong_method_is_405_with_allow(http: httpx2.AsyncClient) -> None:
    """A batch route with a method it does not take answers 405 naming the allowed ones."""
    response = await http.delete("/batches/batch_x")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    response = await http.put("/files")
    assert response.headers["allow"] == "POST, GET"
