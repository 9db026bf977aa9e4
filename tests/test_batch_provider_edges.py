"""run_batch(via="provider"): the edges: failures retried at the next poll, --cancel of a
create in flight or of an ended batch, --simulate jobs, INPUT changing, wire-format
surprises, the job state's file, and the command's messages."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

import trio_llm
from trio_llm._cli import build_parser
from trio_llm._cost import Pricer
from trio_llm.batch import ViaProvider
from trio_llm.batch._command import _exit_status
from trio_llm.batch._job import Job, Part, load_job, save_job, state_path
from trio_llm.batch._summary import BatchSummary, ProviderBatch
from trio_llm.batch._via_provider import run_provider_batch
from trio_llm.providers import _anthropic_batch, _openai_batch
from trio_llm.providers._batch_api import RemoteBatch, ResultLine, batch_api_for, stream_lines
from trio_llm.providers._openai_batch import OpenAIBatchAPI, multipart_file
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

CHAT = "/v1/chat/completions"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("w") as file:
        for row in rows:
            file.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def prompts(count: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"r{i}", "prompt": f"question {i}"} for i in range(count)]


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def edit_state(path: Path, **fields: Any) -> None:
    """Change fields of the first part of the job state beside ``path``."""
    state = Path(state_path(str(path)))
    data = json.loads(state.read_text())
    data["parts"][0].update(fields)
    state.write_text(json.dumps(data))


def creates(server: FakeLLMServer) -> int:
    return sum(server.stats.batches_created.values())


async def run(
    server: FakeLLMServer, source: Path, target: Path, *, provider: str = "openai", **options: Any
) -> trio_llm.BatchSummary:
    base = server.root_url if provider == "anthropic" else server.base_url
    via = ViaProvider(
        poll_interval=options.pop("poll_interval", 1.0), cancel=options.pop("cancel", False)
    )
    retry = options.pop("retry", trio_llm.RetryPolicy())
    timeouts = options.pop("timeouts", None)
    async with trio_llm.open_client(
        base_url=base, model="m", provider=provider, retry=retry, timeouts=timeouts
    ) as client:
        return await run_provider_batch(str(source), str(target), client=client, via=via, **options)


async def stop_at(server: FakeLLMServer, route: str, run_it: Any) -> None:
    """Start ``run_it``, and cancel it once a request of ``route`` is held."""
    hold = server.hold(route)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_it)
        await hold.wait_arrived()
        nursery.cancel_scope.cancel()
    hold.release()


async def test_a_poll_that_fails_is_tried_again_at_the_next_poll(
    tmp_path: Path, autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 429 the client does not retry is said, and the next poll goes on."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_poll_throttle=2)) as server:
        summary = await run(server, source, target, retry=None, progress=True, poll_interval=5.0)
    assert summary.all_succeeded
    err = capsys.readouterr().err
    assert err.count("; trying again in 5 s") == 2
    assert "polling batch batch_" in err


@pytest.mark.parametrize(
    ("provider", "route"),
    [("openai", "POST /v1/batches"), ("anthropic", "POST /v1/messages/batches")],
)
async def test_a_create_whose_answer_is_lost_is_found_not_repeated(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    provider: str,
    route: str,
) -> None:
    """A create that times out is never retried blindly: the next round finds its batch."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm() as server:
        hold = server.hold(route)  # the batch is made; its answer never comes
        summary = await run(
            server,
            source,
            target,
            provider=provider,
            poll_interval=10.0,
            timeouts=trio_llm.Timeouts(read=5.0),
            progress=True,
        )
        hold.release()
    assert creates(server) == 1
    assert summary.all_succeeded
    err = capsys.readouterr().err
    assert "ReadTimeout" in err
    assert "trying again in 10 s" in err
    assert "created before" in err


