"""What the ``trio-llm`` commands share: exit codes, argument types, flags and the client.

The top-level command (``_cli.py``) and each command module (``batch/_command.py``,
``serve/_command.py``) import from here; this module imports none of them, so the
commands never import the module that assembles them.

Expected failures (a bad flag, a missing key, an address that cannot be bound) end as one
line on stderr and a documented exit status: usage errors through :class:`Parser`,
the rest as :class:`~trio_llm.ConfigurationError` or :class:`CommandError`, which the
top-level command prints.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import urlsplit

import attrs

from ._client import Client, open_client
from ._config import RetryPolicy
from ._cost import Price, Prices, parse_price
from ._endpoints import Endpoint, is_loopback, resolve_base_url
from ._errors import ConfigurationError, redact_url
from ._ratelimit import SHARED_SCHEMES, RateLimit
from .providers._registry import provider_named

if TYPE_CHECKING:
    from .testing import FakeLLMConfig

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODELS",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_OVER_BUDGET",
    "EXIT_USAGE",
    "CommandError",
    "Parser",
    "add_connection_options",
    "add_endpoints_option",
    "add_price_option",
    "add_shared_limit_options",
    "api_key_from_env",
    "cannot_listen",
    "cli_endpoints",
    "cli_prices",
    "non_negative_float",
    "open_cli_client",
    "port_number",
    "positive_float",
    "positive_int",
    "redis_url",
    "required_env",
    "shared_rate_limit",
    "variable_name",
    "whole_number",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
#: A batch run stopped on an error that would repeat (a 401, an unreachable server, a full
#: disk): completed lines are safe and the same command resumes once it is fixed.
EXIT_STOPPED: Final = 3
#: A batch run stopped at its budget (``--max-cost``): the lines not sent are left for a
#: rerun, which starts a new budget.
EXIT_OVER_BUDGET: Final = 4
EXIT_INTERRUPTED: Final = 130

DEFAULT_MODEL: Final = "gpt-4o-mini"
DEFAULT_MODELS: Final = {"openai": DEFAULT_MODEL, "anthropic": "claude-sonnet-4-5"}
# open_client's default: no limit of its own, the server's advertised limits adopted.
_ADAPTIVE_RATE_LIMIT: Final = RateLimit()


class CommandError(Exception):
    """An expected failure of a command, reported as one line: ``trio-llm CMD: error: ...``.

    Attributes:
        status: the exit status the command ends with.
    """

    def __init__(self, message: str, *, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, naming the program; status 2."""

    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the problem is the last thing printed
        # and stays visible; --help shows the usage.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def whole_number(minimum: int, *, note: str = "") -> Callable[[str], int]:
    """Return an argparse ``type=`` parsing a whole number >= ``minimum``.

    ``note`` follows the bound in the error message (e.g. ``" (0: never)"``).
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}{note}, got {value}")
        return value

    return parse


def _real_number(*, zero_allowed: bool) -> Callable[[str], float]:
    """Return an argparse ``type=`` parsing a number >= 0 or > 0 (NaN refused)."""
    bound = ">= 0" if zero_allowed else "> 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value >= 0 if zero_allowed else value > 0):
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text}")
        return value

    return parse


#: Parse a whole number >= 1 (an argparse ``type=``).
positive_int = whole_number(1)
#: Parse a number >= 0, NaN refused (an argparse ``type=``).
non_negative_float = _real_number(zero_allowed=True)
#: Parse a number > 0, NaN refused (an argparse ``type=``).
positive_float = _real_number(zero_allowed=False)


def port_number(text: str) -> int:
    """Parse a TCP port, 0 to 65535; 0 asks for any free port (an argparse ``type=``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port from 0 to 65535 (0 picks a free one), got {value}"
        )
    return value


def variable_name(text: str) -> str:
    """Parse the name of an environment variable (an argparse ``type=``)."""
    if not text:
        raise argparse.ArgumentTypeError("expected the name of an environment variable")
    return text


def redis_url(text: str) -> str:
    """Parse the URL of a Redis (or Valkey) server (an argparse ``type=``)."""
    if text.partition("://")[0] not in SHARED_SCHEMES:
        raise argparse.ArgumentTypeError(
            f"expected a redis://, rediss:// or unix:// URL, got {redact_url(text)!r}"
        )
    return text


