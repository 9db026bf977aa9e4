"""What a call costs: list prices from genai-prices, per-client overrides, USD per reply.

A reply is priced by its provider and model name with `genai-prices
<https://github.com/pydantic/genai-prices>`_ (pydantic's maintained table, as pydantic-ai
uses it), whatever server answered: a fake server or a proxy on a loopback address that
serves ``gpt-4o-mini`` is priced as OpenAI's ``gpt-4o-mini``. :class:`Price` overrides the
table for a client (self-hosted or unlisted models). A model with no price has no cost
(``None``), said once per client on the ``trio_llm.cost`` logger, never guessed.

The table is read once per model, not per reply: genai-prices takes ~0.1 ms a call, as much
as the rest of a request. Its price for one token of each kind (prompt, cache read, cache
write, completion) and the fixed part are measured with genai-prices itself, and a reply's
cost is then that linear sum, computed with the same decimal arithmetic, so it is exactly
genai-prices' own result. Where the sum is not linear (tiered prices beyond their first
threshold, prices by time of day) every reply goes to genai-prices itself. The first price
looked up in a process loads the table (~0.2 s, once).

Batch prices: the table holds a provider's Batch API price as a variant; ``batch=True``
selects it (``Pricer.cost``). Overrides have no batch variant.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Final, final

import attrs

from ._errors import ConfigurationError
from ._types import Usage

__all__ = ["Price", "Pricer", "format_usd", "parse_price"]

logger = logging.getLogger("trio_llm.cost")

_MILLION: Final = Decimal(1_000_000)
#: The genai-prices context selecting a provider's Batch API price.
_BATCH_CONTEXT: Final = {"processing": "batch"}


def _usd_per_million(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None and attribute.name not in ("input", "output"):
        return
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{attribute.name} must be a number of USD >= 0, not {value!r}")


@final
@attrs.frozen(kw_only=True)
class Price:
    """A model's price in USD per million tokens, for ``open_client(prices=...)``.

    Attributes:
        input: per million prompt tokens.
        output: per million completion tokens.
        cached_input: per million prompt tokens read from the provider's prompt cache
            (default: ``input``).
        cache_write: per million prompt tokens written to the prompt cache (default:
            ``input``).
    """

    input: float = attrs.field(validator=_usd_per_million)
    output: float = attrs.field(validator=_usd_per_million)
    cached_input: float | None = attrs.field(default=None, validator=_usd_per_million)
    cache_write: float | None = attrs.field(default=None, validator=_usd_per_million)


#: What ``open_client(prices=...)`` takes: one price for every model, or one per model name.
Prices = Price | Mapping[str, Price]

_PRICE_KEYS: Final = ("input", "output", "cached_input", "cache_write")


def parse_price(text: str) -> tuple[str | None, Price]:
    """Parse ``[model=NAME,]input=X,output=Y[,cached_input=Z][,cache_write=W]``.

    USD per million tokens. Returns the model it applies to (``None``: every model) and
    its :class:`Price`.

    Raises:
        ValueError: saying what is wrong, in one line.
    """
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, equals, value = part.partition("=")
        key = key.strip()
        if not equals or not key or not value.strip():
            raise ValueError(f"expected KEY=VALUE pairs separated by commas, got {part!r}")
        if key != "model" and key not in _PRICE_KEYS:
            known = ", ".join(("model", *_PRICE_KEYS))
            raise ValueError(f"unknown key {key!r} (known: {known})")
        if key in fields:
            raise ValueError(f"{key} given twice")
        fields[key] = value.strip()
    model = fields.pop("model", None)
    missing = [key for key in ("input", "output") if key not in fields]
    if missing:
        raise ValueError(f"{' and '.join(missing)} missing (USD per million tokens)")
    numbers: dict[str, float] = {}
    for key, value in fields.items():
        try:
            numbers[key] = float(value)
        except ValueError:
            raise ValueError(f"{key}: expected a number of USD, got {value!r}") from None
    return model, Price(**numbers)


def format_usd(usd: float) -> str:
    """Format an amount of USD for people: ``$0.000435``, ``$0.0123``, ``$12.34``."""
    if usd == 0:
        return "$0"
    if usd < 0.01:
        return f"${usd:.6f}"
    if usd < 1:
        return f"${usd:.4f}"
    return f"${usd:,.2f}"


@final
class _Rate:
    """A model's price as a linear sum: a fixed part plus a price per token of each kind.

    ``cost = fixed + prompt * p + cache_read * r + cache_write * w + completion * c``, in
    USD, where ``r`` and ``w`` are what a cached token costs more (or less) than a plain
    prompt token. Valid for prompts of at most ``linear_until`` tokens; beyond, ``exact``
    prices the usage (genai-prices itself). ``expires`` is the wall-clock time a new
    price of the table takes effect (``None``: none announced).
    """

    __slots__ = (
        "cache_read",
        "cache_write",
        "completion",
        "exact",
        "expires",
        "fixed",
        "linear_until",
        "prompt",
    )

    def __init__(
        self,
        *,
        fixed: Decimal,
        prompt: Decimal,
        cache_read: Decimal,
        cache_write: Decimal,
        completion: Decimal,
        linear_until: float = math.inf,
        exact: Callable[[int, int, int, int], Decimal] | None = None,
        expires: float | None = None,
    ) -> None:
        self.fixed = fixed
        self.prompt = prompt
        self.cache_read = cache_read
        self.cache_write = cache_write
        self.completion = completion
        self.linear_until = linear_until
        self.exact = exact
        self.expires = expires

    def cost(self, prompt: int, cache_read: int, cache_write: int, completion: int) -> Decimal:
        """Return the cost of a reply's tokens (the cached ones are part of ``prompt``)."""
        if prompt > self.linear_until and self.exact is not None:
            return self.exact(prompt, cache_read, cache_write, completion)
        return (
            self.fixed
            + self.prompt * prompt
            + self.cache_read * cache_read
            + self.cache_write * cache_write
            + self.completion * completion
        )

    def bound(self, prompt: int, completion: int) -> Decimal:
        """Return the most ``prompt`` and ``completion`` tokens can cost.

        Every prompt token is priced at the dearer of a plain prompt token and a cache
        write (Anthropic's cache writes cost more than plain input).
        """
        if prompt > self.linear_until and self.exact is not None:
            return max(
                self.exact(prompt, 0, 0, completion), self.exact(prompt, 0, prompt, completion)
            )
        per_prompt_token = self.prompt + max(self.cache_write, Decimal(0))
        return self.fixed + per_prompt_token * prompt + self.completion * completion


