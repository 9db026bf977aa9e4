"""run_batch: formats, resume, repair, invalid input, faults, signals and progress."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import trio_llm
from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write ``rows`` as JSON lines (a ``str`` row is written as is)."""
    with path.open("w") as file:
        for row in rows:
            file.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    """Parse every line of an output file (each must be a whole JSON object)."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def leftovers(directory: Path) -> list[Path]:
    """Temporary files left in ``directory``."""
    return list(directory.glob("*.tmp"))


def prompts(count: int, *, prefix: str = "r", max_tokens: int = 5) -> list[dict[str, Any]]:
    """Short-form lines ``r0``, ``r1``, ..."""
    return [
        {"custom_id": f"{prefix}{i}", "prompt": f"question {i}", "max_tokens": max_tokens}
        for i in range(count)
    ]


def assert_each_once(path: Path, custom_ids: list[str]) -> list[dict[str, Any]]:
    """Every custom_id has exactly one line, and no other line exists."""
    records = read_output(path)
    counts = Counter(record["custom_id"] for record in records)
    assert counts == Counter(custom_ids)
    return records


def chat_line(custom_id: str, content: Any, **body: Any) -> dict[str, Any]:
    """A Batch API chat line."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": content}], **body},
    }


async def test_every_format_is_answered_once(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    """Short-form, chat and embeddings lines each get one Batch API output line."""
    rows = [
        {"custom_id": "short", "prompt": "Hello there", "max_tokens": 3},
        chat_line("chat", "Hi", model="other-model", max_tokens=4),
        {
            "custom_id": "embed",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"input": ["a", "b"], "model": "emb"},
        },
        "",  # blank lines are ignored
    ]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="fake-gpt") as client:
        summary = await trio_llm.run_batch(source, target, client=client)
        direct = await client.chat("Hello there", max_tokens=3)
    records = {r["custom_id"]: r for r in assert_each_once(target, ["short", "chat", "embed"])}
    short = records["short"]
    assert short["id"].startswith("batch_req_")
    assert short["error"] is None
    assert short["response"]["status_code"] == 200
    assert short["response"]["body"]["choices"][0]["message"]["content"] == direct.text
    assert short["response"]["request_id"].startswith("req_")  # the x-request-id header
    assert records["embed"]["response"]["request_id"].startswith("req_")
    assert records["chat"]["response"]["body"]["model"] == "other-model"
    assert records["chat"]["response"]["body"]["usage"]["completion_tokens"] <= 4
    assert len(records["embed"]["response"]["body"]["data"]) == 2
    bodies = [r["response"]["body"] for r in records.values()]
    assert summary.total == 3
    assert (summary.succeeded, summary.failed, summary.skipped, summary.unanswered) == (3, 0, 0, 0)
    assert summary.prompt_tokens == sum(b["usage"]["prompt_tokens"] for b in bodies)
    assert summary.tokens == sum(b["usage"]["total_tokens"] for b in bodies)
    assert summary.all_succeeded
    assert not summary.interrupted
    assert fake_llm.stats.requests_by_endpoint == {
        "/v1/chat/completions": 3,  # two lines and the direct call
        "/v1/embeddings": 1,
    }


async def test_lines_come_in_completion_order(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The output is in completion order: short answers before long ones."""
    rows = [
        {"custom_id": name, "prompt": "Tell me a long story", "max_tokens": tokens}
        for name, tokens in [("slow", 40), ("fast", 2), ("medium", 10)]
    ]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"
    async with (
        open_fake_llm(FakeLLMConfig(tokens_per_second=10)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        await trio_llm.run_batch(source, target, client=client)
    assert [r["custom_id"] for r in read_output(target)] == ["fast", "medium", "slow"]


async def test_window_stays_full_and_elapsed_is_reported(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """40 lines of 1 s at concurrency 8 take 5 s, and the summary says so."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=8) as client,
    ):
        summary = await trio_llm.run_batch(source, tmp_path / "out.jsonl", client=client)
    assert summary.elapsed == pytest.approx(5.0, abs=0.05)
    assert server.stats.peak_concurrency == 8


