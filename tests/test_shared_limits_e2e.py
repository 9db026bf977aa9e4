"""One job, three processes, one limit: ``trio-llm batch --shard k/3`` runs against one
fake server that enforces its own limits, with and without ``--redis``.

Real processes, a real redis-server, real time. The limits are scaled up so that each run
lasts about ten seconds: a tokens-per-minute limit of 25,200 (420 tokens a second, 20
requests of 21 tokens) binds, and a requests-per-minute limit of 1,800 is enforced too.

Buckets start full, a minute's worth, which would make a short run all burst: so a first
run (one process, a few prompts of 2,000 tokens) nearly empties the server's tokens
bucket, and with ``--redis`` the shared one, before the three shards start (the refill
while they start, a few seconds on a loaded machine, is a burst of up to 80 lines of
their 200). A probe then reads what
the server's bucket holds (a request larger than the bucket: refused with a 429 that
charges nothing, its headers saying what remains). The throughput is the tokens the
server admitted from then until 90% of the shards' lines had arrived, over what its
limit allowed in that time: what the bucket held, plus its refill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx2
import pytest
import trio

from trio_llm.testing import FakeLLMConfig, FakeLLMServer, open_fake_llm
from trio_llm.testing._redis_server import RedisServer

RPM = 1_800
TPM = 25_200
MAX_TOKENS = 8  # every reply is 8 tokens
TOKENS = 21  # each request's in all (13 of prompt)
SHARDS = 3
# Prompts of 2,000 words (2,021 tokens with the reply), to take most of the bucket.
WARM_UP_TOKENS = 2_021
WARM_UP_LINES = TPM // WARM_UP_TOKENS


def write_input(path: Path, lines: int, *, words: int = 0) -> Path:
    with path.open("w") as file:
        for index in range(lines):
            prompt = f"question {index} of the shared limit test" + " word" * words
            line = {"custom_id": f"q-{index}", "prompt": prompt, "max_tokens": MAX_TOKENS}
            file.write(json.dumps(line) + "\n")
    return path


def batch_command(input_path: Path, output: Path, server: FakeLLMServer, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trio_llm",
        "batch",
        str(input_path),
        "-o",
        str(output),
        *("--base-url", server.base_url, "--model", "fake-gpt"),
        *("--rpm", str(RPM), "--tpm", str(TPM)),
        *("--concurrency", "32", "--max-consecutive-failures", "0"),
        *("--progress-interval", "60"),
        *extra,
    ]


async def empty_the_buckets(server: FakeLLMServer, tmp_path: Path, *extra: str) -> None:
    """Spend the server's tokens bucket (and the shared one, with ``--redis``)."""
    warm_up = write_input(tmp_path / "warm-up.jsonl", WARM_UP_LINES, words=2_000)
    command = batch_command(warm_up, tmp_path / "warm-up-out.jsonl", server, *extra)
    codes = await run_shards([command])
    assert codes == [0]


@attrs.define
class Watch:
    """What the fake server did over time, sampled every few milliseconds."""

    # (time, requests arrived, requests admitted) so far: admitted, not refused with a
    # 429, counted as they arrive (answers come later, the later the busier the machine).
    samples: list[tuple[float, int, int]] = attrs.Factory(list)

    async def run(self, server: FakeLLMServer) -> None:
        stats = server.stats
        while True:
            arrived = stats.total_requests
            admitted = arrived - stats.rate_limited
            self.samples.append((trio.current_time(), arrived, admitted))
            await trio.sleep(0.002)

    def at(self, time: float) -> tuple[float, int, int]:
        """The last sample taken at or before ``time``."""
        return [sample for sample in self.samples if sample[0] <= time][-1]

    def when(self, requests: int) -> float:
        """When ``requests`` requests had arrived in all."""
        return min(time for time, arrived, _ in self.samples if arrived >= requests)

    def arrived(self, start: float, end: float) -> int:
        """Requests that arrived from ``start`` to ``end``."""
        return self.at(end)[1] - self.at(start)[1]


@asynccontextmanager
async def watched(config: FakeLLMConfig) -> AsyncIterator[tuple[FakeLLMServer, Watch]]:
    async with open_fake_llm(config) as server, trio.open_nursery() as nursery:
        watch = Watch()
        nursery.start_soon(watch.run, server)
        yield server, watch
        nursery.cancel_scope.cancel()


async def probe(server: FakeLLMServer) -> tuple[float, float]:
    """Return what the server's tokens bucket holds, and when, charging it nothing."""
    body = {"model": "fake-gpt", "messages": [{"role": "user", "content": "word " * TPM}]}
    async with httpx2.AsyncClient() as http:
        response = await http.post(server.base_url + "/chat/completions", json=body)
    assert response.status_code == 429
    return float(response.headers["x-ratelimit-remaining-tokens"]), trio.current_time()


async def run_shards(commands: list[list[str]]) -> list[int]:
    """Run the commands at once; return their exit statuses."""
    codes = [-1] * len(commands)

    async def run(index: int) -> None:
        done = await trio.run_process(
            commands[index], check=False, stdout=subprocess.DEVNULL, capture_stderr=True
        )
        codes[index] = done.returncode
        if done.returncode not in (0, 1):
            print(done.stderr.decode(errors="replace")[-2000:])

    async with trio.open_nursery() as nursery:
        for index in range(len(commands)):
            nursery.start_soon(run, index)
    return codes


