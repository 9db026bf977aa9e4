"""The ``trio-llm batch`` command: its flags, its client, its messages and exit statuses."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any, Final

import trio

from .._cli_cache import add_cache_option
from .._cli_options import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OVER_BUDGET,
    EXIT_STOPPED,
    EXIT_USAGE,
    add_connection_options,
    add_shared_limit_options,
    non_negative_float,
    open_cli_client,
    positive_float,
    positive_int,
    whole_number,
)
from .._client import Client
from .._cost import format_usd
from .._errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    BatchInputError,
    ConfigurationError,
    LLMError,
    RateLimitError,
    RetryDeadlineExceeded,
    SharedLimitError,
    redact_url,
)
from .._ratelimit import RateLimit
from ..providers._registry import provider_named
from ._output import OutputWriteError
from ._progress import print_summary
from ._runner import DEFAULT_MAX_CONSECUTIVE_FAILURES, BatchSummary, ViaProvider, run_batch
from ._shard import parse_shard

__all__ = ["add_batch_parser", "run_batch_command"]

# --simulate answers like a real model would, only faster: a visible but short run.
_SIMULATED_LATENCY: Final = 0.2
_SIMULATED_TOKENS_PER_SECOND: Final = 400.0
# --via provider: the provider's batches take hours; the simulated ones a few seconds.
_POLL_INTERVAL: Final = 30.0
_SIMULATED_POLL_INTERVAL: Final = 0.5
_SIMULATED_BATCH_DELAY: Final = 2.0

# Why --via provider refuses a flag of online runs.
_NOT_WITH: Final = {
    "--endpoints": "sends the job's batches to one server (--base-url)",
    "--cache": "neither reads nor fills a response cache",
    "--shard": "submits the whole job: the provider runs it, no machines to split it",
    "--max-cost": "submits the whole job at once: no budget can stop it halfway",
}

_DESCRIPTION = """\
Send every request of INPUT.jsonl and write one answer line per input line to
OUTPUT.jsonl, as each completes. INPUT lines are in the OpenAI Batch API format
({"custom_id", "method": "POST", "url": "/v1/chat/completions" or "/v1/embeddings",
"body"}) or the short form {"custom_id", "prompt"}; OUTPUT lines are in the Batch API
output format. Rerun the same command to resume: lines already answered in OUTPUT are
skipped. Ctrl-C stops gently (a second Ctrl-C at once). A 401, 403 or 404, or a run of
failures with no success in between (a dead endpoint), stops the run at once, leaving
the lines not answered for the rerun. Exit status: 0 every line answered OK, 1 some
answered with an error, 2 bad usage or input, 3 stopped (the server refuses every
request or keeps failing, or a file cannot be written): fix it and rerun, 4 stopped at the
--max-cost budget: rerun to go on with a new one, 130 interrupted.
Example: trio-llm batch examples/data/sample_batch.jsonl -o out.jsonl --simulate"""


def _input_path(text: str) -> str:
    if text == "-":
        raise argparse.ArgumentTypeError(
            "'-' (standard input) is not supported: the input is read twice (checked, "
            "then sent); save it to a file and name that"
        )
    return text


def _output_path(text: str) -> str:
    if text == "-":
        raise argparse.ArgumentTypeError(
            "'-' (standard output) is not supported: the answers go to a file, which a "
            "rerun resumes from; name one, e.g. -o answers.jsonl"
        )
    return text


_failure_limit = whole_number(0, note=" (0: never)")


def add_batch_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``batch`` subcommand to the ``trio-llm`` parser's ``subparsers``."""
    batch = subparsers.add_parser(
        "batch",
        help="send a JSONL file of requests; resumable, with progress",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument(
        "input", metavar="INPUT.jsonl", type=_input_path, help="the requests, one JSON per line"
    )
    batch.add_argument(
        "-o",
        "--output",
        metavar="OUTPUT.jsonl",
        type=_output_path,
        required=True,
        help="the answers (created, or appended to when resuming)",
    )
    add_connection_options(batch)
    add_cache_option(batch)
    limits = batch.add_argument_group("rate limits (default: adopt the server's headers)")
    for flag, what in (("--rpm", "requests"), ("--tpm", "tokens")):
        limits.add_argument(flag, metavar="N", type=positive_float, help=f"{what}/minute, at most")
    add_shared_limit_options(batch)
    run = batch.add_argument_group("run")
    run.add_argument(
        "--shard",
        metavar="K/N",
        type=parse_shard,
        help="handle only shard K of N (1 <= K <= N): the lines whose custom_id hashes to "
        "it (SHA-256, stable across machines), so that N runs, each with its own OUTPUT, "
        "do one job together; with --redis they share the limits too",
    )
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
        "--max-consecutive-failures",
        metavar="N",
        type=_failure_limit,
        default=DEFAULT_MAX_CONSECUTIVE_FAILURES,
        help="stop when N lines in a row fail with no answer, a 5xx, a 429 or the deadline "
        "(after their retries) and none succeeds in between: a dead endpoint; their lines "
        "stay unanswered for the rerun; 0 never stops so (default: %(default)s)",
    )
    _add_provider_options(batch)
    run.add_argument(
        "--max-cost",
        metavar="USD",
        type=positive_float,
        help="a budget: send a line only if what the run spent, plus the most the requests "
        "in flight and this one can cost, stays within USD; then stop starting requests, "
        "let those in flight finish, and exit with status 4 (every model needs a price: "
        "genai-prices' or --price)",
    )
    run.add_argument(
        "--progress-interval",
        metavar="SECONDS",
        type=positive_float,
        default=10.0,
        help="seconds between progress lines when stderr is not a terminal (default: %(default)s)",
    )


