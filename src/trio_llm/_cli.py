"""The ``trio-llm`` command.

argparse (the standard library's parser) is used on purpose: the command has few
subcommands, argparse gives usage errors and ``--help`` for free, and it adds no
dependency to a library whose users mostly import it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import attrs
import trio

from ._client import Client, open_client
from ._config import RetryPolicy
from ._errors import ConfigurationError, LLMError
from ._ratelimit import RateLimit
from ._version import __version__

__all__ = ["main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_DEFAULT_MODEL = "gpt-4o-mini"
_DEFAULT_MODELS = {"openai": _DEFAULT_MODEL, "anthropic": "claude-sonnet-4-5"}
# open_client's default: no limit of its own, the server's advertised limits adopted.
_ADAPTIVE_RATE_LIMIT = RateLimit()


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors name the program and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


def _variable_name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected the name of an environment variable")
    return text


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
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
        help=f"model name (default: $TRIO_LLM_MODEL, else {_DEFAULT_MODEL}; "
        f"for anthropic, {_DEFAULT_MODELS['anthropic']})",
    )
    group.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=64,
        help="requests in flight at once (default: %(default)s)",
    )
    group.add_argument(
        "--max-attempts",
        metavar="N",
        type=_positive_int,
        default=6,
        help="attempts per request, the first included; 1 disables retries (default: %(default)s)",
    )
    group.add_argument(
        "--deadline",
        metavar="SECONDS",
        type=_positive_float,
        default=120.0,
        help="give up on a request, retries included, after this long (default: %(default)s)",
    )
    group.add_argument(
        "--simulate",
        action="store_true",
        help="answer from the built-in fake LLM server, started in-process (offline; no key)",
    )


def _fake_server_field_type(annotation: Any) -> tuple[Any, bool]:
    """Return (argparse type, takes several values) for a FakeLLMConfig field type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _add_fake_server_options(parser: argparse.ArgumentParser) -> None:
    from .testing import FakeLLMConfig

    attrs.resolve_types(FakeLLMConfig)
    group = parser.add_argument_group("behaviour (one flag per FakeLLMConfig field)")
    for field in attrs.fields(FakeLLMConfig):
        kind, several = _fake_server_field_type(field.type)
        flags = ["--" + field.name.replace("_", "-")]
        if "flag" in field.metadata and field.metadata["flag"] not in flags:
            flags.insert(0, field.metadata["flag"])
        default = field.default
        shown = " ".join(map(str, default or ())) if several else default
        group.add_argument(
            *flags,
            dest=field.name,
            type=kind,
            nargs="+" if several else None,
            default=argparse.SUPPRESS,
            metavar=field.name.upper(),
            help=f"{field.metadata.get('help', '')} (default: {shown})",
        )


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``trio-llm`` command."""
    parser = _Parser(
        prog="trio-llm",
        description="Call LLM APIs from the command line, the Trio way.",
        epilog="Run 'trio-llm COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"trio-llm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    chat = commands.add_parser(
        "chat",
        help="send one prompt and print the reply",
        description="Send one prompt and print the reply. "
        "Example: trio-llm chat --simulate 'Explain structured concurrency.'",
    )
    chat.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    chat.add_argument("--system", metavar="TEXT", help="a system message sent before the prompt")
    chat.add_argument("--max-tokens", metavar="N", type=_positive_int, help="cap on reply length")
    chat.add_argument(
        "--temperature", metavar="T", type=_non_negative_float, help="sampling temperature"
    )
    chat.add_argument(
        "--json", action="store_true", help="print the whole response as JSON, not just its text"
    )
    chat.add_argument(
        "--stream",
        action="store_true",
        help="print the reply as it is generated (with --json: the aggregated response)",
    )
    _add_connection_options(chat)

    from .batch._command import add_batch_parser  # here, not at the top: it imports this module

    add_batch_parser(commands)

    from .serve._command import add_serve_parser  # here, not at the top: it imports this module

    add_serve_parser(commands)

    server = commands.add_parser(
        "fake-server",
        help="run the fake OpenAI-compatible LLM server (for tests and demos)",
        description="Run trio-llm's fake LLM server: the OpenAI wire format over real HTTP, "
        "with latency, rate limits and fault injection. Example: "
        "trio-llm fake-server --port 8000 --latency 0.05 --error-rate 0.1 --rpm 600",
    )
    server.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    server.add_argument(
        "--port",
        type=int,
        default=8000,
        help="port to bind; 0 picks a free one (default: %(default)s)",
    )
    server.add_argument(
        "-v", "--verbose", action="store_true", help="log one line per request to stderr"
    )
    _add_fake_server_options(server)
    return parser


@asynccontextmanager
async def _open_cli_client(
    args: argparse.Namespace,
    *,
    rate_limit: RateLimit | None = _ADAPTIVE_RATE_LIMIT,
    simulate_latency: float = 0.0,
    simulate_tokens_per_second: float | None = None,
) -> AsyncIterator[Client]:
    """Open the client the connection flags describe (or the in-process fake server's).

    ``simulate_*`` pace the fake server of ``--simulate``, so a demo looks like a model.
    """
    model = args.model or os.environ.get("TRIO_LLM_MODEL") or _DEFAULT_MODELS[args.provider]
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


async def _chat(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})
    params: dict[str, Any] = {}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        params["temperature"] = args.temperature
    async with _open_cli_client(args) as client:
        if args.stream:
            async with client.stream(messages, **params) as stream:
                async for chunk in stream:
                    if not args.json:
                        print(chunk.text, end="", flush=True)
            reply = stream.response
            if not args.json:
                print()
                return EXIT_OK
        else:
            reply = await client.chat(messages, **params)
    if args.json:
        print(json.dumps(reply.raw, indent=2, ensure_ascii=False))
    else:
        print(reply.text)
    return EXIT_OK


def _fake_server_config(args: argparse.Namespace) -> Any:
    """Build the FakeLLMConfig the fake-server flags describe (ValueError if invalid)."""
    from .testing import FakeLLMConfig

    names = {field.name for field in attrs.fields(FakeLLMConfig)}
    options = {name: value for name, value in vars(args).items() if name in names}
    if "models" in options:
        options["models"] = tuple(options["models"])
    return FakeLLMConfig(**options)


async def _fake_server(args: argparse.Namespace, config: Any) -> int:
    from .testing import serve_fake_llm

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        logging.getLogger("trio_llm.testing").setLevel(logging.INFO)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_fake_llm(
                config, host=args.host, port=args.port, task_status=task_status
            )
        )
        print(f"trio-llm fake server listening on {server.base_url} (Ctrl-C to stop)", flush=True)
    return EXIT_OK  # pragma: no cover - the server runs until interrupted


def _is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is Ctrl-C, possibly wrapped in (nested) exception groups."""
    inner = getattr(exc, "exceptions", None)  # BaseExceptionGroup, also on 3.10's backport
    if inner is not None:
        return bool(inner) and all(_is_interrupt(e) for e in inner)
    return isinstance(exc, KeyboardInterrupt)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-llm`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # stamina logs each scheduled retry at WARNING; with no logging configured Python
    # prints a bare "stamina.retry_scheduled" per retry. The commands report retries
    # themselves (progress line, statistics), so keep stderr readable.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    try:
        if args.command == "fake-server":
            try:
                config = _fake_server_config(args)
            except (TypeError, ValueError) as exc:
                parser.exit(EXIT_USAGE, f"trio-llm fake-server: error: {exc}\n")
            return trio.run(_fake_server, args, config)
        if args.command == "batch":
            from .batch._command import run_batch_command

            return run_batch_command(args)
        if args.command == "serve":
            from .serve._command import run_serve_command

            return run_serve_command(args)
        return trio.run(_chat, args)
    except ConfigurationError as exc:
        print(f"trio-llm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LLMError as exc:
        print(f"trio-llm {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BaseException as exc:
        if not _is_interrupt(exc):
            raise
        if args.command == "fake-server":
            print("trio-llm fake-server: stopped", file=sys.stderr)
            return EXIT_OK
        print(f"trio-llm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