async def test_resume_sends_only_unanswered_lines(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    """A second run skips the custom_ids already in OUTPUT and sends only the rest."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    first = write_jsonl(tmp_path / "first.jsonl", prompts(10))
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        await trio_llm.run_batch(first, target, client=client)
        summary = await trio_llm.run_batch(source, target, client=client)
        again = await trio_llm.run_batch(source, target, client=client)
    assert_each_once(target, [f"r{i}" for i in range(30)])
    assert (summary.skipped, summary.succeeded) == (10, 20)
    assert (again.skipped, again.succeeded, again.elapsed >= 0) == (30, 0, True)
    assert again.all_succeeded
    assert fake_llm.stats.requests_by_endpoint["/v1/chat/completions"] == 30


@pytest.mark.parametrize(
    ("tail", "kept"),
    [
        (b'{"id":"batch_req_1","custom_id":"r3","resp', 3),  # cut mid-write
        (b"\x00\x00\x00\x00", 3),  # a crash that left zeroed blocks
        (None, 4),  # a whole record whose newline was never written
    ],
)
async def test_partial_last_line_is_repaired(
    tmp_path: Path, fake_llm: FakeLLMServer, tail: bytes | None, kept: int
) -> None:
    """A cut-off last line is removed (or completed) and the batch ends with each id once."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        await trio_llm.run_batch(
            write_jsonl(tmp_path / "a.jsonl", prompts(4)), target, client=client
        )
        data = target.read_bytes()
        if tail is None:
            target.write_bytes(data[:-1])  # drop the last newline only
        else:
            last = data.rindex(b"\n", 0, len(data) - 1) + 1
            target.write_bytes(data[:last] + tail)
        summary = await trio_llm.run_batch(source, target, client=client)
    assert_each_once(target, [f"r{i}" for i in range(6)])
    assert summary.skipped == kept
    assert summary.succeeded == 6 - kept