async def test_cancel_finds_a_create_in_flight_and_cancels_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """--cancel of a part whose create's answer was lost: found, then cancelled."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=100.0)) as server:
        await stop_at(
            server,
            "POST /v1/messages/batches",
            partial(run, server, source, target, provider="anthropic"),
        )
        summary = await run(server, source, target, provider="anthropic", cancel=True)
        batch = server.message_batches[0]
    assert creates(server) == 1
    assert batch["cancel_initiated_at"] is not None
    assert [b.outcome for b in summary.batches] == ["cancelled"]
    records = read_output(target)
    assert sorted(r["custom_id"] for r in records) == ["r0", "r1", "r2"]
    assert {r["error"]["code"] for r in records if r["error"]} <= {"batch_cancelled"}


async def test_cancel_drops_a_create_that_never_reached_the_provider(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A part recorded as creating, with no batch at the provider, is dropped."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm() as server:
        await stop_at(
            server,
            "POST /v1/messages/batches",
            partial(run, server, source, target, provider="anthropic"),
        )
        edit_state(target, count=4)  # no batch of 4 requests exists
        summary = await run(server, source, target, provider="anthropic", cancel=True)
    assert [b.status for b in summary.batches] == ["dropped"]
    assert summary.unanswered == 3


async def test_cancel_of_a_batch_that_ended_meanwhile_merges_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Cancelling a batch that completed since the last poll (409) merges its results."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=10.0)) as server:
        await stop_at(server, "GET /v1/batches/{batch_id}", partial(run, server, source, target))
        await trio.sleep(20)  # the batch completes
        summary = await run(server, source, target, cancel=True)
    assert summary.all_succeeded
    assert [b.outcome for b in summary.batches] == ["completed"]


async def test_a_simulated_job_sends_its_lost_batches_again(
    tmp_path: Path, autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """--simulate: the batches of an earlier run ended with it; their lines go again."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=100.0)) as first:
        await stop_at(
            first, "GET /v1/batches/{batch_id}", partial(run, first, source, target, simulated=True)
        )
    async with open_fake_llm() as second:
        summary = await run(second, source, target, simulated=True, progress=True)
        edit_state(target, status="running")
        with pytest.raises(trio_llm.ConfigurationError, match="the --simulate server"):
            await run(second, source, target)  # not simulated: refused
    assert summary.all_succeeded
    assert creates(second) == 1
    assert "submitting their 3 lines again" in capsys.readouterr().err


async def test_a_finished_job_moves_to_another_server(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """With every batch merged, new lines may go to another base URL."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm() as first:
        await run(first, source, target)
    write_jsonl(source, prompts(3))
    async with open_fake_llm() as second:
        summary = await run(second, source, target)
    assert summary.succeeded == 1
    assert summary.skipped == 2
    job = load_job(state_path(str(target)))
    assert job is not None
    assert job.base_url == second.base_url
    assert [part.count for part in job.parts] == [2, 1]


async def test_a_line_changed_under_its_part_is_named(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A line of a recorded part that no longer parses: its line number is named.

    (--skip-invalid lets such a line past the check of the whole file.)
    """
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm() as server:
        await stop_at(server, "POST /v1/files", partial(run, server, source, target))
        # found uploaded: its lines are checked before the batch is created
        write_jsonl(source, [prompts(3)[0], "{broken", prompts(3)[2]])
        with pytest.raises(trio_llm.BatchInputError, match=r"in\.jsonl:2: the input changed"):
            await run(server, source, target, skip_invalid=True)
        hold = server.hold("POST /v1/batches")  # (not reached)
        edit_state(target, status="planned", file_id=None)  # to be read and uploaded
        with pytest.raises(trio_llm.BatchInputError, match=r"in\.jsonl:2: the input changed"):
            await run(server, source, target, skip_invalid=True)
        hold.release()
    assert creates(server) == 0
    assert server.stats.files_uploaded == 1


async def test_bodies_the_provider_cannot_translate_are_invalid(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A chat body Anthropic's adapter refuses is an invalid line, found before sending."""
    bad = {
        "custom_id": "bad",
        "method": "POST",
        "url": CHAT,
        "body": {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [{"function": "x"}]},
            ]
        },
    }
    source = write_jsonl(tmp_path / "in.jsonl", [*prompts(1), bad])
    async with open_fake_llm() as server:
        with pytest.raises(trio_llm.BatchInputError, match=r"in\.jsonl:2: a tool call needs"):
            await run(server, source, tmp_path / "out.jsonl", provider="anthropic")