def _add_provider_options(batch: argparse.ArgumentParser) -> None:
    group = batch.add_argument_group(
        "provider Batch API (--via provider: half the price, results within 24 hours)"
    )
    group.add_argument(
        "--via",
        choices=("online", "provider"),
        default="online",
        help="online: send each line as a request (default); provider: submit the lines "
        "through the provider's Batch API (OpenAI, Anthropic) and merge the results",
    )
    group.add_argument(
        "--poll-interval",
        metavar="SECONDS",
        type=positive_float,
        help=f"seconds between two polls of a batch (default: {_POLL_INTERVAL:g}; "
        f"{_SIMULATED_POLL_INTERVAL:g} with --simulate)",
    )
    group.add_argument(
        "--max-batch-lines",
        metavar="N",
        type=positive_int,
        help="the most lines in one batch (default: the provider's limit, 50,000 for "
        "OpenAI, 100,000 for Anthropic)",
    )
    group.add_argument(
        "--max-batch-bytes",
        metavar="BYTES",
        type=positive_int,
        help="the most bytes in one batch (default: the provider's limit, 200 MB for "
        "OpenAI, 255 MB for Anthropic)",
    )
    group.add_argument(
        "--cancel",
        action="store_true",
        help="cancel the job's running batches, merge what they answered, submit nothing",
    )


