"""run_batch and `trio-llm batch` stop on errors every request would get (issue 15, item 5).

A 401, 403, 404, 405 or 407 stops the run at once; so does a run of failures with no
success in between (a dead endpoint). The lines not answered then stay unanswered, for
the rerun; per-line statuses (400, 422) are written as answers and the run goes on.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import stamina
import trio
import trio.testing

import trio_llm
from trio_llm.testing import FakeLLMConfig, open_fake_llm


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """One attempt per request, no waits: retries are not the subject."""
    with stamina.set_testing(True, attempts=1):
        yield


def write_prompts(path: Path, count: int, *, prefix: str = "r") -> list[str]:
    """Write ``count`` short-form lines; return their custom_ids."""
    ids = [f"{prefix}{i}" for i in range(count)]
    path.write_text("".join(json.dumps({"custom_id": i, "prompt": i}) + "\n" for i in ids))
    return ids


def output_records(path: Path) -> list[dict[str, Any]]:
    """Parse every line of an output file (each must be whole)."""
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def test_a_wrong_key_stops_at_the_first_401(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """401: nothing more is sent, no line is written, and the summary says why."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 500)
    async with (
        open_fake_llm(FakeLLMConfig(api_key="right")) as server,
        trio_llm.open_client(
            base_url=server.base_url, api_key="wrong", model="m", max_concurrency=8
        ) as client,
    ):
        summary = await trio_llm.run_batch(source, target, client=client)
    assert server.stats.total_requests <= 8  # at most the first wave
    assert output_records(target) == []
    assert (summary.failed, summary.unanswered, summary.complete) == (0, 500, False)
    assert isinstance(summary.stop_error, trio_llm.AuthenticationError)
    assert summary.stopped == (
        f"every request gets 401 invalid_api_key from {server.base_url} "
        "(Incorrect API key provided.)"
    )
    assert not summary.interrupted


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (403, trio_llm.PermissionDeniedError),
        (404, trio_llm.NotFoundError),
        (405, trio_llm.APIStatusError),
    ],
)
async def test_403_404_and_405_stop_at_once(
    tmp_path: Path, status: int, error: type[Exception]
) -> None:
    """403, 404 and 405 (no line escapes them) stop the run like a 401."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 100)
    config = FakeLLMConfig(error_rate=1.0, error_status=status)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=4) as client,
    ):
        summary = await trio_llm.run_batch(source, target, client=client)
    assert server.stats.total_requests <= 4
    assert isinstance(summary.stop_error, error)
    assert summary.stopped is not None
    assert summary.stopped.startswith(f"every request gets {status} ")
    assert (summary.unanswered, output_records(target)) == (100, [])


async def test_a_dead_url_stops_within_the_first_minute(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Connection refused, default retries: the run stops after one line's retries."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 5000)
    async with trio_llm.open_client(base_url=closed_port_url(), model="m") as client:
        summary = await trio_llm.run_batch(source, target, client=client)
        calls = client.statistics().failed
    assert summary.elapsed < 30  # one line's 6 attempts and backoff: ~16-18 s
    assert calls == trio_llm.batch.DEFAULT_MAX_CONSECUTIVE_FAILURES  # the rest cancelled
    assert isinstance(summary.stop_error, trio_llm.APIConnectionError)
    assert summary.stopped is not None
    assert summary.stopped.startswith("20 requests in a row failed, none succeeded in between")
    assert (summary.unanswered, output_records(target)) == (5000, [])


async def test_every_request_failing_with_500_stops_after_the_threshold(
    tmp_path: Path, no_backoff: None
) -> None:
    """max_consecutive_failures 500s in a row (after retries) stop the run; none is written."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 100)
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=500)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        summary = await trio_llm.run_batch(
            source, target, client=client, concurrency=1, max_consecutive_failures=5
        )
    assert server.stats.total_requests == 5
    assert isinstance(summary.stop_error, trio_llm.ServerError)
    assert summary.stopped is not None
    assert summary.stopped.startswith("5 requests in a row failed")
    assert (summary.failed, summary.unanswered, output_records(target)) == (0, 100, [])


async def test_failures_between_successes_are_recorded_and_the_run_goes_on(
    tmp_path: Path, no_backoff: None
) -> None:
    """Failures broken up by successes never stop the run: each is written as an error."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_prompts(source, 200)
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=0.3, error_status=503, seed=5)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        summary = await trio_llm.run_batch(
            source, target, client=client, concurrency=4, max_consecutive_failures=5
        )
    records = output_records(target)
    assert Counter(r["custom_id"] for r in records) == Counter(ids)
    failed = [r for r in records if r["error"] is not None]
    assert len(failed) == summary.failed == server.stats.injected_errors > 20
    assert summary.stopped is None
    assert summary.complete


async def test_a_run_of_failures_too_short_to_stop_is_written_at_the_end(
    tmp_path: Path, no_backoff: None
) -> None:
    """Failures held back in case of a dead endpoint are written when the run ends."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 3)
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=502)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        summary = await trio_llm.run_batch(source, target, client=client)
    assert [r["error"]["code"] for r in output_records(target)] == ["server_error"] * 3
    assert (summary.failed, summary.complete, summary.stopped) == (3, True, None)


