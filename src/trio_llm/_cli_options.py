"""What the ``trio-llm`` commands share: exit codes, argument types, flags and the client.

The top-level command (``_cli.py``) and each command module (``batch/_command.py``,
``serve/_command.py``) import from here; this module imports none of them, so the
commands never import the module that assembles them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, NoReturn

from ._client import Client, open_client
from ._config import RetryPolicy
from ._errors import ConfigurationError
from ._ratelimit import RateLimit

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODELS",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Parser",
    "add_connection_options",
    "non_negative_float",
    "open_cli_client",
    "positive_float",
    "positive_int",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

DEFAULT_MODEL: Final = "gpt-4o-mini"
DEFAULT_MODELS: Final = {"openai": DEFAULT_MODEL, "anthropic": "claude-sonnet-4-5"}
# open_client's default: no limit of its own, the server's advertised limits adopted.
_ADAPTIVE_RATE_LIMIT: Final = RateLimit()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors name the program and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """Parse a whole number >= 1 (an argparse ``type=``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """Parse a number >= 0, NaN refused (an argparse ``type=``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """Parse a number > 0, NaN refused (an argparse ``type=``)."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


def _variable_name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected the name of an environment variable")
    return text


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
    group.add_argument(
        "--api-key-env",
        metavar="NAME",
        type=_variable_name,
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


@asynccontextmanager
async def open_cli_client(
    args: argparse.Namespace,
    *,
    rate_limit: RateLimit | None = _ADAPTIVE_RATE_LIMIT,
    simulate_latency: float = 0.0,
    simulate_tokens_per_second: float | None = None,
) -> AsyncIterator[Client]:
    """Open the client the connection flags describe (or the in-process fake server's).

    ``simulate_*`` pace the fake server of ``--simulate``, so a demo looks like a model.
    Leaving the block, cancelled or not, closes the client and stops that server.

    Raises:
        ConfigurationError: ``--api-key-env`` names an unset variable, or
            ``open_client`` finds no key.
    """
    model = args.model or os.environ.get("TRIO_LLM_MODEL") or DEFAULT_MODELS[args.provider]
    retry = RetryPolicy(attempts=args.max_attempts, deadline=args.deadline)
    if args.simulate:
        from .testing import FakeLLMConfig, open_fake_llm

        config = FakeLLMConfig(
            latency=simulate_latency, tokens_per_second=simulate_tokens_per_second
        )
        pace = (
            f", paced like a model: {simulate_latency:g} s + "
            f"{simulate_tokens_per_second:g} tokens/s"
            if simulate_tokens_per_second
            else ""
        )
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
                model=model,
                max_concurrency=args.concurrency,
                retry=retry,
                rate_limit=rate_limit,
            ) as client:
                yield client
        return
    # Without --api-key-env, open_client reads the provider's own variable.
    api_key = os.environ.get(args.api_key_env) or None if args.api_key_env else None
    if args.api_key_env and api_key is None:
        raise ConfigurationError(f"${args.api_key_env} is not set (named by --api-key-env)")
    async with open_client(
        provider=args.provider,
        base_url=args.base_url,
        api_key=api_key,
        model=model,
        max_concurrency=args.concurrency,
        retry=retry,
        rate_limit=rate_limit,
    ) as client:
        yield client