def shard_commands(
    input_path: Path, tmp_path: Path, server: FakeLLMServer, *extra: str
) -> tuple[list[list[str]], list[Path]]:
    outputs = [tmp_path / f"out-{shard}.jsonl" for shard in range(1, SHARDS + 1)]
    commands = [
        batch_command(input_path, output, server, "--shard", f"{shard}/{SHARDS}", *extra)
        for shard, output in enumerate(outputs, 1)
    ]
    return commands, outputs


def answered(outputs: list[Path]) -> set[str]:
    ids = set()
    for output in outputs:
        for line in output.read_text().splitlines():
            record = json.loads(line)
            if record["error"] is None:
                ids.add(record["custom_id"])
    return ids


@pytest.mark.parametrize("shared", [True, False], ids=["with-redis", "without-redis"])
async def test_three_shards_run_at_the_limit_together(
    shared: bool, redis_server: RedisServer, tmp_path: Path
) -> None:
    """With --redis, three shard processes together run at >= 0.95 of the limit with
    <= 0.5% 429s; without it, each takes the whole limit and the server refuses many."""
    lines = 300  # 15 s at 20 a second: the refill while the shards start, then paced
    input_path = write_input(tmp_path / "in.jsonl", lines)
    extra = ("--redis", redis_server.url) if shared else ()
    config = FakeLLMConfig(latency=0.05, requests_per_minute=RPM, tokens_per_minute=TPM)
    async with watched(config) as (server, watch):
        await empty_the_buckets(server, tmp_path, *extra)
        held, probed = await probe(server)
        before = server.stats.total_requests
        refused_before = server.stats.rate_limited
        admitted_before = watch.at(trio.current_time())[2]
        commands, outputs = shard_commands(input_path, tmp_path, server, *extra)
        codes = await run_shards(commands)
    answers = server.stats.requests_by_status[200] - WARM_UP_LINES
    assert server.stats.prompt_tokens + server.stats.completion_tokens == (
        WARM_UP_TOKENS * WARM_UP_LINES + TOKENS * answers
    )
    end = watch.when(before + lines * 9 // 10)
    admitted = (watch.at(end)[2] - admitted_before) * TOKENS
    throughput = admitted / (held + TPM / 60 * (end - probed))
    responses = server.stats.total_requests - before
    refused = server.stats.rate_limited - refused_before
    share = refused / responses
    print(
        f"{'with' if shared else 'without'} --redis: throughput/limit {throughput:.3f}, "
        f"429s {refused} of {responses} responses ({share:.2%})"
    )
    if shared:
        assert codes == [0, 0, 0]
        assert answered(outputs) == {f"q-{index}" for index in range(lines)}
        assert throughput >= 0.95
        assert share <= 0.005
    else:
        assert share >= 0.2  # the storm a shared limit prevents


async def until_all_answering(outputs: list[Path]) -> None:
    """Wait until every shard has written an answer: all three are sending."""
    while not all(output.exists() and output.stat().st_size for output in outputs):  # noqa: ASYNC110 - files
        await trio.sleep(0.01)


@asynccontextmanager
async def shards_running(
    server: FakeLLMServer, tmp_path: Path, lines: int, *extra: str
) -> AsyncIterator[tuple[list[Path], list[int]]]:
    """Run three shard processes in the background; yield once all of them answer."""
    input_path = write_input(tmp_path / "in.jsonl", lines)
    commands, outputs = shard_commands(input_path, tmp_path, server, *extra)
    codes: list[int] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            codes.extend(await run_shards(commands))

        nursery.start_soon(run)
        with trio.fail_after(30):
            await until_all_answering(outputs)
        yield outputs, codes


@pytest.mark.parametrize("shared", [True, False], ids=["with-redis", "without-redis"])
async def test_a_429_pauses_every_process(
    shared: bool, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A 429 with retry-after (1 s) that one shard gets holds all three for that long
    with --redis; without it, the other two go on sending."""
    extra = ("--concurrency", "4", *(("--redis", redis_server.url) if shared else ()))
    async with watched(FakeLLMConfig(latency=0.05)) as (server, watch):
        async with shards_running(server, tmp_path, 900, *extra) as (outputs, codes):
            server.config = attrs.evolve(server.config, error_rate=1.0, error_status=429)
            while not server.stats.injected_errors:  # noqa: ASYNC110 - a counter
                await trio.sleep(0.001)
            refused = trio.current_time()
            server.config = attrs.evolve(server.config, error_rate=0.0)
            await trio.sleep(1.0)
            during = watch.arrived(refused + 0.1, refused + 0.9)
            answered_by_then = len(answered(outputs))
        assert codes == [0, 0, 0]
    assert answered_by_then < 900  # the job was not over when the pause ended
    print(f"{'with' if shared else 'without'} --redis: {during} requests during the pause")
    if shared:
        assert during == 0
    else:
        assert during > 20


async def test_killing_redis_stops_every_process_until_it_is_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis killed mid-run: no shard sends anything (none runs unlimited) until it is
    started again; then all three finish, every line answered."""
    lines = 900
    extra = ("--concurrency", "4", "--rpm", "60000", "--redis", redis_server.url)
    async with watched(FakeLLMConfig(latency=0.05)) as (server, watch):
        async with shards_running(server, tmp_path, lines, *extra) as (outputs, codes):
            await trio.to_thread.run_sync(redis_server.kill)
            killed = trio.current_time()
            await trio.sleep(1.5)
            during = watch.arrived(killed + 0.3, killed + 1.5)
            await trio.to_thread.run_sync(redis_server.start)
        assert codes == [0, 0, 0]
    assert during == 0
    assert answered(outputs) == {f"q-{index}" for index in range(lines)}