async def test_an_output_that_is_not_batch_output_is_refused(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """A garbled line inside OUTPUT stops the run before anything is sent or changed."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    target = write_jsonl(tmp_path / "out.jsonl", ["not json", {"custom_id": "r0"}])
    before = target.read_bytes()
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(trio_llm.BatchInputError) as caught:
            await trio_llm.run_batch(source, target, client=client)
    assert (caught.value.path, caught.value.line) == (str(target), 1)
    assert "not a batch output line" in str(caught.value)
    assert target.read_bytes() == before
    assert fake_llm.stats.requests_by_endpoint == {}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"custom_id": "x", "prompt": "hi"', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ({"prompt": "hi"}, "no custom_id"),
        ({"custom_id": 7, "prompt": "hi"}, "custom_id must be a non-empty string, not a number"),
        ({"custom_id": "x", "prompt": ""}, "prompt must be a non-empty string"),
        ({"custom_id": "x", "prompt": "hi", "url": "/v1/embeddings"}, "either 'prompt'"),
        ({**chat_line("x", "hi"), "method": "GET"}, "method must be \"POST\" ('GET')"),
        ({**chat_line("x", "hi"), "url": "/v1/completions"}, "unsupported url '/v1/completions'"),
        ({**chat_line("x", "hi"), "body": []}, "body must be a JSON object, not an array"),
        ({**chat_line("x", "hi"), "body": {"messages": []}}, "body.messages must be a non-empty"),
        ({**chat_line("x", "hi"), "body": {"messages": [{}]}}, "body.messages[0] needs a string"),
        (chat_line("x", "hi", model=3), "body.model must be a non-empty string"),
        (chat_line("x", "hi", stream=True), "streamed replies are not supported"),
        (chat_line("x", "hi", retry=1), "'retry' cannot be passed through"),
        (
            {"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"input": 5}},
            "body.input must be a non-empty string or array",
        ),
    ],
)
async def test_invalid_lines_are_reported_with_their_line_number(
    tmp_path: Path, fake_llm: FakeLLMServer, line: Any, reason: str
) -> None:
    """Each kind of bad line is found before any request, with file and line number."""
    source = write_jsonl(tmp_path / "in.jsonl", [*prompts(2), line])
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(trio_llm.BatchInputError) as caught:
            await trio_llm.run_batch(source, target, client=client)
    error = caught.value
    assert (error.path, error.line, error.invalid_lines) == (str(source), 3, 1)
    assert reason in error.reason
    assert str(error).startswith(f"{source}:3: ")
    assert fake_llm.stats.requests_by_endpoint == {}
    assert not target.exists()  # nothing left behind


async def test_duplicates_and_many_problems_are_listed(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """A repeated custom_id names the line it repeats; every problem is counted."""
    rows: list[Any] = [*prompts(3), {"custom_id": "r1", "prompt": "again"}]
    rows += ["{"] * 12
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(trio_llm.BatchInputError) as caught:
            await trio_llm.run_batch(source, tmp_path / "out.jsonl", client=client)
    error = caught.value
    assert (error.line, error.custom_id, error.invalid_lines) == (4, "r1", 13)
    assert error.reason == "duplicate custom_id 'r1' (first on line 2)"
    assert "13 invalid lines" in str(error)
    assert f"{source}:5: invalid JSON" in str(error)
    assert "and 3 more" in str(error)


async def test_a_line_needs_a_model_when_the_client_has_none(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """Without a client default, a body without a model is invalid input."""
    source = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "hi"}])
    async with trio_llm.open_client(base_url=fake_llm.base_url) as client:
        with pytest.raises(trio_llm.BatchInputError, match="no model"):
            await trio_llm.run_batch(source, tmp_path / "out.jsonl", client=client)


async def test_skip_invalid_records_them_as_error_lines(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """--skip-invalid: each bad line gets an error line once; valid lines are answered."""
    rows: list[Any] = [
        {"custom_id": "ok", "prompt": "hi"},
        "not json",
        {**chat_line("bad-url", "hi"), "url": "/v1/images"},
        {"custom_id": "ok", "prompt": "again"},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        summary = await trio_llm.run_batch(source, target, client=client, skip_invalid=True)
        again = await trio_llm.run_batch(source, target, client=client)
    records = read_output(target)
    assert len(records) == 4
    by_key = {(r["custom_id"], (r["error"] or {}).get("line")): r for r in records}
    assert by_key["ok", None]["error"] is None
    assert by_key[None, 2]["error"]["code"] == "invalid_json"
    assert by_key[None, 2]["error"]["message"].startswith(f"{source}:2: invalid JSON")
    assert by_key["bad-url", 3]["error"]["code"] == "invalid_url"
    assert by_key["bad-url", 3]["response"] is None
    assert by_key[None, 4]["error"]["code"] == "duplicate_custom_id"
    assert (summary.succeeded, summary.invalid, summary.errors) == (1, 3, 3)
    assert not summary.all_succeeded
    # Recorded lines count as answered: no error without --skip-invalid, nothing resent.
    assert (again.skipped, again.skipped_failed, again.succeeded) == (4, 3, 0)
    assert fake_llm.stats.requests_by_endpoint["/v1/chat/completions"] == 1


async def test_error_statuses_become_error_lines(tmp_path: Path) -> None:
    """A 4xx answer is written with its status, body and an error code; others go on."""
    rows = [*prompts(3), chat_line("bad", 42)]  # the server rejects content 42 with a 400
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "out.jsonl"
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        summary = await trio_llm.run_batch(source, target, client=client)
    records = {r["custom_id"]: r for r in assert_each_once(target, ["r0", "r1", "r2", "bad"])}
    bad = records["bad"]
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["request_id"].startswith("req_")
    assert bad["response"]["body"]["error"]["message"]
    assert bad["error"]["code"]
    assert bad["error"]["message"].startswith("HTTP 400: ")
    assert (summary.succeeded, summary.failed, summary.errors) == (3, 1, 1)
    assert summary.complete
    assert not summary.all_succeeded


async def test_retry_failed_replaces_error_lines(tmp_path: Path) -> None:
    """--retry-failed resends lines that ended in error; each custom_id stays on one line."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    target = tmp_path / "out.jsonl"
    broken = FakeLLMConfig(error_rate=0.5, error_status=422, seed=3)  # (a 404 stops a run)
    async with (
        open_fake_llm(broken) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        first = await trio_llm.run_batch(source, target, client=client)
        assert 0 < first.failed < 20
        plain = await trio_llm.run_batch(source, target, client=client)
        assert (plain.skipped_failed, plain.succeeded) == (first.failed, 0)
        server.config = attrs.evolve(server.config, error_rate=0.0)
        retried = await trio_llm.run_batch(source, target, client=client, retry_failed=True)
    records = assert_each_once(target, [f"r{i}" for i in range(20)])
    assert all(record["error"] is None for record in records)
    assert (retried.succeeded, retried.skipped, retried.skipped_failed) == (
        first.failed,
        20 - first.failed,
        0,
    )
    assert retried.all_succeeded
    assert leftovers(tmp_path) == []


async def test_server_faults_all_end_answered(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """500s, cut-off responses and 429s are retried until every line is answered once."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(120))
    target = tmp_path / "out.jsonl"
    config = FakeLLMConfig(
        error_rate=0.2, disconnect_rate=0.1, requests_per_minute=60, latency=0.05, seed=1
    )
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(
            base_url=server.base_url,
            model="m",
            retry=trio_llm.RetryPolicy(attempts=20, deadline=600.0),
        ) as client,
    ):
        summary = await trio_llm.run_batch(source, target, client=client)
    records = assert_each_once(target, [f"r{i}" for i in range(120)])
    assert all(record["error"] is None for record in records)
    assert summary.all_succeeded
    assert summary.retries > 0
    assert server.stats.requests_by_status[500] > 0
    assert server.stats.requests_by_status[429] > 0
    assert server.stats.injected_disconnects > 0
    assert summary.rate_limited == server.stats.requests_by_status[429]


async def test_cancellation_leaves_only_whole_lines(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A cancelled run leaves whole lines only; the next run completes each id once."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(50))
    target = tmp_path / "out.jsonl"
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=10) as client,
    ):
        with trio.move_on_after(2.5):
            await trio_llm.run_batch(source, target, client=client)
        assert len(read_output(target)) == 20
        summary = await trio_llm.run_batch(source, target, client=client)
    assert_each_once(target, [f"r{i}" for i in range(50)])
    assert (summary.skipped, summary.succeeded) == (20, 30)


async def test_a_second_run_on_the_same_output_is_refused(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Two runs cannot write one output file at once; the second is told why."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(8))
    target = tmp_path / "out.jsonl"
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(lambda: trio_llm.run_batch(source, target, client=client))
        await trio.sleep(0.5)
        with pytest.raises(trio_llm.ConfigurationError, match="another 'trio-llm batch' run"):
            await trio_llm.run_batch(source, target, client=client)
    assert_each_once(target, [f"r{i}" for i in range(8)])


async def test_input_and_output_must_differ(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    """Naming the input as the output is refused before anything happens."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(trio_llm.ConfigurationError, match="is the input file"):
            await trio_llm.run_batch(source, source, client=client)


async def test_first_signal_drains_in_flight_requests(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """SIGINT: no new requests; those in flight finish within the grace and are written."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    target = tmp_path / "out.jsonl"
    async with (
        open_fake_llm(FakeLLMConfig(latency=5.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=4) as client,
        trio.open_nursery() as nursery,
    ):

        async def interrupt() -> None:
            await trio.sleep(6.0)  # the first 4 answered, the next 4 in flight
            os.kill(os.getpid(), signal.SIGINT)

        nursery.start_soon(interrupt)
        summary = await trio_llm.run_batch(
            source, target, client=client, handle_signals=True, grace=10.0
        )
    assert summary.interrupted
    assert (summary.succeeded, summary.unanswered) == (8, 32)
    assert summary.elapsed == pytest.approx(10.0, abs=0.1)
    assert len(read_output(target)) == 8


async def test_second_signal_cancels_at_once(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A second SIGINT cancels the requests in flight at once; nothing partial is written."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(40))
    target = tmp_path / "out.jsonl"
    async with (
        open_fake_llm(FakeLLMConfig(latency=5.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=4) as client,
        trio.open_nursery() as nursery,
    ):

        async def interrupt_twice() -> None:
            await trio.sleep(6.0)
            os.kill(os.getpid(), signal.SIGTERM)
            await trio.sleep(1.0)
            os.kill(os.getpid(), signal.SIGINT)

        nursery.start_soon(interrupt_twice)
        summary = await trio_llm.run_batch(
            source, target, client=client, handle_signals=True, grace=30.0
        )
    assert summary.interrupted
    assert (summary.succeeded, summary.unanswered) == (4, 36)
    assert summary.elapsed == pytest.approx(7.0, abs=0.1)
    assert len(read_output(target)) == 4


async def test_plain_progress_lines_when_stderr_is_not_a_terminal(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With progress on and stderr not a terminal, plain lines report done/total and more."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    source = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    target = tmp_path / "out.jsonl"
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=5) as client,
    ):
        await trio_llm.run_batch(
            source, target, client=client, progress=True, progress_interval=2.2
        )
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"trio-llm batch: 30 lines in {source}; sending 30 -> {target}"
    progress = [line for line in lines[1:] if line.startswith("trio-llm batch: ")]
    assert progress[0].startswith("trio-llm batch: 10/30 (33%) | 4.5 lines/s | ETA 0:04 |")
    assert "failed 0 | retries 0 | 429s 0 | tokens " in progress[0]
    assert progress[-1].startswith("trio-llm batch: 30/30 (100%)")
    assert progress[1].startswith("trio-llm batch: 20/30 (67%)")
    assert len(progress) == 3  # at 2.2 and 4.4 s, and the final one (the run takes 6 s)


async def test_progress_bar_on_a_terminal(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal, rich draws a bar with done/total, rate, ETA, failures and tokens."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.delenv("TERM", raising=False)
    source = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    target = tmp_path / "out.jsonl"
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=5) as client,
    ):
        await trio_llm.run_batch(source, target, client=client, progress=True)
    err = capsys.readouterr().err
    assert f"30 lines in {source}; sending 30" in err
    assert "━" in err
    assert "10/30  33% • 5.0/s • ETA 0:04 • failed 0 • retries 0 • tokens" in err
    assert "30/30 100%" in err


async def test_no_progress_output_by_default(
    tmp_path: Path, fake_llm: FakeLLMServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_batch is silent unless asked for progress."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        await trio_llm.run_batch(source, tmp_path / "out.jsonl", client=client)
    assert capsys.readouterr() == ("", "")


async def test_bad_concurrency_is_refused(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    """concurrency must be at least 1."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(ValueError, match="concurrency"):
            await trio_llm.run_batch("in", "out", client=client, concurrency=0)


async def test_encoding_problems_are_named(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    """A byte-order mark on line 1 is accepted; bytes that are not UTF-8 are reported."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'\xef\xbb\xbf{"custom_id": "a", "prompt": "hi"}\n\xff\xfe\n')
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(trio_llm.BatchInputError) as caught:
            await trio_llm.run_batch(source, tmp_path / "out.jsonl", client=client)
    assert (caught.value.line, caught.value.reason) == (2, "not UTF-8: byte 0xff at byte 1")


async def test_a_repeated_id_on_a_marked_first_line_is_still_a_duplicate(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """Duplicates are confirmed with the same parser, byte-order mark included."""
    source = tmp_path / "in.jsonl"
    line = b'{"custom_id": "a", "prompt": "hi"}\n'
    source.write_bytes(b"\xef\xbb\xbf" + line + line)
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(trio_llm.BatchInputError, match="first on line 1"):
            await trio_llm.run_batch(source, tmp_path / "out.jsonl", client=client)


async def test_hash_collisions_are_not_duplicates(
    tmp_path: Path, fake_llm: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids whose hashes collide are told apart by the exact check, and all sent."""
    from trio_llm.batch import _input, _keys

    monkeypatch.setattr(_keys, "key_hash", lambda key: 7)
    monkeypatch.setattr(_input, "key_hash", lambda key: 7)
    source = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    target = tmp_path / "out.jsonl"
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        summary = await trio_llm.run_batch(source, target, client=client)
    assert summary.succeeded == 5
    assert_each_once(target, [f"r{i}" for i in range(5)])


def test_key_table_grows_and_keeps_each_keys_flags() -> None:
    """The compact id table keeps every key and its flags through its growth."""
    from trio_llm.batch._keys import FAILED, OK, SEEN, KeyTable

    keys = KeyTable()
    assert keys.nbytes() == 1024 * 9  # the smallest: 1,024 slots of 8 bytes and a flag byte
    assert all(keys.mark(f"id-{i}", OK if i % 3 else FAILED) == 0 for i in range(5000))
    assert keys.mark("id-42", SEEN) == FAILED
    assert keys.mark("id-43", SEEN) == OK
    assert len(keys) == 5000
    assert keys.flags("id-42") == FAILED | SEEN
    assert keys.flags("id-4999") == OK
    assert keys.flags("id-5000") == 0
    assert keys.nbytes() == 8192 * 9  # doubled past 85% full: 1,024 -> 8,192 slots
    keys.clear(SEEN)
    assert (keys.flags("id-42"), keys.flags("id-43")) == (FAILED, OK)


def test_key_table_is_sized_for_the_ids_expected() -> None:
    """Sized up front for the ids expected: ~14 bytes each, and no growth as they come."""
    from trio_llm.batch._keys import KeyTable

    keys = KeyTable(100_000)
    assert 13 * 100_000 < keys.nbytes() < 14 * 100_000
    size = keys.nbytes()
    for i in range(100_000):
        keys.mark(f"id-{i}", 1)
    assert keys.nbytes() == size


async def test_retry_failed_also_repairs_a_partial_last_line(
    tmp_path: Path, fake_llm: FakeLLMServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dropping error lines also drops a cut-off tail; the output says what was done."""
    source = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    target = tmp_path / "out.jsonl"
    failed = {"id": "x", "custom_id": "r1", "response": None, "error": {"code": "timeout"}}
    ok = {"id": "y", "custom_id": "r0", "response": {"status_code": 200}, "error": None}
    write_jsonl(target, [ok, failed, ok])
    with target.open("ab") as file:
        file.write(b'{"id": "z", "custom_id": "r2", "respo')
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        summary = await trio_llm.run_batch(
            source, target, client=client, retry_failed=True, progress=True
        )
    records = assert_each_once(target, ["r0", "r0", "r1", "r2", "r3"])
    assert all(record["error"] is None for record in records)
    assert (summary.skipped, summary.succeeded) == (1, 3)
    err = capsys.readouterr().err
    assert "has 1 custom_id(s) on more than one line" in err
    assert f"--retry-failed: removed 1 error line(s) from {target}" in err
