"""What calls cost: genai-prices' list prices, overrides, unknown models, statistics."""

from __future__ import annotations

import json
import logging
import random
import re
import sys
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx2
import pytest
import trio

import trio_llm
from trio_llm._cost import Pricer, format_usd, parse_price
from trio_llm.testing import FakeLLMServer, open_fake_llm

genai_prices = pytest.importorskip("genai_prices")
MESSAGES = [{"role": "user", "content": "Hello?"}]
from genai_prices import data_snapshot  # noqa: E402
from genai_prices import types as table  # noqa: E402


def table_cost(
    provider: str,
    model: str,
    *,
    prompt: int,
    completion: int,
    cache_read: int = 0,
    cache_write: int = 0,
    batch: bool = False,
) -> float:
    """genai-prices' own price for that usage, as a float (what reply.cost must equal)."""
    usage = genai_prices.Usage(
        input_tokens=prompt,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        output_tokens=completion,
    )
    context = {"processing": "batch"} if batch else None
    result = genai_prices.calc_price(usage, model, provider_id=provider, price_context=context)
    return float(result.total_price)


def models_of(provider: str) -> list[str]:
    providers = data_snapshot.get_snapshot().providers
    (found,) = [p for p in providers if p.id == provider]
    return [model.id for model in found.models]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_every_model_costs_what_genai_prices_says(provider: str) -> None:
    """For every OpenAI and Anthropic model of the table, random usages cost exactly its price."""
    pricer = Pricer(provider)
    rng = random.Random(21)
    for model in models_of(provider):
        for _ in range(4):
            prompt = rng.choice([0, 1, 17, 1_000, 150_000, 250_000])
            cache_read = rng.randint(0, prompt // 2)
            cache_write = rng.randint(0, (prompt - cache_read) // 2)
            completion = rng.choice([0, 1, 600, 9_000])
            if not prompt and not completion:
                completion = 5
            usage = trio_llm.Usage(
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                cache_read_tokens=cache_read,
                cache_write_tokens=cache_write,
            )
            try:
                expected: float | None = table_cost(
                    provider,
                    model,
                    prompt=prompt,
                    completion=completion,
                    cache_read=cache_read,
                    cache_write=cache_write,
                )
            except LookupError:  # an id its own matching does not find ("ft:gpt-4o")
                expected = None
            assert pricer.cost(usage, model) == expected, (model, usage)


def test_batch_prices_are_the_tables_batch_variant() -> None:
    """batch=True prices a Batch API result at the table's batch price (half, for OpenAI)."""
    pricer = Pricer("openai")
    usage = trio_llm.Usage(prompt_tokens=1_000, completion_tokens=500, total_tokens=1_500)
    batch = pricer.cost(usage, "gpt-4o-mini", batch=True)
    assert batch == table_cost("openai", "gpt-4o-mini", prompt=1_000, completion=500, batch=True)
    normal = pricer.cost(usage, "gpt-4o-mini")
    assert batch is not None
    assert normal is not None
    assert batch == pytest.approx(normal / 2)


async def test_replies_and_streams_cost_the_list_price(fake_llm: FakeLLMServer) -> None:
    """A loopback server serving gpt-4o-mini is priced as OpenAI's gpt-4o-mini: chat, stream."""
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="gpt-4o-mini") as client:
        reply = await client.chat("What does a river carry?")
        async with client.stream("What does a river carry?") as stream:
            async for _ in stream:
                pass
        vectors = await client.embed(["a", "b c"], model="text-embedding-3-small")
        stats = client.statistics()
    usage = reply.usage
    expected = table_cost(
        "openai", "gpt-4o-mini", prompt=usage.prompt_tokens, completion=usage.completion_tokens
    )
    assert reply.cost == expected > 0
    assert stream.response.cost == expected  # the same question, the same answer
    assert vectors.cost == table_cost(
        "openai",
        "text-embedding-3-small",
        prompt=vectors.usage.prompt_tokens,
        completion=0,
    )
    assert stats.cost == pytest.approx(2 * expected + vectors.cost)
    assert stats.unpriced == 0


async def test_anthropic_replies_cost_anthropic_prices() -> None:
    """The Anthropic provider is priced from Anthropic's table (claude-sonnet-4-5)."""
    async with (
        open_fake_llm() as server,
        trio_llm.open_client(
            base_url=server.root_url, provider="anthropic", model="claude-sonnet-4-5"
        ) as client,
    ):
        reply = await client.chat("Hello?")
        async with client.stream("Hello?") as stream:
            async for _ in stream:
                pass
    expected = table_cost(
        "anthropic",
        "claude-sonnet-4-5",
        prompt=reply.usage.prompt_tokens,
        completion=reply.usage.completion_tokens,
    )
    assert reply.cost == expected > 0
    assert stream.response.cost == expected


def test_anthropic_cache_tokens_are_priced_as_such() -> None:
    """Anthropic's cache reads and writes are parsed and priced at their own rates."""
    from trio_llm.providers._anthropic import AnthropicProvider

    payload = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 100,
            "cache_read_input_tokens": 4_000,
            "cache_creation_input_tokens": 2_000,
            "output_tokens": 50,
        },
    }
    reply = AnthropicProvider().parse_chat(payload, None)
    assert reply.usage == trio_llm.Usage(
        prompt_tokens=6_100,
        completion_tokens=50,
        total_tokens=6_150,
        cache_read_tokens=4_000,
        cache_write_tokens=2_000,
    )
    cost = Pricer("anthropic").cost(reply.usage, reply.model)
    assert cost == table_cost(
        "anthropic",
        "claude-sonnet-4-5",
        prompt=6_100,
        completion=50,
        cache_read=4_000,
        cache_write=2_000,
    )
    plain = table_cost("anthropic", "claude-sonnet-4-5", prompt=6_100, completion=50)
    assert cost != plain