def _open_batch_client(args: argparse.Namespace) -> AbstractAsyncContextManager[Client]:
    rate_limit = RateLimit(requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
    if args.via == "provider":  # the simulated batches take a few seconds as a whole
        return open_cli_client(
            args, rate_limit=rate_limit, simulate_batch_delay=_SIMULATED_BATCH_DELAY
        )
    return open_cli_client(
        args,
        rate_limit=rate_limit,
        simulate_latency=_SIMULATED_LATENCY,
        simulate_tokens_per_second=_SIMULATED_TOKENS_PER_SECOND,
    )


async def _batch(args: argparse.Namespace, finished: list[BatchSummary]) -> BatchSummary:
    async with _open_batch_client(args) as client:
        if args.via == "provider":
            summary = await _via_provider(args, client)
            finished.append(summary)
            return summary
        summary = await run_batch(
            args.input,
            args.output,
            client=client,
            retry_failed=args.retry_failed,
            skip_invalid=args.skip_invalid,
            progress=True,
            progress_interval=args.progress_interval,
            handle_signals=True,
            grace=args.grace,
            max_consecutive_failures=args.max_consecutive_failures or None,
            shard=None if args.shard is None else (args.shard.index, args.shard.count),
            max_cost=args.max_cost,
        )
        # Kept before the client closes: a Ctrl-C from here on still gets the summary.
        finished.append(summary)
    return summary


async def _via_provider(args: argparse.Namespace, client: Client) -> BatchSummary:
    from ._via_provider import run_provider_batch

    poll = args.poll_interval
    if poll is None:
        poll = _SIMULATED_POLL_INTERVAL if args.simulate else _POLL_INTERVAL
    via = ViaProvider(
        poll_interval=poll,
        max_batch_lines=args.max_batch_lines,
        max_batch_bytes=args.max_batch_bytes,
        cancel=args.cancel,
    )
    return await run_provider_batch(
        args.input,
        args.output,
        client=client,
        via=via,
        retry_failed=args.retry_failed,
        skip_invalid=args.skip_invalid,
        progress=True,
        progress_interval=args.progress_interval,
        handle_signals=True,
        simulated=args.simulate,
    )


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes this run: the same flags, minus defaults."""
    words = ["trio-llm", "batch", args.input, "-o", args.output]
    defaults = {
        "provider": "openai",
        "base_url": None,
        "cache": None,
        "endpoints": None,
        "api_key_env": None,
        "model": None,
        "concurrency": 64,
        "max_attempts": 6,
        "deadline": 120.0,
        "rpm": None,
        "tpm": None,
        "redis": None,
        "limit_name": None,
        "shard": None,
        "grace": 30.0,
        "max_consecutive_failures": DEFAULT_MAX_CONSECUTIVE_FAILURES,
        "progress_interval": 10.0,
        "max_cost": None,
        "via": "online",
        "poll_interval": None,
        "max_batch_lines": None,
        "max_batch_bytes": None,
    }
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            if name in ("base_url", "redis"):  # printed: a password in it is not
                shown = redact_url(shown)
            words += ["--" + name.replace("_", "-"), shown]
    for text in args.price or ():
        words += ["--price", text]
    for name in ("simulate", "skip_invalid", "retry_failed"):
        if getattr(args, name):
            words.append("--" + name.replace("_", "-"))
    command = shlex.join(words)
    for flag, url in (("--base-url", args.base_url), ("--redis", args.redis)):
        if url and redact_url(url) != url:
            command += f"  (put back the credentials *** hides in {flag})"
    return command


def _say(text: str) -> None:
    print(f"trio-llm batch: {text}", file=sys.stderr, flush=True)


def _stop_hint(error: LLMError | None, args: argparse.Namespace) -> str:
    """Say what to check after the run stopped on ``error`` (``summary.stop_error``)."""
    if isinstance(error, RetryDeadlineExceeded) and error.last_error is not None:
        error = error.last_error
    key = "$" + (args.api_key_env or provider_named(args.provider).api_key_env)
    status = error.status_code if isinstance(error, APIStatusError) else None
    if status == 401:
        return f"check the API key in {key}"
    if status == 403:
        return f"check that the key in {key} may use this model and endpoint"
    if status == 404 and getattr(args, "via", "online") == "provider":
        return (
            "a batch or file of the job is unknown to this key, or the server has no Batch "
            f"API: check {key} (the key that created the job) and --base-url"
        )
    if status in (404, 405):
        return "check --base-url, --provider and the model (--model or body.model)"
    if status == 407:
        return "check the proxy's credentials"
    if isinstance(error, SharedLimitError):
        return "is Redis up? check --redis"
    if isinstance(error, APIConnectionError):
        return "is the server up? check --base-url"
    if isinstance(error, APIResponseError):
        return "the replies are not the API's: check --base-url and --provider"
    if isinstance(error, RateLimitError):
        return "every request is refused with 429: lower --rpm or --concurrency, or check the quota"
    return (
        "the server keeps failing: try again later (if only some lines fail so, "
        "--max-consecutive-failures 0 records them as errors and goes on)"
    )


def _provider_interrupted(summary: BatchSummary, args: argparse.Namespace) -> None:
    running = [batch.id for batch in summary.batches if batch.status in ("running", "ended")]
    ids = ", ".join(str(batch) for batch in running[:3]) + (", ..." if len(running) > 3 else "")
    command = _resume_command(args)
    if running:
        _say(
            f"interrupted: polling stopped; {len(running)} batch(es) keep running at the "
            f"provider ({ids}) and their results are merged when you resume: {command}"
        )
        _say(f"to cancel them instead: {command} --cancel")
    else:
        _say(f"interrupted; to resume, run the same command again: {command}")


def _exit_status(summary: BatchSummary, args: argparse.Namespace) -> int:
    if summary.interrupted and summary.via == "provider" and summary.stopped is None:
        _provider_interrupted(summary, args)
        return EXIT_INTERRUPTED
    answered = (
        f"{summary.total - summary.unanswered:,} of {summary.total:,} lines answered in "
        f"{summary.output_path}, {summary.unanswered:,} not yet"
    )
    if summary.stopped is not None:
        _say(f"stopped: {summary.stopped}; {_stop_hint(summary.stop_error, args)}")
        _say(f"{answered}. Once fixed, resume with: {_resume_command(args)}")
        return EXIT_STOPPED
    if summary.over_budget:
        _say(f"stopped at the budget: {_budget_text(summary)}; the requests in flight finished")
        _say(f"{answered}. To go on with a new budget of the same size: {_resume_command(args)}")
        return EXIT_OVER_BUDGET
    if summary.interrupted:
        _say(
            f"interrupted: {answered}. "
            f"To resume, run the same command again: {_resume_command(args)}"
        )
        return EXIT_INTERRUPTED
    if not summary.complete:  # --cancel: lines never submitted, or whose part was dropped
        _say(
            f"{answered}: they are in no batch at the provider (never submitted, or "
            f"dropped by --cancel); run without --cancel to submit them: {_resume_command(args)}"
        )
        return EXIT_ERROR
    if summary.errors:
        _say(
            f"done: {summary.errors:,} of {summary.total:,} lines answered with an error "
            f'(their lines in {summary.output_path} have "error" set); '
            "rerun with --retry-failed to send them again"
        )
        return EXIT_ERROR
    _say(f"done: all {summary.total:,} lines answered OK in {summary.output_path}")
    return EXIT_OK


def _budget_text(summary: BatchSummary) -> str:
    spent = "an unknown amount" if summary.cost is None else format_usd(summary.cost)
    return f"spent {spent} of --max-cost {format_usd(summary.max_cost or 0)}"


def _leaves(exc: BaseException) -> list[BaseException]:
    inner = getattr(exc, "exceptions", None)  # BaseExceptionGroup, also 3.10's backport
    if isinstance(inner, tuple):
        return [leaf for child in inner for leaf in _leaves(child)]
    return [exc]


# The paths named on the command line lead to no usable file: a usage error.
_BAD_PATH: Final = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _report_failure(exc: BaseException, args: argparse.Namespace) -> int:
    """Say in one line why the run could not start or go on; return the exit status.

    Errors may arrive wrapped in exception groups (the --simulate server's nursery, the
    run's): a lone error is reported as itself; anything else propagates (a bug).
    """
    leaves = _leaves(exc)
    interrupted = bool(leaves) and all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves)
    if not interrupted and len(leaves) != 1:
        raise exc
    error = leaves[0]
    if not interrupted and not isinstance(error, (LLMError, OSError)):
        raise exc
    if getattr(args, "debug", False):  # trio-llm --debug
        traceback.print_exception(exc)
    if interrupted:
        # Ctrl-C before the run's own signal handling started: nothing was sent.
        _say(f"interrupted before sending; run the same command again: {_resume_command(args)}")
        return EXIT_INTERRUPTED
    if isinstance(error, BatchInputError):
        _say(f"error: {error}")
        if error.path == args.input:
            _say("fix these lines, or pass --skip-invalid to record them as error lines")
        return EXIT_USAGE
    if isinstance(error, ConfigurationError):
        _say(f"error: {error}")
        return EXIT_USAGE
    if isinstance(error, _BAD_PATH):
        _say(f"error: {error.strerror}: {error.filename}")
        return EXIT_USAGE
    if isinstance(error, SharedLimitError):
        _say(f"error: {error}; once it answers, run the same command: {_resume_command(args)}")
        return EXIT_STOPPED
    if isinstance(error, OutputWriteError):
        _say(f"error: {error}: {_resume_command(args)}")  # says what, where and how to resume
        return EXIT_STOPPED
    if isinstance(error, OSError):
        # At run time (disk full, read-only, I/O error): lines written are whole.
        where = f"{error.filename}: " if error.filename is not None else ""
        _say(
            f"error: {where}{error.strerror or error}; rerun the same command to resume "
            f"once that is fixed (every line written is whole): {_resume_command(args)}"
        )
        return EXIT_STOPPED
    _say(f"error: {type(error).__name__}: {error}; rerun the same command to resume")
    return EXIT_ERROR


def _has_requests(path: str) -> bool:
    """Whether ``path`` holds a line that is not blank (reads up to the first one)."""
    with open(path, "rb") as file:
        return any(not line.isspace() for line in file)


@contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ignore Ctrl-C in the block: the run is over, and its report takes milliseconds.

    A Ctrl-C then would lose the summary and the resume command for nothing.
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _only_interrupts(exc: BaseException) -> bool:
    leaves = _leaves(exc)
    return bool(leaves) and all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves)


def run_batch_command(args: argparse.Namespace) -> int:
    """Run ``trio-llm batch`` as parsed into ``args``; return the exit status."""
    finished: list[BatchSummary] = []
    if args.cancel and args.via != "provider":
        _say("error: --cancel cancels a job's batches at the provider: add --via provider")
        return EXIT_USAGE
    if args.via == "provider":
        for flag, why in _NOT_WITH.items():
            if getattr(args, flag[2:].replace("-", "_")):
                _say(f"error: --via provider {why}: drop {flag}")
                return EXIT_USAGE
    try:
        if not _has_requests(args.input):
            _say(f"error: {args.input} holds no requests (it is empty, or blank); nothing to do")
            return EXIT_USAGE
        summary = trio.run(_batch, args, finished)
    except BaseException as exc:
        if not (finished and _only_interrupts(exc)):
            return _report_failure(exc, args)
        summary = finished[0]  # Ctrl-C as the client closed: the run itself had ended
    with _interrupts_ignored():
        try:
            print_summary(summary)
        except KeyboardInterrupt:
            pass  # the run is over: the table is a courtesy; the status line still says how
        return _exit_status(summary, args)
