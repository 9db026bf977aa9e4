"""run_batch(via="provider"): OpenAI's and Anthropic's Batch APIs against the fake server.

Splitting, merging in the online output format, failed/expired/cancelled lines,
--retry-failed, Retry-After on polls, --cancel, resuming after a cancellation at each
step, validation, and the job state's guards. Over real sockets, on a MockClock.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import trio_llm
from trio_llm.batch import ViaProvider
from trio_llm.batch._job import load_job, state_path
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm

CHAT = "/v1/chat/completions"
OPENAI_CREATES = "/v1/batches"
ANTHROPIC_CREATES = "/v1/messages/batches"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write ``rows`` as JSON lines."""
    with path.open("w") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    return path


def prompts(count: int, *, prefix: str = "r") -> list[dict[str, Any]]:
    """Short-form lines ``r0``, ``r1``, ..."""
    return [
        {"custom_id": f"{prefix}{i}", "prompt": f"question {i}", "max_tokens": 5}
        for i in range(count)
    ]


def read_output(path: Path) -> list[dict[str, Any]]:
    """Parse every line of an output file."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def each_once(path: Path, count: int, *, prefix: str = "r") -> dict[str, dict[str, Any]]:
    """Every custom_id of ``prompts(count)`` has exactly one line; return them by id."""
    records = read_output(path)
    assert Counter(r["custom_id"] for r in records) == Counter(f"{prefix}{i}" for i in range(count))
    return {record["custom_id"]: record for record in records}


def exists(path: str) -> bool:
    """Whether ``path`` exists."""
    return Path(path).exists()


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``."""
    Path(path).write_text(text)


def forget_batch(path: str) -> None:
    """Make the job state at ``path`` name a batch the server does not know."""
    state = json.loads(Path(path).read_text())
    state["parts"][0]["batch_id"] = "batch_unknown"
    Path(path).write_text(json.dumps(state))


def base_of(server: FakeLLMServer, provider: str) -> str:
    return server.root_url if provider == "anthropic" else server.base_url


async def run(
    server: FakeLLMServer,
    source: Path,
    target: Path,
    *,
    provider: str = "openai",
    **options: Any,
) -> trio_llm.BatchSummary:
    """Run ``source`` through the provider's Batch API (polling every second).

    ``options`` are ``ViaProvider``'s fields and ``run_batch``'s other arguments.
    """
    settings = {"poll_interval": 1.0}
    for name in ("poll_interval", "max_batch_lines", "max_batch_bytes", "cancel"):
        if name in options:
            settings[name] = options.pop(name)
    via = ViaProvider(**settings)
    async with trio_llm.open_client(
        base_url=base_of(server, provider), model="m", provider=provider
    ) as client:
        return await trio_llm.run_batch(source, target, client=client, via=via, **options)


