"""A batch run's budget (--max-cost): spend stays within it, and the run stops cleanly."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_llm
from trio_llm._cli import main
from trio_llm._cost import Pricer
from trio_llm._estimate import token_bounds
from trio_llm.batch._budget import DEFAULT_COMPLETION_TOKENS, Budget
from trio_llm.testing import FakeLLMConfig, open_fake_llm
from trio_llm.testing._replies import MESSAGE_OVERHEAD, REPLY_OVERHEAD, count_tokens

pytest.importorskip("genai_prices")

MODEL = "gpt-4o-mini"


def write_lines(path: Path, count: int, **body: Any) -> Path:
    with path.open("w") as file:
        for i in range(count):
            file.write(json.dumps({"custom_id": f"r{i}", "prompt": f"question {i}", **body}))
            file.write("\n")
    return path


def answers(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def line_bound(max_tokens: int, i: int = 10) -> float:
    """The bound the budget puts on one short line (``question NN``)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}]}
    prompt, _ = token_bounds(body, default_completion=0)
    bound = Pricer("openai").bound(MODEL, prompt, max_tokens)
    assert bound is not None
    return bound


def spent_by(records: list[dict[str, Any]]) -> float:
    """What the answered lines cost, priced again from their usage."""
    pricer = Pricer("openai")
    total = 0.0
    for record in records:
        usage = trio_llm.Usage.from_json(record["response"]["body"]["usage"])
        cost = pricer.cost(usage, record["response"]["body"]["model"])
        assert cost is not None
        total += cost
    return total


async def test_the_budget_stops_the_run_within_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The run stops starting lines before the budget; what it spent stays within it."""
    source = write_lines(tmp_path / "in.jsonl", 100, max_tokens=20)
    target = tmp_path / "out.jsonl"
    budget = 12.5 * line_bound(20)
    async with (
        open_fake_llm(FakeLLMConfig(latency=0.5)) as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL, max_concurrency=4) as client,
    ):
        summary = await trio_llm.run_batch(source, target, client=client, max_cost=budget)
        stats = client.statistics()
    records = answers(target)
    assert summary.over_budget
    assert summary.max_cost == budget
    assert summary.cost is not None
    assert summary.cost <= budget
    assert summary.cost == pytest.approx(spent_by(records))
    assert stats.cost == pytest.approx(summary.cost)
    # Bounds exceed real costs: more than 12 lines fit, and every line is answered or not.
    assert 12 < summary.succeeded == len(records) < 100
    assert summary.unanswered == 100 - summary.succeeded
    assert not summary.stopped
    assert not summary.interrupted


async def test_requests_in_flight_count_against_the_budget(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """With room for three bounds, at most three requests are in flight, whatever the limit."""
    source = write_lines(tmp_path / "in.jsonl", 30, max_tokens=40)
    async with (
        open_fake_llm(FakeLLMConfig(latency=1.0)) as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL, max_concurrency=10) as client,
    ):
        summary = await trio_llm.run_batch(
            source, tmp_path / "out.jsonl", client=client, max_cost=3.5 * line_bound(40)
        )
    assert server.stats.peak_concurrency == 3
    assert summary.over_budget
    assert summary.cost is not None
    assert summary.cost <= 3.5 * line_bound(40)


async def test_a_rerun_starts_a_new_budget(tmp_path: Path) -> None:
    """Rerunning after a stop sends the unanswered lines with a budget of its own."""
    source = write_lines(tmp_path / "in.jsonl", 20, max_tokens=10)
    target = tmp_path / "out.jsonl"
    budget = 6.5 * line_bound(10)
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL, max_concurrency=2) as client,
    ):
        first = await trio_llm.run_batch(source, target, client=client, max_cost=budget)
        second = await trio_llm.run_batch(source, target, client=client, max_cost=budget)
        last = await trio_llm.run_batch(source, target, client=client, max_cost=1.0)
    assert first.over_budget
    assert second.over_budget
    assert second.skipped == first.succeeded
    assert second.succeeded > 0
    assert second.cost is not None
    assert second.cost <= budget
    assert not last.over_budget
    assert last.complete
    assert len(answers(target)) == 20


async def test_unknown_price_is_refused_before_sending(tmp_path: Path) -> None:
    """max_cost with a model that has no price is refused up front: nothing is sent."""
    source = write_lines(tmp_path / "in.jsonl", 5)
    target = tmp_path / "out.jsonl"
    target.write_text("")
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL) as client,
    ):
        with (tmp_path / "other.jsonl").open("w") as file:
            file.write(json.dumps({"custom_id": "x", "prompt": "hi", "model": "my-llama"}) + "\n")
        with pytest.raises(trio_llm.ConfigurationError, match="'my-llama' has none"):
            await trio_llm.run_batch(tmp_path / "other.jsonl", target, client=client, max_cost=1)
        assert sum(server.stats.requests_by_status.values()) == 0
        # Without a budget the same lines run, unpriced.
        summary = await trio_llm.run_batch(source, target, client=client)
    assert summary.cost is not None
    assert target.read_text().count("\n") == 5
    with pytest.raises(ValueError, match="max_cost must be a number of USD > 0"):
        await trio_llm.run_batch(source, target, client=client, max_cost=0)


async def test_a_price_makes_a_model_budgetable(tmp_path: Path) -> None:
    """With prices= for it, a self-hosted model can run under a budget."""
    source = write_lines(tmp_path / "in.jsonl", 10, max_tokens=10)
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(
            base_url=server.base_url,
            model="my-llama",
            prices={"my-llama": trio_llm.Price(input=100.0, output=100.0)},
        ) as client,
    ):
        summary = await trio_llm.run_batch(
            source, tmp_path / "out.jsonl", client=client, max_cost=0.01
        )
    assert summary.over_budget
    assert summary.cost is not None
    assert 0 < summary.cost <= 0.01


async def test_failed_lines_give_their_bound_back(tmp_path: Path) -> None:
    """Error replies cost nothing: a run of failures never exhausts the budget."""
    source = write_lines(tmp_path / "in.jsonl", 10, max_tokens=10)
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=400)) as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL, max_concurrency=1) as client,
    ):
        summary = await trio_llm.run_batch(
            source, tmp_path / "out.jsonl", client=client, max_cost=1.5 * line_bound(10)
        )
    assert not summary.over_budget
    assert summary.failed == 10
    assert summary.cost == 0.0


def test_bounds_cover_the_prompt_tokens() -> None:
    """The prompt bound (UTF-8 bytes) is never below a tokenizer's count, CJK included."""
    for text in ["a b c d e f", "Hello, world!", "河流带走了什么", "x" * 1000, "🙂 ok"]:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 7, "n": 2}
        prompt, completion = token_bounds(body, default_completion=99)
        assert prompt >= count_tokens(text) + MESSAGE_OVERHEAD + REPLY_OVERHEAD
        assert prompt >= len(text)
        assert completion == 14
    prompt, completion = token_bounds(
        {"messages": [{"role": "user", "content": "hi"}]}, default_completion=99
    )
    assert completion == 99
    assert token_bounds({"input": [[1, 2, 3], [4]]}, default_completion=99) == (4, 0)
    assert token_bounds({"input": "four"}, default_completion=99) == (4, 0)


