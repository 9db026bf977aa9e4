"""`--shard K/N` on batch (a stable hash of custom_id), and `--redis` / `--limit-name` on
batch, chat and serve: their parsing, their errors (one line, a documented status), and
what they do end to end."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import trio

import trio_llm
from trio_llm._cli import build_parser, main
from trio_llm.batch._command import _resume_command
from trio_llm.batch._shard import Shard, parse_shard, shard_of
from trio_llm.testing import FakeLLMServer, open_fake_llm
from trio_llm.testing._redis_server import RedisServer, free_port


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def prompts(count: int) -> list[object]:
    return [{"custom_id": f"id-{index}", "prompt": f"p{index}"} for index in range(count)]


# --- the hash ------------------------------------------------------------------------------


def test_shards_follow_the_documented_hash() -> None:
    """Shard = first 8 bytes of SHA-256(custom_id) as a big-endian int, mod N, plus 1."""
    for custom_id in ("a", "id-1", "ünïcødé", "x" * 1000):
        digest = hashlib.sha256(custom_id.encode()).digest()
        assert shard_of(custom_id, 7) == int.from_bytes(digest[:8], "big") % 7 + 1
    # Pinned: the same everywhere, in every version (outputs of old runs stay valid).
    assert [shard_of(f"request-{index}", 3) for index in range(8)] == [
        shard_of(f"request-{index}", 3) for index in range(8)
    ]
    assert (
        shard_of("request-0", 3) == int(hashlib.sha256(b"request-0").hexdigest()[:16], 16) % 3 + 1
    )


def test_shards_split_evenly_and_cover_everything() -> None:
    """Every id is in exactly one shard; 3,000 ids split about evenly."""
    counts = [0, 0, 0]
    for index in range(3_000):
        counts[shard_of(f"id-{index}", 3) - 1] += 1
    assert sum(counts) == 3_000
    assert all(900 < count < 1_100 for count in counts)


def test_lines_without_a_custom_id_go_by_line_number() -> None:
    """A line with no usable custom_id belongs to shard (line - 1) % N + 1."""
    assert [Shard(k, 3).owns(None, 5) for k in (1, 2, 3)] == [False, True, False]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0/3", "K must be from 1 to N"),
        ("4/3", "K must be from 1 to N"),
        ("1/0", "K must be from 1 to N"),
        ("x", "expected K/N"),
        ("3", "expected K/N"),
        ("1/3/5", "expected K/N"),
        ("a/b", "expected K/N"),
    ],
)
def test_bad_shards_are_refused(text: str, reason: str) -> None:
    """Anything but K/N with 1 <= K <= N is refused, saying why."""
    with pytest.raises(Exception, match=reason):
        parse_shard(text)


def test_shard_checks_its_numbers() -> None:
    """Shard(K, N) needs two ints with 1 <= K <= N."""
    assert str(parse_shard("2/3")) == "2/3"
    with pytest.raises(TypeError):
        Shard(True, 3)
    with pytest.raises(ValueError, match="1 <= K <= N"):
        Shard(3, 2)


# --- batch --shard ----------------------------------------------------------------------------


async def test_three_shards_answer_every_line_once(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    """Three runs over one file, each its own shard and output, answer each line once."""
    source = write_lines(tmp_path / "in.jsonl", prompts(60))
    seen: list[str] = []
    totals = []
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        for index in (1, 2, 3):
            output = tmp_path / f"out-{index}.jsonl"
            summary = await trio_llm.run_batch(source, output, client=client, shard=(index, 3))
            assert summary.all_succeeded
            totals.append(summary.total)
            ids = [json.loads(line)["custom_id"] for line in output.read_text().splitlines()]
            assert all(shard_of(custom_id, 3) == index for custom_id in ids)
            seen += ids
    assert sorted(seen) == sorted(f"id-{index}" for index in range(60))
    assert sum(totals) == 60
    assert fake_llm.stats.total_requests == 60


async def test_a_shard_resumes_and_checks_only_its_lines(
    tmp_path: Path, fake_llm: FakeLLMServer
) -> None:
    """Invalid lines are recorded by their own shard; a rerun of a shard sends nothing."""
    lines = [*prompts(12), "not json", {"custom_id": "id-0", "prompt": "again"}]
    source = write_lines(tmp_path / "in.jsonl", lines)
    owner = (13 - 1) % 3 + 1  # "not json" is line 13: no custom_id, by line number
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        recorded = 0
        for index in (1, 2, 3):
            output = tmp_path / f"out-{index}.jsonl"
            summary = await trio_llm.run_batch(
                source, output, client=client, shard=(index, 3), skip_invalid=True
            )
            recorded += summary.invalid
            if index == owner:
                assert summary.invalid >= 1
            again = await trio_llm.run_batch(source, output, client=client, shard=(index, 3))
            assert again.skipped == summary.total
            assert again.succeeded == again.failed == 0
    assert recorded == 2  # the bad line, and the duplicate of id-0 (in id-0's shard)
    assert fake_llm.stats.total_requests == 12


async def test_run_batch_refuses_a_bad_shard(tmp_path: Path, fake_llm: FakeLLMServer) -> None:
    """run_batch(shard=) checks K/N before it opens anything."""
    source = write_lines(tmp_path / "in.jsonl", prompts(1))
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="m") as client:
        with pytest.raises(ValueError, match="1 <= K <= N"):
            await trio_llm.run_batch(source, tmp_path / "o.jsonl", client=client, shard=(0, 2))
    assert not (tmp_path / "o.jsonl").exists()


def test_batch_shard_flag_says_which_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--shard 2/3` runs that shard's lines, and the plan line says so."""
    source = write_lines(tmp_path / "in.jsonl", prompts(30))
    output = tmp_path / "out.jsonl"
    assert main(["batch", str(source), "-o", str(output), "--simulate", "--shard", "2/3"]) == 0
    expected = sum(shard_of(f"id-{index}", 3) == 2 for index in range(30))
    assert f"30 lines in {source}, {expected} in shard 2/3" in capsys.readouterr().err
    assert len(output.read_text().splitlines()) == expected


