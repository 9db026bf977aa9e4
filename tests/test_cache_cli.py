"""The cache from the command line (--cache, trio-llm cache) and for test suites (replay).

"Sends nothing" is shown the strict way: the second run points at a port where nothing
listens, so any request it made would fail.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_llm
from trio_llm._cli import main
from trio_llm._cli_cache import clear_entries, duration, read_info
from trio_llm.testing import CacheMissError, FakeLLMServer, open_replay_client

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture
def dead_url() -> str:
    """The base URL of a port where nothing listens: any request to it fails."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def answers(path: Path) -> dict[str, dict[str, Any]]:
    """The response of each custom_id of a batch output file."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(line["error"] is None for line in lines)
    return {line["custom_id"]: line["response"] for line in lines}


def test_batch_rerun_from_the_cache_sends_nothing(
    tmp_path: Path, dead_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """batch --cache C IN -o OUT, then again into a fresh OUT: same bodies, no request."""
    sample = str(EXAMPLES / "data" / "sample_batch.jsonl")
    cache, first, second = tmp_path / "c.sqlite", tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    assert main(["batch", sample, "-o", str(first), "--simulate", "--cache", str(cache)]) == 0
    capsys.readouterr()
    argv = ["batch", sample, "-o", str(second), "--base-url", dead_url, "--cache", str(cache)]
    assert main([*argv, "--max-attempts", "1"]) == 0
    err = capsys.readouterr().err
    assert answers(second) == answers(first)  # bodies, request ids, status codes
    lines = len(answers(first))
    assert f"done: all {lines} lines answered OK" in err
    assert re.search(rf"of which from the cache\s+{lines}\s", err)
    assert re.search(r"tokens\s+0 \(0 prompt \+ 0 completion\)", err)  # none spent


def test_chat_from_the_cache(
    tmp_path: Path, dead_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """chat --cache answers a repeated prompt offline, plainly or streamed."""
    cache = str(tmp_path / "c.sqlite")
    assert main(["chat", "--simulate", "--cache", cache, "--max-tokens", "30", "Say hi."]) == 0
    first = capsys.readouterr().out
    offline = ["chat", "--base-url", dead_url, "--cache", cache, "--max-tokens", "30"]
    assert main([*offline, "Say hi."]) == 0
    assert capsys.readouterr().out == first
    assert main([*offline, "--stream", "Say hi."]) == 0
    assert capsys.readouterr().out == first
    assert main([*offline, "--max-attempts", "1", "Something new."]) == 1
    assert "APIConnectionError" in capsys.readouterr().err


def test_cache_info_and_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cache info counts entries, size and hits; clear --older-than keeps newer replies."""
    cache = str(tmp_path / "c.sqlite")
    for prompt in ("one", "two", "one"):
        assert main(["chat", "--simulate", "--cache", cache, prompt]) == 0
    capsys.readouterr()
    assert main(["cache", "info", cache]) == 0
    out = capsys.readouterr().out
    assert "entries:  2" in out
    assert "hits:     1 since the file was created" in out
    assert "of replies; file" in out
    with sqlite3.connect(cache) as db:  # make one reply 8 days old
        db.execute("UPDATE entries SET created_at = created_at - 8 * 86400 WHERE rowid = 1")
    assert main(["cache", "clear", cache, "--older-than", "7d"]) == 0
    assert "removed 1 reply stored more than 7d ago" in capsys.readouterr().out
    assert read_info(cache).entries == 1
    assert main(["cache", "clear", cache]) == 0
    assert "removed 1 reply (" in capsys.readouterr().out
    info = read_info(cache)
    assert (info.entries, info.stored_bytes, info.oldest) == (0, 0, None)
    assert main(["cache", "info", cache]) == 0
    assert "oldest -, newest -" in capsys.readouterr().out


