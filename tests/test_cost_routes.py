"""Cost with the response cache and several endpoints: what a hit spends, who prices what.

A reply from the response cache spent nothing: its ``cost`` is ``0.0``, and neither
``statistics().cost`` nor ``BatchSummary.cost`` counts it. A reply is priced by the
provider of the endpoint that answered it and the model sent there: a fallback to an
Anthropic endpoint is priced as Anthropic's model, and a batch budget bounds a line by
the dearest endpoint it may go to.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import trio_llm
from trio_llm import Endpoint
from trio_llm._cost import Pricer
from trio_llm._errors import ConfigurationError
from trio_llm._estimate import token_bounds
from trio_llm.batch._budget import Budget
from trio_llm.testing import FakeLLMConfig, open_fake_llm

genai_prices = pytest.importorskip("genai_prices")

MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"


def table_cost(provider: str, model: str, usage: trio_llm.Usage) -> float:
    """genai-prices' own price for ``usage`` (what ``reply.cost`` must equal)."""
    found = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
        model,
        provider_id=provider,
    )
    return float(found.total_price)


async def test_a_cache_hit_costs_nothing(tmp_path: Path) -> None:
    """The first call is priced; its replay (whole or streamed) costs 0.0 and adds nothing."""
    path = tmp_path / "replies.sqlite"
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL, cache=path) as client,
    ):
        first = await client.chat("What does a river carry?")
        again = await client.chat("What does a river carry?")
        async with client.stream("What does a river carry?") as stream:
            async for _ in stream:
                pass
        stats = client.statistics()
    assert not first.cached
    assert first.cost == table_cost("openai", MODEL, first.usage) > 0
    assert again.cached
    assert again.cost == 0.0
    assert again == first  # cost, like cached, is not compared
    assert stream.response is not None
    assert stream.response.cached
    assert stream.response.cost == 0.0
    assert stats.cache_hits == 2
    assert stats.cost == first.cost
    assert stats.unpriced == 0
    assert server.stats.total_requests == 1


def write_lines(path: Path, count: int) -> Path:
    with path.open("w") as file:
        for i in range(count):
            line = {"custom_id": f"r{i}", "prompt": f"question {i}", "max_tokens": 20}
            file.write(json.dumps(line) + "\n")
    return path


async def test_a_batch_answered_from_the_cache_spends_nothing(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A rerun into a new output file, answered from the cache: cost 0.0, within any budget."""
    source = write_lines(tmp_path / "in.jsonl", 20)
    cache = tmp_path / "replies.sqlite"
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(base_url=server.base_url, model=MODEL, cache=cache) as client,
    ):
        first = await trio_llm.run_batch(source, tmp_path / "a.jsonl", client=client)
        rerun = await trio_llm.run_batch(source, tmp_path / "b.jsonl", client=client, max_cost=1.0)
        stats = client.statistics()
    assert first.cost is not None
    assert first.cost > 0
    assert first.cache_hits == 0
    assert (rerun.succeeded, rerun.cache_hits) == (20, 20)
    assert rerun.cost == 0.0
    assert not rerun.over_budget
    assert stats.cost == pytest.approx(first.cost)
    assert server.stats.total_requests == 20


async def test_a_fallback_to_anthropic_is_priced_as_anthropics_model(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An OpenAI endpoint fails; the Anthropic fallback's reply costs Anthropic's price."""
    async with (
        open_fake_llm(FakeLLMConfig(error_rate=1.0, error_status=503)) as local,
        open_fake_llm() as hosted,
    ):
        endpoints = [
            Endpoint(local.base_url, name="local"),
            Endpoint(
                hosted.root_url, name="hosted", provider="anthropic", model=CLAUDE, priority=1
            ),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model=MODEL) as client:
            reply = await client.chat("What is Trio?", max_tokens=30)
            stats = client.statistics()
    assert (reply.endpoint, reply.model) == ("hosted", CLAUDE)
    assert reply.cost == table_cost("anthropic", CLAUDE, reply.usage)
    assert reply.cost != table_cost("openai", MODEL, reply.usage)
    assert stats.cost == reply.cost
    assert local.stats.injected_errors >= 1


async def test_a_budget_bounds_a_line_by_its_dearest_endpoint() -> None:
    """With an OpenAI endpoint and an Anthropic fallback, a line's bound is the larger one;
    a fallback whose model has no price is refused up front."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    prompt, completion = token_bounds(body, default_completion=0)
    openai = Pricer("openai").bound(MODEL, prompt, completion)
    claude = Pricer("anthropic").bound(CLAUDE, prompt, completion)
    assert openai is not None
    assert claude is not None
    assert claude > openai
    async with open_fake_llm() as server:
        endpoints = [
            Endpoint(server.base_url, name="openai"),
            Endpoint(server.root_url, name="claude", provider="anthropic", model=CLAUDE),
        ]
        async with trio_llm.open_client(endpoints=endpoints, model=MODEL) as client:
            budget = Budget.for_client(1.0, client)
            budget.check_prices({""})
            assert budget.reserve(body) == claude
        endpoints[1] = Endpoint(server.root_url, name="claude", provider="anthropic", model="x")
        async with trio_llm.open_client(endpoints=endpoints, model=MODEL) as client:
            with pytest.raises(ConfigurationError, match=r"'x' has none .* anthropic price"):
                Budget.for_client(1.0, client).check_prices({""})