def creates(server: FakeLLMServer) -> int:
    """Batches the server created, both APIs."""
    return sum(server.stats.batches_created.values())


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_lines_split_into_batches_and_merge_as_online_answers(
    tmp_path: Path, autojump_clock: trio.abc.Clock, provider: str
) -> None:
    """25 lines, 10 a batch: 3 batches; each line once, with the answer online mode gets."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(25))
    target, online = tmp_path / "out.jsonl", tmp_path / "online.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=60.0)) as server:
        summary = await run(server, source, target, provider=provider, max_batch_lines=10)
        async with trio_llm.open_client(
            base_url=base_of(server, provider), model="m", provider=provider
        ) as client:
            await trio_llm.run_batch(source, online, client=client)
    assert creates(server) == 3
    assert summary.all_succeeded
    assert summary.succeeded == 25
    assert summary.via == "provider"
    assert [batch.lines for batch in summary.batches] == [10, 10, 5]
    assert {batch.status for batch in summary.batches} == {"merged"}
    assert summary.tokens > 0
    merged, answered = each_once(target, 25), each_once(online, 25)
    for custom_id, record in merged.items():
        assert record["error"] is None
        assert record["response"]["status_code"] == 200
        body, expected = record["response"]["body"], answered[custom_id]["response"]["body"]
        assert record.keys() == answered[custom_id].keys()
        text = body["choices"][0]["message"] if provider == "openai" else body["content"]
        same = expected["choices"][0]["message"] if provider == "openai" else expected["content"]
        assert text == same
    online_path = CHAT if provider == "openai" else "/v1/messages"
    assert server.stats.requests_by_endpoint[online_path] == 25  # the online run only
    job = load_job(state_path(str(target)))
    assert job is not None
    assert all(part.lines == [] for part in job.parts)


async def test_openai_batches_hold_one_url_and_one_model(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Lines are grouped by endpoint and model; --max-batch-bytes splits a group further."""
    rows: list[dict[str, Any]] = []
    for i in range(6):
        rows.append({"custom_id": f"c{i}", "prompt": "x" * 50, "model": "a" if i % 2 else "b"})
        rows.append(
            {
                "custom_id": f"e{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "a", "input": "text"},
            }
        )
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    async with open_fake_llm() as server:
        summary = await run(server, source, tmp_path / "out.jsonl", max_batch_bytes=400)
        batches = server.openai_batches
    assert summary.all_succeeded
    assert summary.succeeded == 12
    groups = Counter((b["endpoint"], b["request_counts"]["total"]) for b in batches)
    # 3 chat lines of each model (~190 bytes a line: two a batch), 6 embeddings lines
    assert groups == Counter(
        {
            (CHAT, 2): 2,
            (CHAT, 1): 2,
            ("/v1/embeddings", 4): 1,
            ("/v1/embeddings", 2): 1,
        }
    )
    job = load_job(state_path(str(tmp_path / "out.jsonl")))
    assert job is not None
    assert sorted((part.url, part.model) for part in job.parts) == sorted(
        [(CHAT, "a"), (CHAT, "a"), (CHAT, "b"), (CHAT, "b")] + [("/v1/embeddings", "a")] * 2
    )


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_failed_and_expired_lines_become_error_lines(
    tmp_path: Path, autojump_clock: trio.abc.Clock, provider: str
) -> None:
    """A refused line is the online error line (400); expired lines say batch_expired."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    target = tmp_path / "out.jsonl"
    config = FakeLLMConfig(batch_error_ids=("r3", "r7"), batch_line_expire_rate=0.2, seed=1)
    async with open_fake_llm(config) as server:
        summary = await run(server, source, target, provider=provider)
    records = each_once(target, 40)
    for custom_id in ("r3", "r7"):
        record = records[custom_id]
        assert record["response"]["status_code"] == 400
        assert record["error"]["code"] == "invalid_request_error"
        assert record["error"]["message"].startswith("HTTP 400: Injected error")
    expired = [r for r in records.values() if r["error"] and r["error"]["code"] == "batch_expired"]
    assert expired
    assert all(r["response"] is None for r in expired)
    ok = [r for r in records.values() if r["error"] is None]
    assert summary.succeeded == len(ok)
    assert summary.failed == 2 + len(expired)
    assert not summary.all_succeeded
    assert summary.complete
    assert summary.batches[0].outcome == "expired"


@pytest.mark.parametrize(
    ("knob", "code"), [("batch_fail_rate", "batch_failed"), ("batch_expire_rate", "batch_expired")]
)
async def test_a_whole_batch_that_fails_or_expires_is_an_error_line_per_line(
    tmp_path: Path, autojump_clock: trio.abc.Clock, knob: str, code: str
) -> None:
    """A batch that failed validation or expired unanswered: each of its lines errs."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(**{knob: 1.0})) as server:
        summary = await run(server, source, target)
    records = each_once(target, 5)
    assert {r["error"]["code"] for r in records.values()} == {code}
    message = records["r0"]["error"]["message"]
    if code == "batch_failed":  # no result lines: ours, with the provider's reason
        assert message.startswith(f"batch {summary.batches[0].id} failed as a whole: ")
        assert "invalid_request" in message
    else:  # the provider's error file says it
        assert "expired" in message
    assert summary.failed == 5
    assert summary.errors == 5


