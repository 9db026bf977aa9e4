"""The hello, chains, map-reduce and structured-output examples run offline and do their job.

Each example is imported from ``examples/`` and its ``main([])`` awaited under the
autojump clock (the fake server's latencies take no real time); one runs as a script, in a
subprocess, the way users run it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
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
    # Registered, as an imported module is, so typing.get_type_hints finds its globals.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def run_example(module: ModuleType, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run an example's ``main``; check it went offline and says so; return its stdout."""
    assert module.__doc__, f"{module.__name__} has no module docstring"
    await module.main(list(args))
    out, err = capsys.readouterr()
    assert "no --base-url: offline" in err
    return out


async def test_hello_runs_three_calls_in_the_time_of_one(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """hello: one call, then three at once taking one call's latency."""
    module = load_example("hello")
    out = await run_example(module, capsys)
    assert re.search(r"^one call: \S", out, re.MULTILINE)
    assert "(0.50 s," in out
    for question in module.QUESTIONS:
        assert re.search(rf"^{re.escape(question)} -> \S", out, re.MULTILINE)
    assert "three calls at once: 0.50 s" in out


async def test_chains_stream_every_story_in_topic_order(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """chains: each topic's story and title, in order, generated concurrently."""
    module = load_example("chains")
    out = await run_example(module, capsys)
    headers = re.findall(r"^## (.*)$", out, re.MULTILINE)
    assert headers == module.TOPICS
    assert len(re.findall(r"-- title: \S", out)) == len(module.TOPICS)
    sections = re.split(r"^## .*$", out, flags=re.MULTILINE)[1:]
    assert len(sections) == len(module.TOPICS)
    assert all(section.split("-- title:")[0].strip() for section in sections)
    seconds = float(re.findall(r"in ([\d.]+) s, generated concurrently", out)[0])
    one_story = 0.2 + 80 / 50 + 0.2  # latency, 80 tokens at 50/s, the title call
    assert seconds < 2 * one_story  # four chains, concurrently


async def test_chains_stories_match_single_calls(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """chains: the streamed text is exactly what a plain call to the same prompt returns."""
    import trio_llm
    from trio_llm.testing import open_fake_llm

    module = load_example("chains")
    out = await run_example(module, capsys)
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model="gpt-4o-mini") as client,
    ):
        reply = await module.STORY.run(client, topic=module.TOPICS[0])
    assert reply.text in out


async def test_map_reduce_summarises_every_article(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """map_reduce: 100 articles summarised concurrently, combined in rounds into a digest."""
    module = load_example("map_reduce")
    out = await run_example(module, capsys)
    match = re.search(
        r"100 articles -> (\d+) chunks -> (\d+) summaries, combined in (\d+) round\(s\) "
        r"with (\d+) call\(s\)",
        out,
    )
    assert match is not None, out
    chunks, summaries, rounds, reduces = map(int, match.groups())
    assert chunks == summaries == 100
    assert rounds >= 2  # the summaries did not fit in one call
    requests = int(re.findall(r"^(\d+) requests", out, re.MULTILINE)[0])
    assert requests == summaries + reduces
    assert out.split("\n\n")[0].strip()  # the digest


async def test_map_reduce_splits_long_documents(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """map_reduce: with a small chunk size, articles are split into more chunks."""
    module = load_example("map_reduce")
    out = await run_example(module, capsys, "--chunk-tokens", "60")
    chunks = int(re.findall(r"-> (\d+) chunks", out)[0])
    assert chunks > 100


async def test_structured_output_prints_typed_facts(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """structured_output: facts into the pydantic model, a headline into the attrs class,
    each after one repair, through either provider."""
    module = load_example("structured_output")
    for provider in ("openai", "anthropic"):
        out = await run_example(module, capsys, "--count", "3", "--provider", provider)
        assert len(re.findall(r"^article-\d+: ", out, re.MULTILINE)) == 3
        topics = re.findall(r"topic=(\w+) sentiment=(\w+)", out)
        assert len(topics) == 3
        assert all(sentiment in ("positive", "neutral", "negative") for _, sentiment in topics)
        assert len(re.findall(r"^  headline: '[^']+'", out, re.MULTILINE)) == 3
        assert "12 requests for 6 answers: every first reply was repaired" in out
        assert "gave up" not in out


def test_hello_runs_as_a_script() -> None:
    """`python examples/hello.py` runs offline, says so on stderr, and exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "hello.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "no --base-url: offline" in done.stderr
    assert "three calls at once" in done.stdout
