"""The ``trio-llm serve`` command: flags, the client, signals and graceful shutdown."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from typing import Any

import trio

from .._cli_options import (
    DEFAULT_MODEL,
    EXIT_OK,
    add_endpoints_option,
    add_price_option,
    add_shared_limit_options,
    api_key_from_env,
    cannot_listen,
    cli_endpoints,
    cli_prices,
    non_negative_float,
    port_number,
    positive_float,
    positive_int,
    required_env,
    shared_rate_limit,
    variable_name,
)
from .._client import open_client
from .._config import RetryPolicy
from .._errors import ConfigurationError, redact_url
from .._ratelimit import RateLimit
from ._request import DEFAULT_MAX_BODY_BYTES

__all__ = ["add_serve_parser", "run_serve_command"]

_DESCRIPTION = """\
Serve an OpenAI-compatible gateway in front of UPSTREAM: POST /v1/chat/completions
(JSON and SSE), POST /v1/embeddings, GET /v1/models, POST /generate, GET /healthz and
GET /metrics. Every caller shares one concurrency cap, one rate limit and one retry
policy towards the upstream. SIGINT or SIGTERM stops accepting connections and gives
requests in flight --grace seconds. Needs the 'serve' extra: pip install 'trio-llm[serve]'.
Example: trio-llm serve --upstream https://api.openai.com/v1 --port 8000 --rpm 500"""


def add_serve_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the ``serve`` subcommand to the ``trio-llm`` parser's ``subparsers``."""
    parser = subparsers.add_parser(
        "serve",
        help="run an OpenAI-compatible gateway with shared limits in front of an API",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    upstream = parser.add_argument_group("upstream")
    where = upstream.add_mutually_exclusive_group(required=True)
    where.add_argument("--upstream", metavar="URL", help="the upstream API root, e.g. .../v1")
    add_endpoints_option(where)
    upstream.add_argument(
        "--api-key-env",
        metavar="NAME",
        type=variable_name,
        help="environment variable holding the upstream API key (default: OPENAI_API_KEY; "
        "optional for an upstream on a loopback address)",
    )
    upstream.add_argument(
        "--model",
        metavar="MODEL",
        help=f"model for requests that name none (default: $TRIO_LLM_MODEL or {DEFAULT_MODEL})",
    )
    upstream.add_argument(
        "--concurrency",
        metavar="N",
        type=positive_int,
        default=64,
        help="upstream requests in flight at once (default: %(default)s)",
    )
    upstream.add_argument(
        "--rpm", metavar="N", type=positive_float, help="upstream requests per minute"
    )
    upstream.add_argument(
        "--tpm", metavar="N", type=positive_float, help="upstream tokens per minute"
    )
    upstream.add_argument(
        "--max-attempts",
        metavar="N",
        type=positive_int,
        default=3,
        help="attempts per upstream call, the first included (default: %(default)s)",
    )
    add_shared_limit_options(parser)
    add_price_option(upstream)
    _add_server_options(parser.add_argument_group("server"))


def _add_server_options(server: argparse._ArgumentGroup) -> None:
    """Add the options of the gateway's own side: address, inbound key, limits, logs."""
    server.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    server.add_argument(
        "--port",
        type=port_number,
        default=8000,
        help="port, 0 to 65535; 0 picks a free one (default: %(default)s)",
    )
    server.add_argument(
        "--require-key-env",
        metavar="NAME",
        type=variable_name,
        help="environment variable holding the key callers must send as "
        "'Authorization: Bearer KEY' (default: no inbound auth)",
    )
    server.add_argument(
        "--max-body-bytes",
        metavar="BYTES",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; larger ones get 413 (default: %(default)s = 4 MiB)",
    )
    server.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log one line per request (client, method, path, status, duration) on stderr",
    )
    server.add_argument(
        "--grace",
        metavar="SECONDS",
        type=non_negative_float,
        default=30.0,
        help="after SIGINT or SIGTERM, how long requests in flight may finish "
        "(default: %(default)s)",
    )


async def _serve(args: argparse.Namespace) -> int:
    from ._app import create_app
    from ._logs import configure_logging
    from ._runner import serve

    configure_logging(verbose=args.verbose)

    require_key = (
        required_env(args.require_key_env, "--require-key-env") if args.require_key_env else None
    )
    endpoints = cli_endpoints(args, url_flag="--upstream")
    where: dict[str, Any] = {"endpoints": endpoints}
    if endpoints is None:
        where = {
            "base_url": args.upstream,
            "api_key": api_key_from_env(
                args.api_key_env, provider="openai", base_url=args.upstream
            ),
        }
    model = args.model or os.environ.get("TRIO_LLM_MODEL") or DEFAULT_MODEL
    async with open_client(
        **where,
        model=model,
        max_concurrency=args.concurrency,
        retry=RetryPolicy(attempts=args.max_attempts),
        rate_limit=shared_rate_limit(
            args, RateLimit(requests_per_minute=args.rpm, tokens_per_minute=args.tpm)
        ),
        prices=cli_prices(args.price),
    ) as client:
        app = create_app(client, require_key=require_key, max_body_bytes=args.max_body_bytes)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def wait_for_signal() -> None:
                async for signum in signals:
                    print(
                        f"trio-llm serve: {signal.Signals(signum).name}: stopping "
                        f"(in-flight requests get {args.grace:g} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                    return

            async with trio.open_nursery() as nursery:
                try:
                    url = await nursery.start(
                        functools.partial(
                            serve,
                            app,
                            host=args.host,
                            port=args.port,
                            shutdown_trigger=wait_for_signal,
                            grace=args.grace,
                        )
                    )
                except OSError as exc:  # raised before listening: the bind failed
                    raise cannot_listen(args.host, args.port, exc) from exc
                upstream = (
                    redact_url(client.base_url)
                    if endpoints is None
                    else f"{len(endpoints)} endpoints ({', '.join(e.name for e in endpoints)})"
                )
                print(
                    f"trio-llm serve: gateway to {upstream} listening on {url} (Ctrl-C to stop)",
                    flush=True,
                )
    print("trio-llm serve: stopped", file=sys.stderr, flush=True)
    return EXIT_OK


def run_serve_command(args: argparse.Namespace) -> int:
    """Run ``trio-llm serve`` with parsed ``args``; return the exit status."""
    try:
        import fastapi  # noqa: F401
        import hypercorn.trio  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the test environment has the extra
        raise ConfigurationError(
            f"{exc}: 'trio-llm serve' needs the serve extra: pip install 'trio-llm[serve]'"
        ) from None
    return trio.run(_serve, args)