async def test_bad_settings_are_refused(tmp_path: Path) -> None:
    """Limits below 1, a poll interval of 0, an unknown via: ValueError."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    target = tmp_path / "out.jsonl"
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        for settings in ({"max_batch_lines": 0}, {"max_batch_bytes": 0}, {"poll_interval": 0}):
            with pytest.raises(ValueError, match="must be"):
                ViaProvider(**settings)
        with pytest.raises(ValueError, match="via must be 'online' or 'provider'"):
            await trio_llm.run_batch(source, target, client=client, via="carrier pigeon")
        with pytest.raises(trio_llm.ConfigurationError, match="is the input file"):
            await trio_llm.run_batch(source, source, client=client, via="provider")


def test_multipart_body_holds_the_fields_and_the_file() -> None:
    """The upload is one multipart body: purpose, then the file with its name and type."""
    content_type, body = multipart_file(
        {"purpose": "batch"}, "a.jsonl", [b'{"x":1}\n', b'{"x":2}\n'], content_type="t/x"
    )
    boundary = content_type.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode())
    assert b'name="purpose"\r\n\r\nbatch\r\n' in body
    assert b'filename="a.jsonl"\r\nContent-Type: t/x\r\n\r\n{"x":1}\n{"x":2}\n\r\n' in body
    assert body.endswith(f"--{boundary}--\r\n".encode())


async def test_replies_that_are_not_the_apis_are_errors(fake_llm: FakeLLMServer) -> None:
    """Batch objects and results lines of an unexpected shape raise APIResponseError."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        api = OpenAIBatchAPI(client)
        with pytest.raises(trio_llm.APIResponseError, match="unexpected shape"):
            _openai_batch._parsed({"id": "b"})
        lines: list[ResultLine] = []
        file_id = await api.upload("x.jsonl", [b'{"custom_id": 3}\n'])
        bad = RemoteBatch(id="b", status="completed", ended=True, results=(file_id,))
        with pytest.raises(trio_llm.APIResponseError, match="not what the API writes"):
            await api.results(bad, lines.append)
        bad_results = await api.upload("y.jsonl", [b'{"custom_id": "a", "response": 1}\n'])
        with pytest.raises(trio_llm.APIResponseError, match="neither a response"):
            await api.results(
                RemoteBatch(id="b", status="completed", ended=True, results=(bad_results,)),
                lines.append,
            )
    assert lines == []
    with pytest.raises(trio_llm.APIResponseError, match="unexpected shape"):
        _anthropic_batch._batch({"id": "msgbatch_x"})


async def test_results_url_of_another_origin_is_not_followed(
    autojump_clock: trio.abc.Clock, fake_llm: FakeLLMServer
) -> None:
    """The API key goes only to the client's origin: another results URL is replaced."""
    async with trio_llm.open_client(
        base_url=fake_llm.root_url, model="m", provider="anthropic"
    ) as client:
        api = batch_api_for(client)
        line = api.line(
            "a",
            "/v1/messages",
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        )
        batch = await api.create(file_id=None, lines=[line], url="/v1/messages", metadata={})
        while not batch.ended:
            await trio.sleep(1)
            batch, _ = await api.retrieve(batch.id)
        elsewhere = RemoteBatch(
            id=batch.id, status="ended", ended=True, results=("https://example.invalid/x",)
        )
        results: list[ResultLine] = []
        await api.results(elsewhere, results.append)
    assert [(r.custom_id, r.status_code) for r in results] == [("a", 200)]