async def test_openai_cached_tokens_cost_less() -> None:
    """OpenAI's prompt_tokens_details.cached_tokens are read and priced at the cached rate."""
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": 2_000,
            "completion_tokens": 10,
            "total_tokens": 2_010,
            "prompt_tokens_details": {"cached_tokens": 1_536},
        },
    }
    transport = httpx2.MockTransport(lambda _request: httpx2.Response(200, json=body))
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1", model="gpt-4o-mini", transport=transport
    ) as client:
        reply = await client.chat("hi")
    assert reply.usage.cache_read_tokens == 1_536
    assert reply.cost == table_cost(
        "openai", "gpt-4o-mini", prompt=2_000, completion=10, cache_read=1_536
    )
    assert reply.cost < table_cost("openai", "gpt-4o-mini", prompt=2_000, completion=10)


async def test_unknown_model_has_no_cost_and_is_said_once(
    fake_llm: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A model with no price costs None, said once on trio_llm.cost; the total is None too."""
    caplog.set_level(logging.WARNING, logger="trio_llm.cost")
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="my-llama") as client:
        replies = [await client.chat(f"Question {i}?") for i in range(3)]
        known = await client.chat("Known?", model="gpt-4o-mini")
        stats = client.statistics()
    assert [reply.cost for reply in replies] == [None, None, None]
    assert known.cost is not None
    assert stats.cost is None
    assert stats.unpriced == 3
    said = [r for r in caplog.records if r.name == "trio_llm.cost"]
    assert len(said) == 1
    assert "'my-llama'" in said[0].getMessage()
    assert "prices=" in said[0].getMessage()


async def test_one_override_prices_every_model(fake_llm: FakeLLMServer) -> None:
    """open_client(prices=Price(...)) prices every model, the table's included."""
    price = trio_llm.Price(input=0.15, output=0.60)
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="my-llama", prices=price
    ) as client:
        reply = await client.chat("Hello?")
        listed = await client.chat("Hello?", model="gpt-4o")
        stats = client.statistics()
    usage = reply.usage
    expected = (usage.prompt_tokens * 0.15 + usage.completion_tokens * 0.60) / 1e6
    assert reply.cost == pytest.approx(expected, rel=1e-12)
    assert listed.cost == pytest.approx(expected, rel=1e-12)  # not gpt-4o's list price
    assert stats.cost == pytest.approx(2 * expected)
    assert stats.unpriced == 0


async def test_per_model_overrides_leave_the_others_to_the_table(
    fake_llm: FakeLLMServer,
) -> None:
    """A mapping prices the models it names; other models keep their list price."""
    prices = {"my-llama": trio_llm.Price(input=1.0, output=2.0)}
    async with trio_llm.open_client(
        base_url=fake_llm.base_url, model="my-llama", prices=prices
    ) as client:
        own = await client.chat("Hi")
        listed = await client.chat("Hi", model="gpt-4o-mini")
    assert own.cost == pytest.approx(
        (own.usage.prompt_tokens * 1.0 + own.usage.completion_tokens * 2.0) / 1e6
    )
    usage = listed.usage
    assert listed.cost == table_cost(
        "openai", "gpt-4o-mini", prompt=usage.prompt_tokens, completion=usage.completion_tokens
    )