def _override_rate(price: Price) -> _Rate:
    def per_token(usd: float) -> Decimal:
        return Decimal(repr(float(usd))) / _MILLION

    prompt = per_token(price.input)
    cached = prompt if price.cached_input is None else per_token(price.cached_input)
    write = prompt if price.cache_write is None else per_token(price.cache_write)
    return _Rate(
        fixed=Decimal(0),
        prompt=prompt,
        cache_read=cached - prompt,
        cache_write=write - prompt,
        completion=per_token(price.output),
    )


def _table_rate(provider: str, model: str, *, batch: bool) -> _Rate | None:
    """Read ``model``'s price from genai-prices (``None``: it has none for ``provider``)."""
    from genai_prices import Usage as TableUsage
    from genai_prices import data_snapshot
    from genai_prices import types as table

    try:
        found, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
    except LookupError:
        return None
    context = _BATCH_CONTEXT if batch else None
    now = datetime.now(tz=timezone.utc)

    def at(
        prompt: int, cache_read: int, cache_write: int, completion: int, when: datetime = now
    ) -> Decimal:
        usage = TableUsage(
            input_tokens=prompt,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            output_tokens=completion,
        )
        calculation = info.calc_price(
            usage, found, genai_request_timestamp=when, price_context=context
        )
        total: Decimal = calculation.total_price
        return total

    def exact(prompt: int, cache_read: int, cache_write: int, completion: int) -> Decimal:
        return at(prompt, cache_read, cache_write, completion, datetime.now(tz=timezone.utc))

    conditions = list(info.prices) if isinstance(info.prices, list) else []
    constraints = [c.constraint for c in conditions] + [
        variant.constraint for variant in info.price_variants or ()
    ]
    by_time_of_day = any(isinstance(c, table.TimeOfDateConstraint) for c in constraints)
    starts = [
        datetime.combine(c.start_date, datetime.min.time(), tzinfo=timezone.utc).timestamp()
        for c in constraints
        if isinstance(c, table.StartDateConstraint)
    ]
    upcoming = [start for start in starts if start > now.timestamp()]
    prices = info.get_prices(now, context)
    thresholds = [
        tier.start
        for value in vars(prices).values()
        if isinstance(value, table.TieredPrices)
        for tier in value.tiers
    ]
    linear_until: float = -1 if by_time_of_day else min(thresholds, default=math.inf)
    fixed = at(0, 0, 0, 0)
    prompt = at(1, 0, 0, 0) - fixed if linear_until >= 1 else Decimal(0)
    return _Rate(
        fixed=fixed,
        prompt=prompt,
        cache_read=at(1, 1, 0, 0) - fixed - prompt if linear_until >= 1 else Decimal(0),
        cache_write=at(1, 0, 1, 0) - fixed - prompt if linear_until >= 1 else Decimal(0),
        completion=at(0, 0, 0, 1) - fixed,
        linear_until=linear_until,
        exact=exact,
        expires=min(upcoming, default=None),
    )


# A model with no price, cached as such.
_UNPRICED: Final = _Rate(
    fixed=Decimal(0),
    prompt=Decimal(0),
    cache_read=Decimal(0),
    cache_write=Decimal(0),
    completion=Decimal(0),
)