async def test_finding_a_batch_pages_back_to_the_time_it_was_begun(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listing is read page by page, newest first, back to the intent's time."""
    monkeypatch.setattr(_openai_batch, "_PAGE", 2)
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        api = OpenAIBatchAPI(client)
        line = api.line("a", CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
        file_ids = [await api.upload(f"f{i}.jsonl", [line]) for i in range(5)]
        begun = [server.openai_batches]
        for index, file_id in enumerate(file_ids):
            meta = {"trio_llm_job": "j", "trio_llm_part": str(index)}
            await api.create(file_id=file_id, lines=[], url=CHAT, metadata=meta)
        found = await api.find_created(
            metadata={"trio_llm_job": "j", "trio_llm_part": "0"},
            file_id=None,
            count=1,
            since=0.0,
            known=frozenset(),
        )
        by_file = await api.find_created(
            metadata={}, file_id=file_ids[1], count=1, since=0.0, known=frozenset()
        )
        missing = await api.find_created(
            metadata={"trio_llm_job": "other", "trio_llm_part": "0"},
            file_id=None,
            count=1,
            since=0.0,
            known=frozenset(),
        )
        upload = await api.find_upload("f3.jsonl", len(line), 0.0)
    assert begun
    assert found is not None
    assert found.metadata["trio_llm_part"] == "0"
    assert by_file is not None
    assert by_file.input_file_id == file_ids[1]
    assert missing is None
    assert upload == file_ids[3]


def test_job_state_files(tmp_path: Path) -> None:
    """Saved atomically (no temporary left, even on a failure); refused when not a state."""
    path = str(tmp_path / "out.jsonl.job.json")
    job = Job(
        job_id="j", provider="openai", base_url="u", parts=[Part(index=0, url=CHAT, model="m")]
    )
    save_job(path, job)
    assert load_job(path) == job
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):
        save_job(str(tmp_path / "taken"), job)  # the rename fails: its temporary goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.job.json", "taken"]
    for text, why in (("[]", "not a JSON object"), ('{"version": 9}', "version 9")):
        Path(path).write_text(text)
        with pytest.raises(trio_llm.BatchInputError, match=why):
            load_job(path)


def _summary(**fields: Any) -> BatchSummary:
    values: dict[str, Any] = {
        "input_path": "in.jsonl",
        "output_path": "out.jsonl",
        "total": 10,
        "succeeded": 0,
        "failed": 0,
        "invalid": 0,
        "skipped": 0,
        "skipped_failed": 0,
        "unanswered": 10,
        "retries": 0,
        "rate_limited": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "tokens": 0,
        "elapsed": 1.0,
        "interrupted": False,
        "via": "provider",
    }
    return BatchSummary(**{**values, **fields})


def _batch(status: str, batch_id: str | None) -> ProviderBatch:
    return ProviderBatch(
        part=0,
        id=batch_id,
        status=status,
        remote_status=None,
        outcome=None,
        lines=5,
        done=0,
        failed=0,
    )


def test_exit_messages_of_provider_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Interrupted: the batches run on (or nothing runs); cancelled: how to submit the rest."""
    args = build_parser().parse_args(["batch", "in.jsonl", "-o", "out.jsonl", "--via", "provider"])
    running = (_batch("running", f"batch_{i}") for i in range(5))
    assert _exit_status(_summary(interrupted=True, batches=tuple(running)), args) == 130
    assert _exit_status(_summary(interrupted=True, batches=(_batch("planned", None),)), args) == 130
    assert _exit_status(_summary(), args) == 1
    unknown = trio_llm.NotFoundError("no such batch", status_code=404)
    stopped = _summary(stopped="polling batch batch_x: HTTP 404", stop_error=unknown)
    assert _exit_status(stopped, args) == 3
    err = capsys.readouterr().err
    assert "unknown to this key, or the server has no Batch API: check $OPENAI_API_KEY" in err
    assert "5 batch(es) keep running at the provider (batch_0, batch_1, batch_2, ...)" in err
    assert (
        "to cancel them instead: trio-llm batch in.jsonl -o out.jsonl --via provider --cancel"
        in err
    )
    assert "interrupted; to resume, run the same command again" in err
    assert "run without --cancel to submit them" in err


async def test_downloads_are_read_line_by_line_within_a_limit(fake_llm: FakeLLMServer) -> None:
    """A last line without its newline is read; a line over the limit is refused."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        api = OpenAIBatchAPI(client)
        file_id = await api.upload("z.jsonl", [b'{"a": 1}\n\n', b'{"b": 2}'])
        url = f"{fake_llm.base_url}/files/{file_id}/content"
        lines: list[bytes] = []
        await stream_lines(client, url, lines.append, max_line=100)
        assert lines == [b'{"a": 1}', b'{"b": 2}']
        with pytest.raises(trio_llm.APIResponseError, match="a line longer than 5 bytes"):
            await stream_lines(client, url, lines.append, max_line=5)


class _TouchedCache:
    """A response cache that records every lookup and store."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def get(self, key: str) -> bytes | None:
        self.calls.append(f"get {key}")
        return None

    async def set(self, key: str, value: bytes) -> None:
        self.calls.append(f"set {key}")


async def test_batch_api_calls_never_touch_the_response_cache(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """Uploads, creates, polls and downloads have no cache key: no lookup, no store."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    cache = _TouchedCache()
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m", cache=cache) as client:
        summary = await trio_llm.run_batch(
            source, target, client=client, via=ViaProvider(poll_interval=0.05)
        )
        assert client.statistics().cache_hits == 0
    assert (summary.succeeded, summary.via) == (3, "provider")
    assert cache.calls == []


async def test_a_client_of_several_endpoints_is_refused(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """A batch and its files live at one server: several endpoints are refused up front."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    endpoints = [
        trio_llm.Endpoint(fake_llm.base_url, name="a"),
        trio_llm.Endpoint(fake_llm.base_url, name="b"),
    ]
    async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
        with pytest.raises(trio_llm.ConfigurationError, match="needs a client of one endpoint"):
            await trio_llm.run_batch(source, target, client=client, via="provider")
        with pytest.raises(trio_llm.ConfigurationError, match="not 2: a batch and its files"):
            await batch_api_for(client).retrieve("batch_x")
    assert not target.exists()
    assert creates(fake_llm) == 0
    assert fake_llm.stats.total_requests == 0


async def test_one_endpoint_given_as_a_list_runs_the_job(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """open_client(endpoints=[one]) is one server: the job runs there."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    endpoints = [trio_llm.Endpoint(fake_llm.base_url, name="only")]
    async with trio_llm.open_client(endpoints=endpoints, model="m") as client:
        summary = await trio_llm.run_batch(
            source, target, client=client, via=ViaProvider(poll_interval=0.05)
        )
    assert summary.all_succeeded
    assert creates(fake_llm) == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_job_through_httpx2s_own_transport(
    tmp_path: Path, fake_llm: FakeLLMServer, provider: str
) -> None:
    """Not trio-llm's transport: uploads (multipart), GETs and downloads through httpx2."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    target = tmp_path / "out.jsonl"
    base = fake_llm.root_url if provider == "anthropic" else fake_llm.base_url
    async with trio_llm.open_client(
        base_url=base, model="m", provider=provider, transport=httpx2.AsyncHTTPTransport()
    ) as client:
        summary = await trio_llm.run_batch(
            source, target, client=client, via=ViaProvider(poll_interval=0.05)
        )
    assert summary.all_succeeded
    assert sorted(record["custom_id"] for record in read_output(target)) == [
        f"r{i}" for i in range(4)
    ]


@pytest.mark.parametrize(("name", "value"), [("shard", (1, 2)), ("max_cost", 5.0)])
async def test_a_shard_or_a_budget_is_refused(
    tmp_path: Path, fake_llm: FakeLLMServer, name: str, value: object
) -> None:
    """run_batch(shard= or max_cost=, via="provider"): ValueError before anything is sent."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(ValueError, match=f"{name}= is for online runs"):
            await trio_llm.run_batch(source, target, client=client, via="provider", **{name: value})
    assert not target.exists()
    assert fake_llm.stats.total_requests == 0


async def test_the_summary_prices_the_answers_at_batch_prices(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """summary.cost: each answer's usage at the provider's Batch API price (half online)."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="gpt-4o-mini") as client:
        summary = await trio_llm.run_batch(
            source, target, client=client, via=ViaProvider(poll_interval=0.05)
        )
    pricer = Pricer("openai")
    batch = online = 0.0
    for record in read_output(target):
        body = record["response"]["body"]
        usage = trio_llm.Usage(
            prompt_tokens=body["usage"]["prompt_tokens"],
            completion_tokens=body["usage"]["completion_tokens"],
        )
        batch += pricer.cost(usage, body["model"], batch=True) or 0.0
        online += pricer.cost(usage, body["model"]) or 0.0
    assert summary.cost == pytest.approx(batch)
    assert 0 < batch < online


async def test_an_unpriced_model_leaves_the_cost_unknown(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """A model with no price: summary.cost is None, as online."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="no-such-model") as client:
        summary = await trio_llm.run_batch(
            source, target, client=client, via=ViaProvider(poll_interval=0.05)
        )
    assert summary.succeeded == 2
    assert summary.cost is None


async def test_a_lost_anthropic_create_is_not_confused_with_another_jobs_batch(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Another job's batch of as many requests, made just before, is not taken for ours.

    Shards of equal size run side by side: the batch found for a create whose answer
    was lost must be the one made after the create began, not an earlier one.
    """
    other = write_jsonl(tmp_path / "other.jsonl", prompts(3))
    rows = [{"custom_id": f"y{i}", "prompt": f"question {i}"} for i in range(3)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=100.0)) as server:
        await stop_at(
            server,
            "GET /v1/messages/batches/{message_batch_id}",
            partial(run, server, other, tmp_path / "other.out.jsonl", provider="anthropic"),
        )
        await trio.sleep(60)
        await stop_at(
            server,
            "POST /v1/messages/batches",
            partial(run, server, source, target, provider="anthropic"),
        )
        summary = await run(server, source, target, provider="anthropic")
        ours = server.message_batches[-1]["id"]
    assert creates(server) == 2
    assert [b.id for b in summary.batches] == [ours]
    assert summary.all_succeeded