async def test_no_limit_records_every_failure(tmp_path: Path, no_backoff: None) -> None:
    """max_consecutive_failures=None: a failing endpoint's lines are all written as errors."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 50)
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=500)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        summary = await trio_llm.run_batch(
            source, target, client=client, max_consecutive_failures=None
        )
    assert (summary.failed, summary.stopped, len(output_records(target))) == (50, None, 50)


@pytest.mark.parametrize("limit", [0, -1])
async def test_the_limit_must_be_positive(tmp_path: Path, limit: int) -> None:
    """max_consecutive_failures below 1 is refused before anything happens."""
    source = tmp_path / "in.jsonl"
    write_prompts(source, 1)
    async with trio_llm.open_client(base_url=closed_port_url(), model="m") as client:
        with pytest.raises(ValueError, match="max_consecutive_failures must be at least 1"):
            await trio_llm.run_batch(
                source, tmp_path / "o.jsonl", client=client, max_consecutive_failures=limit
            )


@pytest.mark.parametrize("status", [400, 422])
async def test_per_line_client_errors_never_stop_the_run(tmp_path: Path, status: int) -> None:
    """400 and 422 are the line's own answer: written as errors, however many in a row."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_prompts(source, 60)
    config = FakeLLMConfig(error_rate=1.0, error_status=status)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        summary = await trio_llm.run_batch(
            source, target, client=client, max_consecutive_failures=5
        )
    records = output_records(target)
    assert Counter(r["custom_id"] for r in records) == Counter(ids)
    assert {r["response"]["status_code"] for r in records} == {status}
    assert (summary.failed, summary.stopped, summary.complete) == (60, None, True)


async def test_resume_after_a_401_sends_the_lines_left(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Fix the key and rerun: the lines the stop left unanswered are sent, each once."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_prompts(source, 40)
    async with open_fake_llm(FakeLLMConfig(api_key="right")) as server:
        async with trio_llm.open_client(
            base_url=server.base_url, api_key="wrong", model="m"
        ) as client:
            stopped = await trio_llm.run_batch(source, target, client=client)
        async with trio_llm.open_client(
            base_url=server.base_url, api_key="right", model="m"
        ) as client:
            resumed = await trio_llm.run_batch(source, target, client=client)
    assert stopped.unanswered == 40
    assert (resumed.skipped, resumed.succeeded, resumed.all_succeeded) == (0, 40, True)
    assert Counter(r["custom_id"] for r in output_records(target)) == Counter(ids)


async def test_resume_after_an_outage_sends_the_lines_of_the_run_of_failures(
    tmp_path: Path, autojump_clock: trio.abc.Clock, no_backoff: None
) -> None:
    """The lines that failed in the run that stopped the job are resent, not kept as errors."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_prompts(source, 30)
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model="m") as client,
    ):
        async with trio.open_nursery() as nursery:

            async def break_the_server() -> None:
                # Lines 0 to 10 arrive before (each reads the config when it arrives).
                await trio.sleep(10.5)
                server.config = attrs.evolve(server.config, error_rate=1.0, error_status=503)

            nursery.start_soon(break_the_server)
            stopped = await trio_llm.run_batch(
                source, target, client=client, concurrency=1, max_consecutive_failures=3
            )
        server.config = attrs.evolve(server.config, error_rate=0.0)
        resumed = await trio_llm.run_batch(source, target, client=client)
    assert (stopped.succeeded, stopped.failed, stopped.unanswered) == (11, 0, 19)
    assert stopped.stopped is not None
    assert (resumed.skipped, resumed.succeeded, resumed.all_succeeded) == (11, 19, True)
    records = output_records(target)
    assert Counter(r["custom_id"] for r in records) == Counter(ids)
    assert all(r["error"] is None for r in records)


async def test_requests_in_flight_are_cancelled_at_the_stop(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A 404 while slow requests are in flight: they are cancelled at once, left unanswered."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(source, 40)
    # Injected errors are immediate; the other requests take 5 s.
    config = FakeLLMConfig(latency=5.0, error_rate=0.3, error_status=404, seed=2)
    async with (
        open_fake_llm(config) as server,
        trio_llm.open_client(base_url=server.base_url, model="m", max_concurrency=8) as client,
    ):
        summary = await trio_llm.run_batch(source, target, client=client)
        await trio.sleep(0.1)  # the server notices the clients that left
    assert summary.elapsed < 1.0
    assert isinstance(summary.stop_error, trio_llm.NotFoundError)
    assert (summary.succeeded, summary.unanswered, output_records(target)) == (0, 40, [])
    assert server.stats.disconnects >= 1