def test_override_cache_rates() -> None:
    """cached_input and cache_write price those tokens; by default they cost as input."""
    usage = trio_llm.Usage(
        prompt_tokens=1_000_000,
        completion_tokens=0,
        total_tokens=1_000_000,
        cache_read_tokens=400_000,
        cache_write_tokens=100_000,
    )
    plain = Pricer("openai", trio_llm.Price(input=1.0, output=0.0))
    assert plain.cost(usage, "m") == 1.0
    cached = Pricer("openai", trio_llm.Price(input=1.0, output=0, cached_input=0.1, cache_write=2))
    assert cached.cost(usage, "m") == pytest.approx(0.5 + 0.04 + 0.2)


def test_bad_prices_are_refused() -> None:
    """Negative, infinite or misplaced prices are a one-line error naming the field."""
    with pytest.raises(ValueError, match="output must be a number of USD >= 0"):
        trio_llm.Price(input=1, output=-1)
    with pytest.raises(ValueError, match="cached_input"):
        trio_llm.Price(input=1, output=1, cached_input=float("inf"))
    with pytest.raises(trio_llm.ConfigurationError, match="mapping of model names"):
        Pricer("openai", [trio_llm.Price(input=1, output=1)])  # type: ignore[arg-type]
    with pytest.raises(trio_llm.ConfigurationError, match="must map model names"):
        Pricer("openai", {"m": 0.5})  # type: ignore[dict-item]


