"""The ``trio-llm`` command.

argparse (the standard library's parser) is used on purpose: the command has few
subcommands, argparse gives usage errors and ``--help`` for free, and it adds no
dependency to a library whose users mostly import it.

This module assembles the command and holds ``chat`` and ``fake-server``; ``batch`` and
``serve`` live in their packages' ``_command.py``, ``cache`` in ``_cli_cache.py``, and
what the commands share (exit codes, argument types, connection flags, the client) in
``_cli_options.py``. Commands import ``_cli_options``, never this module.

Every expected failure ends here as one line on stderr and a documented exit status
(``docs/batch.md``, ``docs/serving.md``); a traceback is printed only with ``--debug``,
or for an error nobody expected (a bug).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
import types
import typing
from collections.abc import Sequence
from typing import Any, Final

import attrs
import trio

from ._cli_cache import add_cache_option, add_cache_parser, run_cache_command
from ._cli_options import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Parser,
    add_connection_options,
    add_shared_limit_options,
    cannot_listen,
    non_negative_float,
    open_cli_client,
    port_number,
    positive_int,
)
from ._errors import ConfigurationError, LLMError
from ._version import __version__
from .batch._command import add_batch_parser, run_batch_command
from .serve._command import add_serve_parser, run_serve_command

__all__ = ["main"]

# `chat --simulate --stream` paces the fake server like a model, so that the reply
# visibly streams (unpaced, the whole of it arrives in a few milliseconds).
_SIMULATED_STREAM_LATENCY: Final = 0.3
_SIMULATED_STREAM_TOKENS_PER_SECOND: Final = 25.0
_DEBUG_HELP: Final = "on a failure, print its traceback too, not only the one-line message"


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``trio-llm`` command."""
    parser = Parser(
        prog="trio-llm",
        description="Call LLM APIs from the command line, the Trio way.",
        epilog="Run 'trio-llm COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"trio-llm {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    _add_chat_parser(commands)
    add_batch_parser(commands)
    add_serve_parser(commands)
    _add_fake_server_parser(commands)
    add_cache_parser(commands)
    for command in commands.choices.values():
        # Also after the command's name; SUPPRESS keeps the top-level value when absent.
        if "--debug" not in command._option_string_actions:
            command.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
            )
    return parser


def _add_chat_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="send one prompt and print the reply",
        description="Send one prompt and print the reply. "
        "Example: trio-llm chat --simulate 'Explain structured concurrency.'",
    )
    chat.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    chat.add_argument("--system", metavar="TEXT", help="a system message sent before the prompt")
    chat.add_argument("--max-tokens", metavar="N", type=positive_int, help="cap on reply length")
    chat.add_argument(
        "--temperature", metavar="T", type=non_negative_float, help="sampling temperature"
    )
    chat.add_argument(
        "--json", action="store_true", help="print the whole response as JSON, not just its text"
    )
    chat.add_argument(
        "--stream",
        action="store_true",
        help="print the reply as it is generated (with --json: the aggregated response)",
    )
    add_cache_option(chat)
    chat.add_argument(
        "--schema",
        metavar="FILE",
        help="a JSON Schema file: ask for a reply matching it, repair a bad one (twice at "
        "most), and print the validated JSON value",
    )
    add_connection_options(chat)
    add_shared_limit_options(chat)


def _add_fake_server_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    server = subparsers.add_parser(
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
        type=port_number,
        default=8000,
        help="port to bind, 0 to 65535; 0 picks a free one (default: %(default)s)",
    )
    server.add_argument(
        "-v", "--verbose", action="store_true", help="log one line per request to stderr"
    )
    _add_fake_server_options(server)


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