def test_a_line_without_max_tokens_is_bounded_by_the_default() -> None:
    """A line that sets no max_tokens is bounded with DEFAULT_COMPLETION_TOKENS."""
    pricer = Pricer("openai")
    budget = Budget(1.0, [(pricer, None)], MODEL)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    bound = budget.reserve(body)
    prompt, _ = token_bounds(body, default_completion=0)
    assert bound == pricer.bound(MODEL, prompt, DEFAULT_COMPLETION_TOKENS)
    assert budget.in_flight == bound
    budget.settle(bound, 0.0001)
    assert budget.in_flight == 0
    assert budget.spent == 0.0001
    budget.settle(budget.reserve(body) or 0.0, None)  # no known cost: the bound is kept
    assert budget.spent == pytest.approx(0.0001 + bound)
    tight = Budget(bound * 1.5, [(pricer, None)], MODEL)
    assert tight.reserve(body) == bound
    assert tight.reserve(body) is None  # the first bound is still in flight
    tight.release(bound)
    assert tight.reserve(body) is None  # once refused, the run sends nothing more
    assert "the next request could cost up to" in tight.describe()


def test_cli_stops_at_the_budget_with_its_own_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-cost: exit 4, the spend, and a resume command that keeps the budget and prices."""
    source = write_lines(tmp_path / "in.jsonl", 40, max_tokens=10)
    target = tmp_path / "out.jsonl"
    argv = [
        "batch",
        str(source),
        "-o",
        str(target),
        "--simulate",
        "--concurrency",
        "4",
        "--max-cost",
        "0.00004",
        "--price",
        "input=1,output=1",
    ]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert re.search(r"stopped at the budget: spent \$0\.0000\d+ of --max-cost \$0\.000040", err)
    assert "--max-cost 4e-05 --price input=1,output=1 --simulate" in err
    assert re.search(r"cost\s+\$0\.0000\d+ \(budget \$0\.000040\)", err)  # the summary table
    assert "| cost $" in err  # the progress line
    answered = len(answers(target))
    assert 0 < answered < 40
    assert main(argv) == 4  # a resume: a new budget, more lines
    assert len(answers(target)) > answered


def test_cli_refuses_max_cost_without_a_price(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-cost with a model that has no price: one line, exit 2."""
    source = write_lines(tmp_path / "in.jsonl", 3)
    argv = ["batch", str(source), "-o", str(tmp_path / "o.jsonl"), "--simulate"]
    assert main([*argv, "--model", "my-llama", "--max-cost", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("trio-llm batch: error: --max-cost needs a price for every model")
    with pytest.raises(SystemExit) as exited:  # argparse: a usage error
        main([*argv, "--model", "my-llama", "--max-cost", "1", "--price", "model=x"])
    assert exited.value.code == 2
    assert "argument --price: input and output missing" in capsys.readouterr().err
    both = ["--price", "input=1,output=1", "--price", "model=a,input=1,output=1"]
    assert main([*argv, *both]) == 2
    assert "give it once and alone" in capsys.readouterr().err
    twice = ["--price", "model=a,input=1,output=1", "--price", "model=a,input=2,output=1"]
    assert main([*argv, *twice]) == 2
    assert "two prices for model 'a'" in capsys.readouterr().err