async def test_retry_failed_resubmits_only_the_failed_lines(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """--retry-failed: a new batch of just the failed lines; every success kept."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_error_ids=("r1", "r2", "r3"))) as server:
        first = await run(server, source, target)
        kept = {k: v for k, v in each_once(target, 20).items() if v["error"] is None}
        again = await run(server, source, target)  # without the flag: nothing to do
        server.config = attrs.evolve(server.config, batch_error_ids=())
        second = await run(server, source, target, retry_failed=True)
        batches = server.openai_batches
    assert first.failed == 3
    assert again.skipped == 20
    assert again.skipped_failed == 3
    assert creates(server) == 2
    assert batches[-1]["request_counts"]["total"] == 3
    assert second.succeeded == 3
    assert second.skipped == 17
    assert second.all_succeeded
    records = each_once(target, 20)
    assert all(records[k] == v for k, v in kept.items())  # the successes, untouched
    assert all(record["error"] is None for record in records.values())


async def test_polls_wait_as_retry_after_says(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Polls answered 429 with Retry-After wait that long before polling again."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    config = FakeLLMConfig(batch_poll_throttle=3, batch_retry_after=20.0)
    async with open_fake_llm(config) as server:
        summary = await run(server, source, tmp_path / "out.jsonl", poll_interval=1.0)
    assert summary.all_succeeded
    assert summary.rate_limited == 3
    assert summary.elapsed >= 60.0


async def test_cancel_cancels_the_running_batch_and_merges_what_it_answered(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """--cancel: the batch is cancelled; answered lines kept, the rest batch_cancelled."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(1500))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=1000.0)) as server:
        with trio.move_on_after(500):  # a first run, stopped while the batch runs
            await run(server, source, target, poll_interval=10.0)
        assert server.openai_batches[0]["status"] == "in_progress"
        summary = await run(server, source, target, cancel=True)
        batch = server.openai_batches[0]
    assert batch["status"] == "cancelled"
    assert creates(server) == 1
    records = each_once(target, 1500)
    codes = Counter(r["error"]["code"] if r["error"] else "ok" for r in records.values())
    assert codes["ok"] == batch["request_counts"]["completed"] > 0
    assert codes["batch_cancelled"] == 1500 - codes["ok"] > 0
    assert summary.batches[0].outcome == "cancelled"


async def test_cancel_drops_parts_not_created_and_a_rerun_submits_them(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A part recorded but never created is dropped by --cancel; the next run sends it."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm() as server:
        hold = server.hold("POST /v1/files")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, server, source, target)
            await hold.wait_arrived()
            nursery.cancel_scope.cancel()
        hold.release()
        cancelled = await run(server, source, target, cancel=True)
        assert not cancelled.complete
        assert cancelled.unanswered == 4
        assert [b.status for b in cancelled.batches] == ["dropped"]
        summary = await run(server, source, target)
    assert summary.all_succeeded
    assert creates(server) == 1
    each_once(target, 4)


# A request of each step (upload, create, poll, results), with the provider it belongs to.
STEPS = [
    ("openai", "POST /v1/files"),
    ("openai", "POST /v1/batches"),
    ("openai", "GET /v1/batches/{batch_id}"),
    ("openai", "GET /v1/files/{file_id}/content"),
    ("anthropic", "POST /v1/messages/batches"),
    ("anthropic", "GET /v1/messages/batches/{message_batch_id}"),
    ("anthropic", "GET /v1/messages/batches/{message_batch_id}/results"),
]


@pytest.mark.parametrize(("provider", "route"), STEPS)
async def test_a_run_stopped_at_any_step_resumes_without_a_second_batch(
    tmp_path: Path, autojump_clock: trio.abc.Clock, provider: str, route: str
) -> None:
    """Cancelled with a request of each step in flight: the rerun creates nothing twice."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=5.0)) as server:
        hold = (
            server.hold(route, partial=0.5)
            if "content" in route or "results" in route
            else server.hold(route)
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(run, server, source, target, provider=provider))
            await hold.wait_arrived()
            await trio.sleep(1)  # a partial answer: its first lines are merged meanwhile
            nursery.cancel_scope.cancel()
        hold.release()
        summary = await run(server, source, target, provider=provider)
        uploads = server.stats.files_uploaded
    assert creates(server) == 1
    if provider == "openai":
        assert uploads == 1  # found again by its name, not uploaded twice
    assert summary.complete
    assert summary.all_succeeded
    each_once(target, 30)


async def test_sigint_while_polling_leaves_the_batch_running(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """SIGINT stops polling at once; the batch runs on; the same call resumes it."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=100.0)) as server:

        async def interrupt() -> None:
            polls = server.hold("GET /v1/batches/{batch_id}")
            await polls.wait_arrived()  # the batch exists, and is being polled
            polls.release()
            await trio.sleep(10)
            os.kill(os.getpid(), signal.SIGINT)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt)
            stopped = await run(server, source, target, handle_signals=True)
        assert stopped.interrupted
        assert stopped.unanswered == 5
        assert server.openai_batches[0]["status"] == "in_progress"
        assert [b.status for b in stopped.batches] == ["running"]
        summary = await run(server, source, target)
    assert summary.all_succeeded
    assert creates(server) == 1
    each_once(target, 5)


async def test_anthropic_refuses_custom_ids_its_api_refuses(tmp_path: Path) -> None:
    """Bad custom_ids for Anthropic are file:line errors before anything is sent."""
    rows = prompts(3)
    rows[1]["custom_id"] = "has space"
    rows[2]["custom_id"] = "x" * 65
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"
    async with open_fake_llm() as server:
        with pytest.raises(trio_llm.BatchInputError) as caught:
            await run(server, source, target, provider="anthropic")
    assert caught.value.invalid_lines == 2
    assert caught.value.line == 2
    assert f"{source}:2: custom_id 'has space' is not accepted" in str(caught.value)
    assert f"{source}:3:" in str(caught.value)
    assert creates(server) == 0
    assert not target.exists()
    assert not exists(state_path(str(target)))