def add_shared_limit_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--redis`` and ``--limit-name`` (read by :func:`shared_rate_limit`)."""
    group = parser.add_argument_group("shared limits (several processes or machines)")
    group.add_argument(
        "--redis",
        metavar="URL",
        type=redis_url,
        help="share the rate limits (and the pause after a 429) through this Redis, e.g. "
        "redis://host:6379/0: --rpm and --tpm are then the totals of every process using "
        "the same key, not each one's (needs the redis extra)",
    )
    group.add_argument(
        "--limit-name",
        metavar="NAME",
        help="the name the shared limits go by (default: derived from the base URL and a "
        "hash of the API key, so every process of the same key shares them; with "
        "--endpoints, NAME:ENDPOINT for each endpoint)",
    )


def shared_rate_limit(
    args: argparse.Namespace, limit: RateLimit | None, *, endpoint: str | None = None
) -> RateLimit | None:
    """Return ``limit``, shared through ``--redis`` under ``--limit-name`` if given.

    ``endpoint``: the limit is that endpoint's own, one of several: its name is then
    ``NAME:ENDPOINT`` (as ``open_client`` names the client's limit for each endpoint).

    Raises:
        ConfigurationError: ``--limit-name`` without ``--redis``.
    """
    redis = getattr(args, "redis", None)
    name = getattr(args, "limit_name", None)
    if redis is None:
        if name is not None:
            raise ConfigurationError("--limit-name names a shared limit: it needs --redis URL")
        return limit
    if name is not None and endpoint is not None:
        name = f"{name}:{endpoint}"
    return attrs.evolve(limit or RateLimit(), shared=redis, name=name)


def cannot_listen(host: str, port: int, exc: OSError) -> CommandError:
    """Return the one-line failure for a server that could not bind ``host:port``."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        reason = f"cannot resolve {host!r} ({exc.strerror or exc})"
    elif exc.errno == errno.EADDRINUSE:
        reason = "address already in use; pick another --port, or --port 0 for a free one"
    elif exc.errno == errno.EACCES:
        privileged = 0 < port < 1024
        reason = "permission denied" + (" (ports below 1024 need privileges)" if privileged else "")
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = f"{host} is not an address of this machine"
    else:
        reason = (exc.strerror or str(exc)).lower()
    return CommandError(f"cannot listen on {address}: {reason}")


def required_env(name: str, flag: str) -> str:
    """Return ``$name``, which the command-line flag ``flag`` named.

    Raises:
        ConfigurationError: it is unset or empty (the message says which, and the flag).
    """
    value = os.environ.get(name)
    if not value:
        state = "is not set" if value is None else "is empty"
        raise ConfigurationError(f"${name} {state} (named by {flag})")
    return value


def api_key_from_env(variable: str | None, *, provider: str, base_url: str | None) -> str | None:
    """Read the API key from ``$variable`` (the provider's own variable if None).

    Returns None when the default variable is unset or empty and the server is on a
    loopback address (local servers often need no key).

    Raises:
        ConfigurationError: ``variable`` (named by ``--api-key-env``) is unset or empty,
            or the default variable is, for a server that is not on a loopback address;
            the message says which, and what to do on the command line.
    """
    if variable:
        return required_env(variable, "--api-key-env")
    adapter = provider_named(provider)
    name = adapter.api_key_env
    value = os.environ.get(name)
    if value:
        return value
    state = "is not set" if value is None else "is empty"
    # Only the host is shown: a URL may carry credentials of its own.
    host = urlsplit(resolve_base_url(base_url, adapter)).hostname or ""
    if is_loopback(host):
        return None
    raise ConfigurationError(
        f"no API key for {host}: ${name} {state}; set it, or pass --api-key-env NAME "
        "to read the key from another variable"
    )


def price_text(text: str) -> str:
    """Check a ``--price`` value (an argparse ``type=``); keep its text for the resume line."""
    try:
        parse_price(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_price_option(group: argparse._ArgumentGroup) -> None:
    """Add ``--price`` (read by :func:`cli_prices`) to ``group``."""
    group.add_argument(
        "--price",
        metavar="[model=NAME,]input=USD,output=USD",
        type=price_text,
        action="append",
        help="price per million tokens, for models genai-prices does not know (or to "
        "override it), e.g. input=0.15,output=0.60 (also cached_input=, cache_write=); "
        "without model= it prices every model; repeat it with model= for several",
    )


def cli_prices(texts: list[str] | None) -> Prices | None:
    """Return the ``prices`` of ``open_client`` that the ``--price`` flags give.

    Raises:
        ConfigurationError: a price for every model given with others, or twice.
    """
    if not texts:
        return None
    parsed = [parse_price(text) for text in texts]
    shared = [price for model, price in parsed if model is None]
    if shared and len(parsed) > 1:
        raise ConfigurationError(
            "--price without model= prices every model: give it once and alone, or name "
            "the model of each price with model=NAME"
        )
    if shared:
        return shared[0]
    by_model: dict[str, Price] = {}
    for model, price in parsed:
        assert model is not None
        if model in by_model:
            raise ConfigurationError(f"--price: two prices for model {model!r}")
        by_model[model] = price
    return by_model


def add_endpoints_option(group: argparse._ActionsContainer) -> None:
    """Add ``--endpoints FILE.toml`` (read by :func:`cli_endpoints`)."""
    group.add_argument(
        "--endpoints",
        metavar="FILE.toml",
        help="several endpoints instead of one URL, from a TOML file with one [[endpoint]] "
        "table each (base_url, model, priority, weight, api_key_env, ...): balanced by load, "
        "with failover and fallbacks (docs: Several endpoints)",
    )


def cli_endpoints(args: argparse.Namespace, *, url_flag: str) -> list[Endpoint] | None:
    """Return the endpoints of ``--endpoints`` (``None`` without it).

    Raises:
        ConfigurationError: the file is not a valid endpoints file, or ``url_flag`` (the
            command's flag for one URL), ``--api-key-env`` or ``--simulate`` was given too.
    """
    path = getattr(args, "endpoints", None)
    if not path:
        return None
    if getattr(args, url_flag.strip("-").replace("-", "_"), None):
        raise ConfigurationError(f"give --endpoints or {url_flag}, not both")
    if getattr(args, "api_key_env", None):
        raise ConfigurationError(
            "--api-key-env is for one URL: with --endpoints, give each [[endpoint]] its "
            "api_key_env in the file"
        )
    if getattr(args, "simulate", False):
        raise ConfigurationError(
            "--simulate answers from the built-in fake server: drop --endpoints"
        )
    from ._endpoints_config import load_endpoints  # (tomllib, only when asked for)

    endpoints = load_endpoints(path)
    if getattr(args, "redis", None) is None:
        return endpoints
    # --redis shares each endpoint's own limits too, each under its own key.
    several = len(endpoints) > 1
    return [
        endpoint
        if endpoint.rate_limit is None or endpoint.rate_limit.shared is not None
        else attrs.evolve(
            endpoint,
            rate_limit=shared_rate_limit(
                args, endpoint.rate_limit, endpoint=endpoint.name if several else None
            ),
        )
        for endpoint in endpoints
    ]


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """Add the flags that :func:`open_cli_client` reads, as the group "server"."""
    group = parser.add_argument_group("server")
    group.add_argument(
        "--provider",
        choices=("openai", "anthropic"),
        default="openai",
        help="the API's wire format: any OpenAI-compatible server, or Anthropic's Messages "
        "API (default: %(default)s)",
    )
    group.add_argument(
        "--base-url",
        metavar="URL",
        help="API root, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL or "
        "https://api.openai.com/v1; for anthropic, the root without /v1: "
        "$ANTHROPIC_BASE_URL or https://api.anthropic.com)",
    )
    add_endpoints_option(group)
    group.add_argument(
        "--api-key-env",
        metavar="NAME",
        type=variable_name,
        help="environment variable holding the API key (default: OPENAI_API_KEY, or "
        "ANTHROPIC_API_KEY for anthropic); keys are never accepted on the command line, "
        "where other users could see them",
    )
    group.add_argument(
        "--model",
        metavar="MODEL",
        help=f"model name (default: $TRIO_LLM_MODEL, else {DEFAULT_MODEL}; "
        f"for anthropic, {DEFAULT_MODELS['anthropic']})",
    )
    group.add_argument(
        "--concurrency",
        metavar="N",
        type=positive_int,
        default=64,
        help="requests in flight at once (default: %(default)s)",
    )
    group.add_argument(
        "--max-attempts",
        metavar="N",
        type=positive_int,
        default=6,
        help="attempts per request, the first included; 1 disables retries (default: %(default)s)",
    )
    group.add_argument(
        "--deadline",
        metavar="SECONDS",
        type=positive_float,
        default=120.0,
        help="give up on a request, retries included, after this long (default: %(default)s)",
    )
    group.add_argument(
        "--simulate",
        action="store_true",
        help="answer from the built-in fake LLM server, started in-process (offline; no key)",
    )
    add_price_option(group)


def _simulated_pace(config: FakeLLMConfig) -> str:
    """How the ``--simulate`` server is paced, for the line that announces it."""
    pace = ""
    if config.tokens_per_second:
        pace = f", paced like a model: {config.latency:g} s + {config.tokens_per_second:g} tokens/s"
    if config.batch_delay:
        pace += f"; its Batch API batches take {config.batch_delay:g} s"
    return pace


@asynccontextmanager
async def open_cli_client(
    args: argparse.Namespace,
    *,
    rate_limit: RateLimit | None = _ADAPTIVE_RATE_LIMIT,
    simulate_latency: float = 0.0,
    simulate_tokens_per_second: float | None = None,
    simulate_batch_delay: float = 0.0,
) -> AsyncIterator[Client]:
    """Open the client the connection flags describe (or the in-process fake server's).

    With ``--endpoints``, the file's endpoints; ``--model`` (or its default) goes to
    those that name no model. ``simulate_*`` pace the fake server of ``--simulate``, so
    a demo looks like a model (``simulate_batch_delay``: how long its Batch API batches
    take).
    With ``--redis`` (:func:`add_shared_limit_options`), the limits are shared.
    Leaving the block, cancelled or not, closes the client and stops that server.

    A ``--cache PATH`` the command has (``add_cache_option``) opens that response cache.

    Raises:
        ConfigurationError: no usable API key (see :func:`api_key_from_env`), a bad
            ``--endpoints`` file, or a setting ``open_client`` refuses.
        CacheError: the ``--cache`` file cannot be used.
        SharedLimitError: the ``--redis`` server does not answer.
    """
    common: dict[str, Any] = {
        "model": args.model or os.environ.get("TRIO_LLM_MODEL") or DEFAULT_MODELS[args.provider],
        "max_concurrency": args.concurrency,
        "retry": RetryPolicy(attempts=args.max_attempts, deadline=args.deadline),
        "rate_limit": shared_rate_limit(args, rate_limit),
        "cache": getattr(args, "cache", None),
        "prices": cli_prices(args.price),
    }
    endpoints = cli_endpoints(args, url_flag="--base-url")
    if endpoints is not None:
        async with open_client(
            endpoints=endpoints,
            **common,
        ) as client:
            yield client
        return
    if args.simulate:
        from .testing import FakeLLMConfig, open_fake_llm

        config = FakeLLMConfig(
            latency=simulate_latency,
            tokens_per_second=simulate_tokens_per_second,
            batch_delay=simulate_batch_delay,
        )
        pace = _simulated_pace(config)
        async with open_fake_llm(config) as server:
            # The fake server speaks both APIs; Anthropic's paths start above /v1.
            base_url = server.root_url if args.provider == "anthropic" else server.base_url
            print(
                f"trio-llm {args.command}: --simulate: answering from the built-in fake LLM "
                f"server at {base_url} (offline; replies are generated text{pace})",
                file=sys.stderr,
                flush=True,
            )
            async with open_client(
                provider=args.provider,
                base_url=base_url,
                api_key="",
                **common,
            ) as client:
                yield client
        return
    api_key = api_key_from_env(args.api_key_env, provider=args.provider, base_url=args.base_url)
    async with open_client(
        provider=args.provider,
        base_url=args.base_url,
        api_key=api_key,
        **common,
    ) as client:
        yield client