def _read_schema(path: str) -> Any:
    """Return the JSON Schema in the file ``path`` (a usage error if it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as file:
            schema = json.load(file)
    except (OSError, ValueError) as exc:
        raise CommandError(f"--schema {path}: {exc}", status=EXIT_USAGE) from None
    if not isinstance(schema, dict):
        raise CommandError(f"--schema {path}: a JSON Schema is an object", status=EXIT_USAGE)
    return schema


async def _structured(args: argparse.Namespace, messages: Any, params: dict[str, Any]) -> int:
    from ._structured import chat_structured  # jsonschema and cattrs load only when needed

    if args.stream:
        raise CommandError("--schema and --stream cannot be combined", status=EXIT_USAGE)
    schema = _read_schema(args.schema)
    async with open_cli_client(args) as client:
        try:
            value = await chat_structured(client, messages, schema, **params)
        except ValueError as exc:  # raised before anything is sent
            raise CommandError(f"--schema {args.schema}: {exc}", status=EXIT_USAGE) from None
    print(json.dumps(value, indent=2, ensure_ascii=False))
    return EXIT_OK


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
    if args.schema is not None:
        return await _structured(args, messages, params)
    pace: dict[str, Any] = {}
    if args.stream:
        pace = {
            "simulate_latency": _SIMULATED_STREAM_LATENCY,
            "simulate_tokens_per_second": _SIMULATED_STREAM_TOKENS_PER_SECOND,
        }
    async with open_cli_client(args, **pace) as client:
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
        # The reply as the API sent it, plus what it cost (USD; null: no known price).
        print(json.dumps({**reply.raw, "cost": reply.cost}, indent=2, ensure_ascii=False))
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
        try:
            server = await nursery.start(
                lambda task_status: serve_fake_llm(
                    config, host=args.host, port=args.port, task_status=task_status
                )
            )
        except OSError as exc:  # raised before listening: the bind failed
            raise cannot_listen(args.host, args.port, exc) from exc
        print(f"trio-llm fake server listening on {server.base_url} (Ctrl-C to stop)", flush=True)
    return EXIT_OK  # pragma: no cover - the server runs until interrupted


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, through (nested) exception groups."""
    inner = getattr(exc, "exceptions", None)  # BaseExceptionGroup, also 3.10's backport
    if isinstance(inner, tuple):
        return [leaf for child in inner for leaf in _leaves(child)]
    return [exc]


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "fake-server":
        try:
            config = _fake_server_config(args)
        except (TypeError, ValueError) as exc:
            parser.exit(EXIT_USAGE, f"trio-llm fake-server: error: {exc}\n")
        return trio.run(_fake_server, args, config)
    if args.command == "batch":
        return run_batch_command(args)
    if args.command == "serve":
        return run_serve_command(args)
    if args.command == "cache":
        return run_cache_command(args)
    return trio.run(_chat, args)


def _report_failure(exc: BaseException, args: argparse.Namespace) -> int:
    """Print the one line that says why the command stopped; return its exit status.

    A nursery (the --simulate server's, a server's) wraps what it raises in an exception
    group; a group of one expected error is reported as that error. Anything else is a
    bug, and propagates with its traceback.
    """
    leaves = _leaves(exc)
    interrupted = bool(leaves) and all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves)
    expected = (CommandError, LLMError)
    if not interrupted and not (len(leaves) == 1 and isinstance(leaves[0], expected)):
        raise exc
    if args.debug:
        traceback.print_exception(exc)
    prefix = f"trio-llm {args.command}:"
    if interrupted:
        if args.command == "fake-server":  # Ctrl-C is how the fake server is stopped
            print(f"{prefix} stopped", file=sys.stderr)
            return EXIT_OK
        print(f"{prefix} interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    error = leaves[0]
    if isinstance(error, CommandError):
        print(f"{prefix} error: {error}", file=sys.stderr)
        return error.status
    if isinstance(error, ConfigurationError):
        print(f"{prefix} error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{prefix} error: {type(error).__name__}: {error}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trio-llm`` command; return its exit status.

    Exit statuses: 0 done, 1 the work failed (a request, a bind), 2 bad usage (a flag,
    a missing key), 130 interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # stamina logs each scheduled retry at WARNING; with no logging configured Python
    # prints a bare "stamina.retry_scheduled" per retry. The commands report retries
    # themselves (progress line, statistics), so keep stderr readable.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    try:
        return _run(parser, args)
    except BaseException as exc:
        return _report_failure(exc, args)
