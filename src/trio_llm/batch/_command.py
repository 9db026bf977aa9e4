"""The ``trio-llm batch`` command: its flags, its client, its messages and exit statuses."""

from __future__ import annotations

import argparse
import shlex
import sys
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

import trio

from .._cli_options import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_connection_options,
    non_negative_float,
    open_cli_client,
    positive_float,
)
from .._client import Client
from .._errors import BatchInputError, ConfigurationError, LLMError
from .._ratelimit import RateLimit
from ._progress import print_summary
from ._runner import BatchSummary, run_batch

__all__ = ["add_batch_parser", "run_batch_command"]

# --simulate answers like a real model would, only faster: a visible but short run.
_SIMULATED_LATENCY: Final = 0.2
_SIMULATED_TOKENS_PER_SECOND: Final = 400.0

_DESCRIPTION = """\
Send every request of INPUT.jsonl and write one answer line per input line to
OUTPUT.jsonl, as each completes. INPUT lines are in the OpenAI Batch API format
({"custom_id", "method": "POST", "url": "/v1/chat/completions" or "/v1/embeddings",
"body"}) or the short form {"custom_id", "prompt"}; OUTPUT lines are in the Batch API
output format. Rerun the same command to resume: lines already answered in OUTPUT are
skipped. Ctrl-C stops gently (a second Ctrl-C at once). Exit status: 0 every line
answered OK, 1 some answered with an error, 2 bad usage or input, 130 interrupted.
Example: trio-llm batch examples/data/sample_batch.jsonl -o out.jsonl --simulate"""


def add_batch_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``batch`` subcommand to the ``trio-llm`` parser's ``subparsers``."""
    batch = subparsers.add_parser(
        "batch",
        help="send a JSONL file of requests; resumable, with progress",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("input", metavar="INPUT.jsonl", help="the requests, one JSON per line")
    batch.add_argument(
        "-o",
        "--output",
        metavar="OUTPUT.jsonl",
        required=True,
        help="the answers (created, or appended to when resuming)",
    )
    add_connection_options(batch)
    limits = batch.add_argument_group("rate limits (default: adopt the server's headers)")
    limits.add_argument(
        "--rpm", metavar="N", type=positive_float, help="requests per minute, at most"
    )
    limits.add_argument(
        "--tpm", metavar="N", type=positive_float, help="tokens per minute, at most"
    )
    run = batch.add_argument_group("run")
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="send again the lines OUTPUT answers with an error (their lines are replaced)",
    )
    run.add_argument(
        "--skip-invalid",
        action="store_true",
        help="record invalid input lines as error lines in OUTPUT instead of stopping",
    )
    run.add_argument(
        "--grace",
        metavar="SECONDS",
        type=non_negative_float,
        default=30.0,
        help="after Ctrl-C or SIGTERM, how long requests in flight may finish "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--progress-interval",
        metavar="SECONDS",
        type=positive_float,
        default=10.0,
        help="seconds between progress lines when stderr is not a terminal (default: %(default)s)",
    )


def _open_batch_client(args: argparse.Namespace) -> AbstractAsyncContextManager[Client]:
    rate_limit = RateLimit(requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
    return open_cli_client(
        args,
        rate_limit=rate_limit,
        simulate_latency=_SIMULATED_LATENCY,
        simulate_tokens_per_second=_SIMULATED_TOKENS_PER_SECOND,
    )


async def _batch(args: argparse.Namespace) -> BatchSummary:
    async with _open_batch_client(args) as client:
        return await run_batch(
            args.input,
            args.output,
            client=client,
            retry_failed=args.retry_failed,
            skip_invalid=args.skip_invalid,
            progress=True,
            progress_interval=args.progress_interval,
            handle_signals=True,
            grace=args.grace,
        )


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this run: the same flags, minus defaults."""
    words = ["trio-llm", "batch", args.input, "-o", args.output]
    defaults = {
        "provider": "openai",
        "base_url": None,
        "api_key_env": None,
        "model": None,
        "concurrency": 64,
        "max_attempts": 6,
        "deadline": 120.0,
        "rpm": None,
        "tpm": None,
        "grace": 30.0,
        "progress_interval": 10.0,
    }
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            words += ["--" + name.replace("_", "-"), shown]
    for name in ("simulate", "skip_invalid", "retry_failed"):
        if getattr(args, name):
            words.append("--" + name.replace("_", "-"))
    return shlex.join(words)


def _say(text: str) -> None:
    print(f"trio-llm batch: {text}", file=sys.stderr, flush=True)


def _exit_status(summary: BatchSummary, args: argparse.Namespace) -> int:
    if summary.interrupted:
        _say(
            f"interrupted: {summary.total - summary.unanswered:,} of {summary.total:,} lines "
            f"answered in {summary.output_path}, {summary.unanswered:,} not yet. "
            f"To resume, run the same command again: {_resume_command(args)}"
        )
        return EXIT_INTERRUPTED
    if summary.errors:
        _say(
            f"done: {summary.errors:,} of {summary.total:,} lines answered with an error "
            f'(their lines in {summary.output_path} have "error" set); '
            "rerun with --retry-failed to send them again"
        )
        return EXIT_ERROR
    _say(f"done: all {summary.total:,} lines answered OK in {summary.output_path}")
    return EXIT_OK


def _leaves(exc: BaseException) -> list[BaseException]:
    inner = getattr(exc, "exceptions", None)  # BaseExceptionGroup, also 3.10's backport
    if isinstance(inner, tuple):
        return [leaf for child in inner for leaf in _leaves(child)]
    return [exc]


def _report_failure(exc: BaseException, args: argparse.Namespace) -> int:
    """Say why the run could not start or go on; return the exit status (or re-raise).

    Errors may arrive wrapped in exception groups (the --simulate server's nursery, the
    run's): a lone error is reported as itself; anything else propagates.
    """
    leaves = _leaves(exc)
    if leaves and all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        # Ctrl-C before the run's own signal handling started: nothing was sent.
        _say(f"interrupted before sending; run the same command again: {_resume_command(args)}")
        return EXIT_INTERRUPTED
    if len(leaves) != 1:
        raise exc
    error = leaves[0]
    if isinstance(error, BatchInputError):
        _say(f"error: {error}")
        if error.path == args.input:
            _say("fix these lines, or pass --skip-invalid to record them as error lines")
        return EXIT_USAGE
    if isinstance(error, ConfigurationError):
        _say(f"error: {error}")
        return EXIT_USAGE
    if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)):
        _say(f"error: {error.strerror}: {error.filename}")
        return EXIT_USAGE
    if isinstance(error, (LLMError, OSError)):
        _say(f"error: {type(error).__name__}: {error}; rerun the same command to resume")
        return EXIT_ERROR
    raise exc


def run_batch_command(args: argparse.Namespace) -> int:
    """Run ``trio-llm batch`` as parsed into ``args``; return the exit status."""
    try:
        summary = trio.run(_batch, args)
    except BaseException as exc:
        return _report_failure(exc, args)
    print_summary(summary)
    return _exit_status(summary, args)