async def test_a_request_larger_than_a_batch_is_invalid(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A line that could not fit in any batch is an error (or an error line: skip_invalid)."""
    rows = [*prompts(2), {"custom_id": "big", "prompt": "y" * 2000}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"
    async with open_fake_llm() as server:
        with pytest.raises(trio_llm.BatchInputError, match=r"in\.jsonl:3: the request is"):
            await run(server, source, target, max_batch_bytes=1000)
        summary = await run(server, source, target, max_batch_bytes=1000, skip_invalid=True)
    assert summary.invalid == 1
    assert summary.succeeded == 2
    records = {r["custom_id"]: r for r in read_output(target)}
    assert records["big"]["error"]["code"] == "request_too_large"


async def test_online_run_refused_while_batches_run(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """An online run on an output whose batches are at the provider is refused."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=100.0)) as server:
        with trio.move_on_after(50):
            await run(server, source, target)
        async with trio_llm.open_client(base_url=server.base_url, model="m") as client:
            with pytest.raises(trio_llm.ConfigurationError, match="--via provider --cancel"):
                await trio_llm.run_batch(source, target, client=client)
    assert server.stats.requests_by_endpoint.get(CHAT, 0) == 0


async def test_a_changed_input_is_refused_before_its_part_is_sent(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A part planned from INPUT is not sent from an INPUT that changed since."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm() as server:
        hold = server.hold("POST /v1/files")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, server, source, target)
            await hold.wait_arrived()
            nursery.cancel_scope.cancel()
        hold.release()
        write_jsonl(source, prompts(3, prefix="other"))
        with pytest.raises(trio_llm.BatchInputError, match="the input changed"):
            await run(server, source, target)
    assert creates(server) == 0


async def test_a_job_at_another_server_is_not_resumed_elsewhere(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The job's batches are at one base URL: another one is refused, naming it."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=100.0)) as first:
        with trio.move_on_after(10):
            await run(first, source, target)
        async with open_fake_llm() as second:
            with pytest.raises(trio_llm.ConfigurationError, match=first.base_url):
                await run(second, source, target)


async def test_a_batch_unknown_to_the_key_stops_the_run(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A recorded batch the API does not know (another key's) stops with a 404."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    target = tmp_path / "out.jsonl"
    async with open_fake_llm(FakeLLMConfig(batch_delay=100.0)) as server:
        with trio.move_on_after(10):
            await run(server, source, target)
        forget_batch(state_path(str(target)))
        summary = await run(server, source, target)
    assert summary.stopped is not None
    assert "batch_unknown" in summary.stopped
    assert isinstance(summary.stop_error, trio_llm.NotFoundError)
    assert summary.unanswered == 2


async def test_a_corrupt_job_state_is_refused(tmp_path: Path) -> None:
    """A job state that is not one is named, with what to do."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    target = tmp_path / "out.jsonl"
    write_text(state_path(str(target)), "{not json")
    async with open_fake_llm() as server:
        with pytest.raises(trio_llm.BatchInputError, match="not a trio-llm job state"):
            await run(server, source, target)


async def test_progress_on_a_terminal_shows_each_batch(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal, one line per batch: its status and the provider's counts, in a bar."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.delenv("TERM", raising=False)
    source = write_jsonl(tmp_path / "in.jsonl", prompts(12))
    async with open_fake_llm(FakeLLMConfig(batch_delay=30.0, batch_error_ids=("r1",))) as server:
        await run(server, source, tmp_path / "out.jsonl", max_batch_lines=6, progress=True)
    err = capsys.readouterr().err
    assert "submitting 12 in 2 new batch(es) to openai's Batch API" in err
    assert "━" in err
    batches = [batch["id"] for batch in server.openai_batches]
    assert "part 0: in_progress " in err
    assert "part 0: completed, merged: 5 OK, 1 with an error" in err
    assert "part 1: completed, merged: 6 OK, 0 with an error" in err
    assert len(batches) == 2


async def test_plain_progress_shows_counts_at_most_every_interval(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off a terminal: each status once, and growing counts at most every interval."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    source = write_jsonl(tmp_path / "in.jsonl", prompts(2000))
    async with open_fake_llm(FakeLLMConfig(batch_delay=100.0)) as server:
        await run(server, source, tmp_path / "out.jsonl", progress=True, progress_interval=30.0)
    batch = server.openai_batches[0]["id"]
    lines = [line for line in capsys.readouterr().err.splitlines() if f"({batch})" in line]
    in_progress = [line for line in lines if ": in_progress " in line]
    # answered in 4 chunks of 500 over 80 s; a line at 10 s, then at most every 30 s
    assert [line.split(": in_progress ")[1] for line in in_progress] == [
        f"500/2,000 ({batch})",
        f"1,000/2,000 ({batch})",
        f"2,000/2,000 ({batch})",
    ]
    assert lines[0] == f"trio-llm batch: part 0: validating 0/2,000 ({batch})"
    assert lines[-1].endswith(f"completed, merged: 2,000 OK, 0 with an error ({batch})")
