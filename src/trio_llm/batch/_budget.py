"""A batch run's budget: ``max_cost`` USD, checked before each request is sent.

Before a line is sent, what the run has spent, plus the bounds of the requests in flight,
plus this request's bound must fit in the budget; otherwise the run starts no more
requests, lets those in flight finish, and stops (``BatchSummary.over_budget``). A request's
bound is the most its tokens can cost at the model's price (:meth:`Pricer.bound`): its
prompt counted as UTF-8 bytes (never fewer than its tokens), its completion as
``max_completion_tokens`` or ``max_tokens`` (times ``n``) or, when the line sets neither,
:data:`DEFAULT_COMPLETION_TOKENS`. With several endpoints, the bound is the largest of the
endpoints' (each priced by its provider, for the model it would be sent), wherever the
line goes. A reply replaces its bound with its real cost (``0.0`` from the response
cache); a failed line gives its bound back (an error reply is not billed).

So the spend stays within the budget whenever the bounds hold. They do not when a model
writes more than :data:`DEFAULT_COMPLETION_TOKENS` for a line that sets no limit (a
reasoning model may), when an image or document costs more than the 765 tokens assumed,
or when a request that timed out or lost its connection was billed all the same: each
such request can overshoot by what it cost beyond its bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, final

from .._cost import Pricer, format_usd
from .._errors import ConfigurationError
from .._estimate import token_bounds

if TYPE_CHECKING:
    from .._client import Client

__all__ = ["DEFAULT_COMPLETION_TOKENS", "Budget"]

#: Completion tokens a budget assumes for a line that sets no ``max_tokens``.
DEFAULT_COMPLETION_TOKENS: Final = 4096


@final
class Budget:
    """What a run may spend, has spent, and has committed to the requests in flight.

    Attributes:
        max_cost: the budget, in USD.
        spent: what this run's answers cost, in USD.
        in_flight: the bounds of the requests being sent, in USD.
        refused: the bound of the first request that did not fit (``None`` while all
            fit); from then on no request is sent.
    """

    __slots__ = ("_default_model", "_targets", "in_flight", "max_cost", "refused", "spent")

    def __init__(
        self,
        max_cost: float,
        targets: Sequence[tuple[Pricer, str | None]],
        default_model: str | None,
    ) -> None:
        """A budget of ``max_cost`` USD for lines sent to ``targets``.

        ``targets``: each endpoint's prices (its provider's) and its own model, if it
        names one (it then replaces the line's).
        """
        if not max_cost > 0:
            raise ValueError(f"max_cost must be a number of USD > 0, not {max_cost!r}")
        self.max_cost = max_cost
        self._targets = targets
        self._default_model = default_model
        self.spent = 0.0
        self.in_flight = 0.0
        self.refused: float | None = None

    def check_prices(self, models: set[str]) -> None:
        """Refuse to start when a model the run will call has no price.

        Args:
            models: the models the input's lines name (``""``: the client's default).

        Raises:
            ConfigurationError: naming the first model with no price.
        """
        for name in sorted(models):
            for pricer, own in self._targets:
                model = own or name or self._default_model or ""
                if not pricer.knows(model):
                    raise ConfigurationError(
                        f"--max-cost needs a price for every model, and {model!r} has none "
                        f"(genai-prices has no {pricer.provider} price for it): give it one "
                        "with --price input=USD,output=USD (per million tokens)"
                    )

    def reserve(self, body: Mapping[str, Any]) -> float | None:
        """Commit the bound of the request ``body`` if it fits; ``None`` if it does not.

        Once a request has not fitted, none does: the run stops starting requests.
        """
        if self.refused is not None:
            return None
        named = body.get("model") or self._default_model or ""
        prompt, completion = token_bounds(body, default_completion=DEFAULT_COMPLETION_TOKENS)
        bound = 0.0
        for pricer, own in self._targets:
            model = own or named
            found = pricer.bound(model, prompt, completion)
            if found is None:  # checked up front; a price cannot go missing since
                raise ConfigurationError(f"no price for model {model!r}")  # pragma: no cover
            bound = max(bound, found)
        if self.spent + self.in_flight + bound > self.max_cost:
            self.refused = bound
            return None
        self.in_flight += bound
        return bound

    def settle(self, bound: float, cost: float | None) -> None:
        """Replace a request's bound by what its reply cost (its bound, if unknown)."""
        self.in_flight -= bound
        self.spent += bound if cost is None else cost

    def release(self, bound: float) -> None:
        """Give back the bound of a request that failed (an error reply costs nothing)."""
        self.in_flight -= bound

    @classmethod
    def for_client(cls, max_cost: float, client: Client) -> Budget:
        """A budget for the lines ``client`` sends, to any of its endpoints."""
        requester = client._requester
        targets = [
            (requester.pricers[route.provider.name], route.model)
            for route in requester.router.routes
        ]
        return cls(max_cost, targets, client.model)

    def describe(self) -> str:
        """Say in one line what was spent, of what, and why the run stopped."""
        refused = (
            f"; the next request could cost up to {format_usd(self.refused)}"
            if (self.refused is not None)
            else ""
        )
        return f"spent {format_usd(self.spent)} of the {format_usd(self.max_cost)} budget{refused}"
