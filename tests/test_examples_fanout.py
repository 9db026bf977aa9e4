"""The fan-out, batching, concurrency, retry and rate-limit examples run offline and do their job.

Each example is imported from ``examples/`` and its ``main([])`` awaited under the
autojump clock (the fake server's latencies and the rate limiter's waits take no real
time); one runs as a script, in a subprocess, the way users run it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import trio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (not as ``__main__``: nothing runs)."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_example(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run an example with no arguments; check it went offline; return its stdout."""
    module = load_example(name)
    assert module.__doc__, f"{name} has no module docstring"
    await module.main([])
    out, err = capsys.readouterr()
    assert "no --base-url: offline" in err
    return out


def number(pattern: str, text: str) -> float:
    """The number captured by ``pattern``'s first group in ``text`` (thousands separators ok)."""
    match = re.search(pattern, text)
    assert match is not None, f"{pattern!r} not in output:\n{text}"
    return float(match[1].replace(",", ""))


@pytest.fixture(autouse=True)
def _restore_logger_levels() -> Iterator[None]:
    """Examples set logger levels, as scripts do; put them back for the other tests."""
    names = ["trio_llm.retry", "stamina"]
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_fan_out_prints_every_answer_in_order(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """fan_out: ten answers in input order, all in flight at once, then map_concurrently."""
    module = load_example("fan_out")
    out = await run_example("fan_out", capsys)
    questions = re.findall(r"^Q: (.*)$", out, re.MULTILINE)
    assert questions == module.QUESTIONS
    assert len(re.findall(r"^A: \S", out, re.MULTILINE)) == 10
    assert "10 answers in 0.30 s" in out  # one latency: all ten were in flight together
    assert len(re.findall(r"\? -> \S", out)) == 3


async def test_batching_shows_the_sliding_window_is_faster(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """batching: the sliding window beats fixed batches on requests of varied duration."""
    out = await run_example("batching", capsys)
    batched = number(r"fixed batches of 8: +([\d.]+) s", out)
    sliding = number(r"sliding window \(chat_many\): +([\d.]+) s", out)
    assert sliding < 0.7 * batched
    assert "slowest request" in out


async def test_concurrency_limit_caps_in_flight_and_streams_results(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """concurrency_limit: three jobs never pass 5 in flight; results arrive fastest first."""
    out = await run_example("concurrency_limit", capsys)
    for line in ["summaries: 8 of 8 answered", "titles: 6 of 6", "tags: 6 of 6"]:
        assert line in out
    assert "peak in flight: 5 (max_concurrency=5)" in out
    assert "the server saw at most 5 requests at once" in out
    order = [int(i) for i in re.findall(r"^  #(\d) after", out, re.MULTILINE)]
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert order[0] == 1  # the 5-token answer
    assert order != sorted(order)


async def test_retries_survive_a_flaky_server_and_report_the_bad_item(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """retries: every good item is answered despite faults; the 400 is reported, not raised."""
    out = await run_example("retries", capsys)
    assert "30 of 31 answered" in out
    assert "item 30 failed for good: BadRequestError: HTTP 400" in out
    stats = re.search(r"HTTP attempts: (\d+), retries: (\d+), succeeded: 30, failed: 1", out)
    assert stats is not None
    attempts, retries = int(stats[1]), int(stats[2])
    assert retries > 0
    assert attempts == 31 + retries


async def test_rate_limited_job_runs_at_the_limit(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """rate_limited_job: all answered, at the token limit after the first bucket, ~no 429s."""
    out = await run_example("rate_limited_job", capsys)
    assert "175 of 175 answered" in out
    rate = number(r"then ([\d,]+) tokens/min \(limit 6,000\)", out)
    assert 0.85 * 6000 <= rate <= 6000 * 1.01
    assert number(r"429 responses: (\d+)", out) <= 1


def test_an_example_runs_as_a_script() -> None:
    """`python examples/fan_out.py` runs offline with no arguments and says so on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "fan_out.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "no --base-url: offline" in done.stderr
    assert done.stdout.count("\nA: ") == 10