@final
class Pricer:
    """One client's prices: its overrides, then genai-prices' table for its provider.

    Each model's price is looked up once and kept; a model with none is said once (a
    warning on the ``trio_llm.cost`` logger) and has no cost.
    """

    __slots__ = (
        "_batch_rates",
        "_default",
        "_no_table",
        "_overrides",
        "_rates",
        "_said",
        "provider",
    )

    def __init__(self, provider: str, prices: Prices | None = None) -> None:
        """Price calls to ``provider`` (genai-prices' id: ``openai``, ``anthropic``).

        Raises:
            ConfigurationError: ``prices`` is neither a :class:`Price` nor a mapping of
                model names to prices.
        """
        self.provider = provider
        self._default: _Rate | None = None
        self._overrides: dict[str, _Rate] = {}
        if isinstance(prices, Price):
            self._default = _override_rate(prices)
        elif isinstance(prices, Mapping):
            for model, price in prices.items():
                if not isinstance(model, str) or not isinstance(price, Price):
                    raise ConfigurationError(
                        f"prices must map model names to trio_llm.Price, not {model!r}: {price!r}"
                    )
                self._overrides[model] = _override_rate(price)
        elif prices is not None:
            raise ConfigurationError(
                f"prices must be a trio_llm.Price or a mapping of model names to them, "
                f"not {prices!r}"
            )
        self._rates: dict[str, _Rate] = {}
        self._batch_rates: dict[str, _Rate] = {}
        self._said: set[object] = set()
        self._no_table = False

    def _rate(self, model: str, batch: bool) -> _Rate:
        rates = self._batch_rates if batch else self._rates
        rate = rates.get(model)
        if rate is None or (rate.expires is not None and time.time() >= rate.expires):
            rate = self._overrides.get(model) or self._default
            if rate is None:
                try:
                    rate = _table_rate(self.provider, model, batch=batch) or _UNPRICED
                except ImportError:  # Python 3.10: genai-prices needs 3.11
                    self._no_table = True
                    rate = _UNPRICED
            rates[model] = rate
        return rate

    def knows(self, model: str, *, batch: bool = False) -> bool:
        """Whether ``model`` has a price (an override, or genai-prices')."""
        return self._rate(model, batch) is not _UNPRICED

    def cost(
        self, usage: Usage, model: str, request_model: str | None = None, *, batch: bool = False
    ) -> float | None:
        """Return what a reply cost in USD, or ``None`` when that is unknown.

        Args:
            usage: the reply's token counts (a reply that reports none has no cost).
            model: the model named by the reply.
            request_model: the model the request named, priced when ``model`` has no
                price (a proxy may name its model its own way).
            batch: price as a provider's Batch API result (the table's batch price).
        """
        rate = self._rate(model, batch) if model else _UNPRICED
        if rate is _UNPRICED and request_model and request_model != model:
            rate = self._rate(request_model, batch)
        prompt = usage.prompt_tokens
        read = usage.cache_read_tokens
        write = usage.cache_write_tokens
        if rate is _UNPRICED or not (prompt or usage.completion_tokens) or read + write > prompt:
            self._say_unpriced(usage, model, request_model)
            return None
        return float(rate.cost(prompt, read, write, usage.completion_tokens))

    def bound(
        self, model: str, prompt_tokens: int, completion_tokens: int, *, batch: bool = False
    ) -> float | None:
        """Return the most a request of that many tokens can cost (``None``: no price)."""
        rate = self._rate(model, batch)
        if rate is _UNPRICED:
            return None
        return float(rate.bound(prompt_tokens, completion_tokens))

    def _say_unpriced(self, usage: Usage, model: str, request_model: str | None) -> None:
        named = (model, None if request_model == model else request_model)
        if named in self._said:
            return  # the common case, on every reply of an unpriced model: said already
        if not (usage.prompt_tokens or usage.completion_tokens):
            key: object = "no usage"
            message = "a reply reported no token usage: its cost is unknown (None)"
        elif usage.cache_read_tokens + usage.cache_write_tokens > usage.prompt_tokens:
            key = "bad usage"
            message = (
                f"a reply's usage counts more cached prompt tokens than prompt tokens "
                f"({usage!r}): its cost is unknown (None)"
            )
        else:
            key = named
            names = " or ".join(
                repr(name) for name in dict.fromkeys((model, request_model)) if name
            )
            table = (
                "genai-prices is not installed (it needs Python >= 3.11)"
                if self._no_table
                else f"genai-prices' table has none for provider {self.provider!r}"
            )
            message = (
                f"no price for model {names or '(none named)'}: {table}; its cost is unknown "
                "(None); give it one with open_client(prices=...) or --price"
            )
        if key not in self._said:
            self._said.add(key)
            logger.warning("%s", message)