@pytest.mark.parametrize("value", ["0/3", "4/3", "x", "2", "1/3/5"])
def test_batch_bad_shard_is_a_usage_error(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --shard that is not K/N with 1 <= K <= N: one line, exit 2, nothing written."""
    source = write_lines(tmp_path / "in.jsonl", prompts(1))
    with pytest.raises(SystemExit) as caught:
        main(["batch", str(source), "-o", str(tmp_path / "o.jsonl"), "--shard", value])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "argument --shard:" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_resume_command_keeps_the_shard_and_the_shared_limit() -> None:
    """The resume command repeats --shard, --redis (its password hidden) and --limit-name."""
    argv = ["batch", "in.jsonl", "-o", "out.jsonl", "--shard", "2/3"]
    argv += ["--redis", "redis://:pw@redis.internal:6379/0", "--limit-name", "team"]
    command = _resume_command(build_parser().parse_args(argv))
    assert command == (
        "trio-llm batch in.jsonl -o out.jsonl --redis 'redis://***@redis.internal:6379/0' "
        "--limit-name team --shard 2/3  (put back the credentials *** hides in --redis)"
    )


# --- --redis and --limit-name ------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["batch", "in.jsonl", "-o", "out.jsonl", "--simulate"],
        ["chat", "--simulate", "hi"],
        ["serve", "--upstream", "http://127.0.0.1:9/v1", "--port", "0"],
    ],
)
def test_redis_must_be_a_redis_url(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--redis takes redis://, rediss:// or unix:// only: else one line, exit 2."""
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--redis", "http://:secret@host:6379"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "expected a redis://, rediss:// or unix:// URL" in err
    assert "secret" not in err


@pytest.mark.parametrize("command", ["batch", "chat"])
def test_limit_name_needs_redis(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--limit-name alone is a usage error (exit 2), said in one line."""
    source = write_lines(tmp_path / "in.jsonl", prompts(1))
    argv = (
        ["batch", str(source), "-o", str(tmp_path / "o.jsonl")]
        if command == "batch"
        else ["chat", "hi"]
    )
    assert main([*argv, "--simulate", "--limit-name", "team"]) == 2
    assert "--limit-name names a shared limit: it needs --redis URL" in capsys.readouterr().err


def test_unreachable_redis_stops_batch_with_the_resume_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Redis down at start: batch says so in a line, exit 3, nothing sent or written."""
    source = write_lines(tmp_path / "in.jsonl", prompts(2))
    output = tmp_path / "o.jsonl"
    redis = f"redis://:pw@127.0.0.1:{free_port()}/0"
    assert main(["batch", str(source), "-o", str(output), "--simulate", "--redis", redis]) == 3
    err = capsys.readouterr().err
    assert "error: cannot use the shared rate limit's Redis at redis://***@127.0.0.1:" in err
    assert "once it answers, run the same command: trio-llm batch" in err
    assert "pw" not in err.replace("put back", "")
    assert not output.exists()


def test_unreachable_redis_fails_chat_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """chat with Redis down: one line naming the Redis, exit 1."""
    redis = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["chat", "--simulate", "--redis", redis, "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("trio-llm chat: error: SharedLimitError: cannot use the shared")


def test_chat_shares_its_limit_through_redis(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """chat --redis --limit-name keeps its limit's buckets in Redis under that name."""
    argv = ["chat", "--simulate", "--redis", redis_server.url, "--limit-name", "cli-chat", "hi"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()

    async def key_exists() -> int:
        from trio_llm._redis import open_redis

        async with open_redis(redis_server.url) as redis:
            found: int = await redis._client.exists(["trio-llm:limit:cli-chat"])
            return found

    assert trio.run(key_exists) == 1


async def test_two_serve_replicas_share_one_limit(redis_server: RedisServer) -> None:
    """Two `trio-llm serve` replicas with --redis and --rpm 60 share the 60: what one
    spent, the other waits for (a second for the next request)."""
    async with open_fake_llm() as upstream, trio.open_nursery() as nursery:
        urls = []
        for _ in range(2):
            command = [sys.executable, "-m", "trio_llm", "serve", "--upstream", upstream.base_url]
            command += ["--port", "0", "--model", "fake-gpt", "--rpm", "60"]
            command += ["--redis", redis_server.url]
            process = await nursery.start(
                functools.partial(
                    trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
                )
            )
            banner = b""
            with trio.fail_after(30):
                while b"\n" not in banner:
                    banner += await process.stdout.receive_some()
            urls.append(banner.decode().split("listening on ")[1].split()[0])
        first, second = (httpx2.AsyncClient(base_url=url, timeout=30) for url in urls)
        async with first, second:
            async with trio.open_nursery() as calls:
                for _ in range(60):
                    calls.start_soon(
                        functools.partial(first.post, "/generate", json={"prompt": "hi"})
                    )
            started = time.monotonic()
            response = await second.post("/generate", json={"prompt": "hi"})
            waited = time.monotonic() - started
        assert response.status_code == 200
        assert waited >= 0.5
        nursery.cancel_scope.cancel()
