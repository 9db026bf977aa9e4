"""What the gateway's ``GET /metrics`` reports: response counts, and their Prometheus text."""

from __future__ import annotations

from collections import Counter
from typing import Final, final

import attrs
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._client import Client

__all__ = ["RequestCounter", "metrics_text"]

# The gateway's routes; any other path is counted as "other", so that probing random
# paths cannot grow the counters without bound.
_ROUTES: Final = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/generate",
    "/healthz",
    "/metrics",
)

_STAT_HELP: Final = {
    "in_flight": ("gauge", "Upstream requests holding a concurrency slot."),
    "waiting": ("gauge", "Upstream requests waiting for a slot or rate-limit capacity."),
    "max_concurrency": ("gauge", "The upstream concurrency limit."),
    "sent": ("counter", "Upstream HTTP attempts started."),
    "succeeded": ("counter", "Upstream calls that returned a result."),
    "failed": ("counter", "Upstream calls that raised an error."),
    "retried": ("counter", "Upstream retry attempts."),
    "rate_limited": ("counter", "429 responses received from upstream."),
    "prompt_tokens": ("counter", "Prompt tokens reported by upstream."),
    "completion_tokens": ("counter", "Completion tokens reported by upstream."),
    "unpriced": ("counter", "Upstream replies with no known price (not in the cost)."),
}


# Per endpoint of the gateway's client (trio_llm.Endpoint): the record's field, its kind.
_ENDPOINT_HELP: Final = {
    "up": ("gauge", "1 if the endpoint takes traffic, 0 while it cools down or is probed."),
    "in_flight": ("gauge", "Upstream requests in flight to the endpoint."),
    "sent": ("counter", "Upstream HTTP attempts sent to the endpoint."),
    "succeeded": ("counter", "Replies the endpoint gave in full."),
    "failed": ("counter", "Attempts that failed at the endpoint."),
    "rate_limited": ("counter", "429 responses from the endpoint."),
    "latency_seconds": ("gauge", "The endpoint's recent latency (exponential average)."),
}


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _endpoint_lines(client: Client) -> list[str]:
    """The per-endpoint metrics of ``client.statistics().endpoints``."""
    lines = []
    endpoints = client.statistics().endpoints
    for name, (kind, help_text) in _ENDPOINT_HELP.items():
        metric = f"trio_llm_endpoint_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        for stats in endpoints:
            if name == "up":
                value: object = int(stats.state == "up")
            elif name == "latency_seconds":
                value = "NaN" if stats.latency is None else f"{stats.latency:.6f}"
            else:
                value = getattr(stats, name)
            lines.append(f'{metric}{{endpoint="{_label(stats.name)}"}} {value}')
    return lines


@final
class RequestCounter:
    """Pure ASGI middleware: count responses by route and status for ``/metrics``."""

    def __init__(self, app: ASGIApp, *, counts: Counter[tuple[str, int]]) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in _ROUTES else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counts[route, int(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def metrics_text(
    client: Client, counts: Counter[tuple[str, int]], *, logged: int, dropped: int
) -> str:
    """Render the client's statistics (and its endpoints') and the gateway's counters.

    As Prometheus text.

    Args:
        client: the gateway's client (its :meth:`~trio_llm.Client.statistics`).
        counts: responses by (route, status), as :class:`RequestCounter` counts them.
        logged: generation records the background logger handled.
        dropped: generation records dropped because the log queue was full.
    """
    lines = []
    stats = attrs.asdict(client.statistics())
    for name, (kind, help_text) in _STAT_HELP.items():
        metric = f"trio_llm_client_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        lines.append(f"{metric} {stats[name]}")
    if stats["cost"] is not None:  # absent, never a guess, when a reply has no price
        lines += [
            "# HELP trio_llm_client_cost_usd_total What upstream replies cost, in USD.",
            "# TYPE trio_llm_client_cost_usd_total counter",
            f"trio_llm_client_cost_usd_total {stats['cost']!r}",
        ]
    lines += _endpoint_lines(client)
    lines += [
        "# HELP trio_llm_serve_requests_total Gateway responses by route and status.",
        "# TYPE trio_llm_serve_requests_total counter",
    ]
    for (route, status), count in sorted(counts.items()):
        lines.append(f'trio_llm_serve_requests_total{{route="{route}",status="{status}"}} {count}')
    lines += [
        "# HELP trio_llm_serve_generations_logged_total Records the background logger handled.",
        "# TYPE trio_llm_serve_generations_logged_total counter",
        f"trio_llm_serve_generations_logged_total {logged}",
        "# HELP trio_llm_serve_generations_dropped_total Records dropped: log queue full.",
        "# TYPE trio_llm_serve_generations_dropped_total counter",
        f"trio_llm_serve_generations_dropped_total {dropped}",
    ]
    return "\n".join(lines) + "\n"