def test_parse_price() -> None:
    """--price takes input= and output= (USD per million tokens), and model= to name one."""
    assert parse_price("input=0.15,output=0.60") == (
        None,
        trio_llm.Price(input=0.15, output=0.6),
    )
    assert parse_price("model=llama, input=0, output=0, cached_input=0") == (
        "llama",
        trio_llm.Price(input=0, output=0, cached_input=0),
    )
    for text, message in [
        ("input=1", "output missing"),
        ("output=1", "input missing"),
        ("input=1,output=x", "output: expected a number"),
        ("input=1,output=2,colour=3", "unknown key 'colour'"),
        ("input=1,input=2,output=1", "input given twice"),
        ("input 1", "expected KEY=VALUE"),
        ("input=-1,output=1", "input must be a number of USD >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_price(text)


def test_format_usd() -> None:
    """Amounts are shown with the precision that says something at their size."""
    assert format_usd(0) == "$0"
    assert format_usd(0.000435) == "$0.000435"
    assert format_usd(0.01234) == "$0.0123"
    assert format_usd(1234.5) == "$1,234.50"


def test_no_usage_no_cost(caplog: pytest.LogCaptureFixture) -> None:
    """A reply that reports no tokens, or impossible ones, has no cost (said once each)."""
    caplog.set_level(logging.WARNING, logger="trio_llm.cost")
    pricer = Pricer("openai")
    assert pricer.cost(trio_llm.Usage(), "gpt-4o-mini") is None
    assert pricer.cost(trio_llm.Usage(), "gpt-4o-mini") is None
    odd = trio_llm.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2, cache_read_tokens=5)
    assert pricer.cost(odd, "gpt-4o-mini") is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "no token usage" in messages[0]
    assert "more cached prompt tokens" in messages[1]


def test_request_model_prices_a_reply_naming_an_unknown_one() -> None:
    """A reply naming a model the table lacks is priced by the model the request named."""
    usage = trio_llm.Usage(prompt_tokens=10, completion_tokens=10, total_tokens=20)
    pricer = Pricer("openai")
    assert pricer.cost(usage, "proxy-name-for-it", "gpt-4o-mini") == table_cost(
        "openai", "gpt-4o-mini", prompt=10, completion=10
    )
    assert pricer.cost(usage, "", "gpt-4o-mini") is not None
    assert pricer.cost(usage, "", None) is None


def test_bound_is_never_below_the_cost() -> None:
    """A request's bound covers any split of its prompt between cache reads and writes."""
    rng = random.Random(5)
    for provider in ("openai", "anthropic"):
        pricer = Pricer(provider)
        for model in [m for m in models_of(provider) if pricer.knows(m)]:
            prompt, completion = rng.choice([(10, 10), (3_000, 500), (260_000, 4_000)])
            bound = pricer.bound(model, prompt, completion)
            assert bound is not None
            for read, write in [(0, 0), (prompt, 0), (0, prompt), (prompt // 3, prompt // 3)]:
                usage = trio_llm.Usage(
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    total_tokens=prompt + completion,
                    cache_read_tokens=read,
                    cache_write_tokens=write,
                )
                cost = pricer.cost(usage, model)
                assert cost is not None
                assert cost <= bound, (model, usage)
    assert Pricer("openai").bound("my-llama", 10, 10) is None
    assert Pricer("openai").knows("gpt-4o-mini")
    assert not Pricer("openai").knows("my-llama")


def test_without_genai_prices_only_overrides_price(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where genai-prices cannot be installed (Python 3.10), overrides still price calls."""
    monkeypatch.setitem(sys.modules, "genai_prices", None)  # import genai_prices fails
    caplog.set_level(logging.WARNING, logger="trio_llm.cost")
    usage = trio_llm.Usage(prompt_tokens=10, completion_tokens=10, total_tokens=20)
    assert Pricer("openai").cost(usage, "gpt-4o-mini") is None
    assert "genai-prices is not installed" in caplog.text
    assert Pricer("openai", {"gpt-4o-mini": trio_llm.Price(input=1, output=1)}).cost(
        usage, "gpt-4o-mini"
    ) == pytest.approx(20 / 1e6)


def _snapshot_with(model: table.ModelInfo) -> Any:
    provider = table.Provider(
        id="openai", name="OpenAI", api_pattern="https://api.openai.com", models=[model]
    )
    return data_snapshot.DataSnapshot(providers=[provider], from_auto_update=False)


def test_a_new_price_takes_effect_on_its_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """A price the table announces for a later date is used from that date on."""
    tomorrow = datetime.now(tz=timezone.utc).date() + timedelta(days=1)
    model = table.ModelInfo(
        id="dated",
        match=table.ClauseEquals(equals="dated"),
        prices=[
            table.ConditionalPrice(
                prices=table.ModelPrice(input_mtok=Decimal(1), output_mtok=Decimal(1))
            ),
            table.ConditionalPrice(
                constraint=table.StartDateConstraint(start_date=tomorrow),
                prices=table.ModelPrice(input_mtok=Decimal(2), output_mtok=Decimal(2)),
            ),
        ],
    )
    monkeypatch.setattr(data_snapshot, "_custom_snapshot", _snapshot_with(model))
    usage = trio_llm.Usage(prompt_tokens=500_000, completion_tokens=500_000, total_tokens=10**6)
    pricer = Pricer("openai")
    assert pricer.cost(usage, "dated") == 1.0
    later = datetime.combine(tomorrow, time(1), tzinfo=timezone.utc).timestamp()
    monkeypatch.setattr("trio_llm._cost.time.time", lambda: later)

    class Tomorrow(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Tomorrow:
            return cls.fromtimestamp(later, tz)

    monkeypatch.setattr("trio_llm._cost.datetime", Tomorrow)
    assert pricer.cost(usage, "dated") == 2.0


def test_prices_by_time_of_day_ask_the_table_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off-peak prices (by time of day) are looked up for each reply, never kept."""
    model = table.ModelInfo(
        id="offpeak",
        match=table.ClauseEquals(equals="offpeak"),
        prices=[
            table.ConditionalPrice(
                prices=table.ModelPrice(input_mtok=Decimal(1), output_mtok=Decimal(1))
            ),
            table.ConditionalPrice(
                constraint=table.TimeOfDateConstraint(start_time=time(0), end_time=time(12)),
                prices=table.ModelPrice(input_mtok=Decimal(3), output_mtok=Decimal(3)),
            ),
        ],
    )
    monkeypatch.setattr(data_snapshot, "_custom_snapshot", _snapshot_with(model))
    usage = trio_llm.Usage(prompt_tokens=500_000, completion_tokens=500_000, total_tokens=10**6)
    pricer = Pricer("openai")
    hour = [1]

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Clock:
            return cls.combine(date(2025, 1, 1), time(hour[0]), tzinfo=timezone.utc)

    monkeypatch.setattr("trio_llm._cost.datetime", Clock)
    assert pricer.cost(usage, "offpeak") == 3.0
    hour[0] = 13
    assert pricer.cost(usage, "offpeak") == 1.0


async def test_stream_many_and_chat_many_count_into_the_total(fake_llm: FakeLLMServer) -> None:
    """Every successful call adds its cost to statistics().cost, whatever the method."""
    prompts = [f"Item {i}" for i in range(5)]
    async with trio_llm.open_client(base_url=fake_llm.base_url, model="gpt-4o-mini") as client:
        results = await client.chat_many(prompts)
        async with client.stream_many(prompts) as streams:
            async for _ in streams:
                pass
        stats = client.statistics()
    costs = [r.unwrap().cost for r in results] + [r.unwrap().cost for r in streams.results]
    assert all(cost is not None for cost in costs)
    assert stats.cost == pytest.approx(sum(c for c in costs if c is not None))
    await trio.lowlevel.checkpoint()


def test_chat_json_says_what_the_reply_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """`trio-llm chat --json` adds "cost": USD, or null for a model with no price."""
    from trio_llm._cli import main

    assert main(["chat", "--simulate", "--json", "Hi"]) == 0  # gpt-4o-mini by default
    reply = json.loads(capsys.readouterr().out)
    usage = reply["usage"]
    assert reply["cost"] == table_cost(
        "openai",
        "gpt-4o-mini",
        prompt=usage["prompt_tokens"],
        completion=usage["completion_tokens"],
    )
    assert main(["chat", "--simulate", "--json", "--model", "my-llama", "Hi"]) == 0
    assert json.loads(capsys.readouterr().out)["cost"] is None
    argv = ["chat", "--simulate", "--json", "--model", "my-llama", "--price", "input=1,output=1"]
    assert main([*argv, "Hi"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["cost"] == pytest.approx(reply["usage"]["total_tokens"] / 1e6)
    argv = [*argv[:-1], "model=my-llama,input=2,output=2", "Hi"]
    assert main(argv) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["cost"] == pytest.approx(2 * reply["usage"]["total_tokens"] / 1e6)


async def test_gateway_metrics_show_the_cost() -> None:
    """/metrics has the upstream cost in USD, and the count of replies with no price."""
    from test_serve import open_gateway, open_http

    options = {"prices": trio_llm.Price(input=1.0, output=2.0)}
    async with open_gateway(client_options=options) as gateway, open_http(gateway) as http:
        reply = (await http.post("/v1/chat/completions", json={"messages": MESSAGES})).json()
        text = (await http.get("/metrics")).text
    usage = reply["usage"]
    cost = (usage["prompt_tokens"] + 2 * usage["completion_tokens"]) / 1e6
    match = re.search(r"^trio_llm_client_cost_usd_total (\S+)$", text, re.M)
    assert match is not None
    assert float(match[1]) == pytest.approx(cost)
    assert "trio_llm_client_unpriced_total 0\n" in text
    async with open_gateway() as gateway, open_http(gateway) as http:  # fake-gpt: no price
        await http.post("/v1/chat/completions", json={"messages": MESSAGES})
        text = (await http.get("/metrics")).text
    assert "trio_llm_client_cost_usd_total" not in text  # absent, never a guess
    assert "trio_llm_client_unpriced_total 1\n" in text


def test_the_progress_bar_shows_the_cost_and_budget() -> None:
    """The bar's cost column says what was spent, and of which budget."""
    from trio_llm.batch._progress import Snapshot
    from trio_llm.batch._terminal import bar_cells

    common: dict[str, Any] = {
        "done": 1,
        "total": 2,
        "rate": 1.0,
        "eta": 1.0,
        "failed": 0,
        "retries": 0,
        "rate_limited": 0,
        "tokens": 5,
        "in_flight": 1,
    }
    cells = bar_cells(Snapshot(**common, cost=0.0123, max_cost=5.0))
    assert cells["cost"].plain == "• cost $0.0123 of $5.00"
    assert bar_cells(Snapshot(**common, cost=0.0123))["cost"].plain == "• cost $0.0123"
    assert "cost" not in bar_cells(Snapshot(**common, cost=None))
    assert "cost" not in bar_cells(Snapshot(**common, cost=0.0))


async def test_negative_token_counts_are_malformed_not_a_refund() -> None:
    """A reply reporting negative token counts costs nothing negative and settles its limit.

    A negative count is malformed, read as missing (0): it must not make a reply's cost
    negative (which would lower a batch's spend below what it paid) nor break the call
    while its rate-limit reservation is reconciled.
    """
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": -1_000_000,
            "total_tokens": -999_900,
            "prompt_tokens_details": {"cached_tokens": -50},
        },
    }
    transport = httpx2.MockTransport(lambda _request: httpx2.Response(200, json=body))
    async with trio_llm.open_client(
        base_url="http://127.0.0.1:9/v1",
        model="gpt-4o-mini",
        transport=transport,
        rate_limit=trio_llm.RateLimit(tokens_per_minute=100_000),
    ) as client:
        reply = await client.chat("hi")
        assert reply.usage == trio_llm.Usage(prompt_tokens=100, total_tokens=100)
        assert reply.cost == table_cost("openai", "gpt-4o-mini", prompt=100, completion=0)
        assert client.statistics().cost == reply.cost