def test_cache_command_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file exits 2; a file that is not a cache exits 1; both in one line."""
    missing = str(tmp_path / "missing.sqlite")
    assert main(["cache", "info", missing]) == 2
    assert capsys.readouterr().err == f"trio-llm cache: error: no cache file at {missing}\n"
    assert main(["cache", "clear", missing]) == 2
    capsys.readouterr()
    assert not Path(missing).exists()  # never created by looking
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database at all, " * 200)
    assert main(["cache", "info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trio-llm cache: error: CacheError: ")
    assert err.count("\n") == 1
    assert main(["chat", "--simulate", "--cache", str(bad), "hi"]) == 1
    assert "CacheError" in capsys.readouterr().err


def test_clear_a_file_in_use(tmp_path: Path) -> None:
    """Clearing while another connection holds the file open still removes everything."""
    path = str(tmp_path / "c.sqlite")

    async def fill_and_clear() -> None:
        async with trio_llm.open_sqlite_cache(path) as cache:
            for n in range(10):
                await cache.set(f"{n:064x}", b"v")
            await cache.commit()
            assert await trio.to_thread.run_sync(clear_entries, path) == (10, 10 * 65)
            assert await cache.get("0" * 64) is None

    trio.run(fill_and_clear)


def test_duration_parser() -> None:
    """Durations: plain seconds or a unit; anything else is a usage error."""
    assert [duration(t) for t in ("90", "90s", "30m", "1.5h", "7d", "2W", ".5d")] == [
        90,
        90,
        1800,
        5400,
        7 * 86400,
        14 * 86400,
        43200,
    ]
    for bad in ("", "7 days", "-1d", "1y", "d"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a duration"):
            duration(bad)


def test_bad_older_than_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--older-than with a bad duration is a usage error naming the flag."""
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "clear", str(tmp_path / "c.sqlite"), "--older-than", "soon"])
    assert exit_.value.code == 2
    assert "--older-than" in capsys.readouterr().err


async def test_record_then_replay(fake_llm: FakeLLMServer, tmp_path: Path, dead_url: str) -> None:
    """Recorded once against a server; replayed offline, streams too; a miss sends nothing."""
    path = tmp_path / "recorded.sqlite"
    async with open_replay_client(
        path, record=True, base_url=fake_llm.base_url, model="m"
    ) as client:
        recorded = await client.chat("Question 1")
        vectors = await client.embed(["a"])
    async with open_replay_client(path, record=False, base_url=dead_url, model="m") as client:
        assert await client.chat("Question 1") == recorded
        assert await client.embed(["a"]) == vectors
        async with client.stream("Question 1") as stream:
            assert "".join([chunk.text async for chunk in stream]) == recorded.text
        with pytest.raises(CacheMissError, match="TRIO_LLM_RECORD=1") as missed:
            await client.chat("Question 2")
        assert len(missed.value.key) == 64
        with pytest.raises(CacheMissError, match="cache=False"):
            await client.chat("Question 1", cache=False)
        assert client.statistics().sent == 1  # the refused cache=False attempt, not sent
    assert fake_llm.stats.total_requests == 2


async def test_record_mode_from_the_environment(
    fake_llm: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRIO_LLM_RECORD=1 records; unset, a missing recording file is a clear error."""
    path = tmp_path / "recorded.sqlite"
    with pytest.raises(CacheMissError, match="no recordings at"):
        async with open_replay_client(path, base_url=fake_llm.base_url, model="m"):
            pass  # pragma: no cover
    assert not path.exists()
    monkeypatch.setenv("TRIO_LLM_RECORD", "yes")
    async with open_replay_client(path, base_url=fake_llm.base_url, model="m") as client:
        assert not (await client.chat("Recorded.")).cached
    monkeypatch.delenv("TRIO_LLM_RECORD")
    async with open_replay_client(path, base_url="https://api.example.com/v1", model="m") as client:
        assert (await client.chat("Recorded.")).cached  # no key needed: nothing is sent


async def test_replay_client_refuses_its_own_settings(tmp_path: Path) -> None:
    """cache= (and, replaying, transport=) are the replay client's own."""
    path = tmp_path / "r.sqlite"
    with pytest.raises(trio_llm.ConfigurationError, match="cache="):
        async with open_replay_client(path, record=True, cache="x"):
            pass  # pragma: no cover
    with pytest.raises(trio_llm.ConfigurationError, match="transport="):
        async with open_replay_client(path, record=False, transport=None):
            pass  # pragma: no cover


def test_resume_command_keeps_the_cache() -> None:
    """The command printed to resume a batch names the same --cache."""
    from trio_llm._cli import build_parser
    from trio_llm.batch._command import _resume_command

    args = build_parser().parse_args(["batch", "in.jsonl", "-o", "out.jsonl", "--cache", "c.db"])
    assert _resume_command(args) == "trio-llm batch in.jsonl -o out.jsonl --cache c.db"
