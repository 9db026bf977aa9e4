"""Live counters of what the fake LLM server did."""

from __future__ import annotations

from typing import final

import attrs


@final
@attrs.define(kw_only=True)
class FakeLLMStats:
    """Counters that the fake server updates as it works (a live object, not a snapshot).

    Attributes:
        total_requests: Requests whose head was read, whatever happened next.
        requests_by_status: Responses by HTTP status, counted when the status line is sent
            (stalled requests and clients that left before it are not counted here).
        requests_by_endpoint: Requests by path (``"/v1/chat/completions"``, ...), Batch API
            requests by route template (``"/v1/batches/{batch_id}"``); unknown paths count
            as ``"other"``.
        in_flight: Requests being handled right now.
        peak_concurrency: Highest ``in_flight`` seen.
        disconnects: Clients that went away before their response was complete (during
            latency, a stall, generation, or a write that failed).
        injected_errors: Requests answered with the configured ``error_status``.
        injected_disconnects: Responses the server cut off on purpose.
        stalls: Requests accepted and never answered on purpose.
        rate_limited: Requests refused with 429 by the server's own RPM/TPM limits.
        prompt_tokens: Prompt tokens of the successful responses completely sent.
        completion_tokens: Completion tokens of the successful responses completely sent.
        files_uploaded: Files stored by ``POST /v1/files``.
        batches_created: Batches created, by route (``"/v1/batches"``,
            ``"/v1/messages/batches"``); a create refused with an error is not counted.
        batch_lines: Lines of ended batches, whatever their outcome.
    """

    total_requests: int = 0
    requests_by_status: dict[int, int] = attrs.Factory(dict)
    requests_by_endpoint: dict[str, int] = attrs.Factory(dict)
    in_flight: int = 0
    peak_concurrency: int = 0
    disconnects: int = 0
    injected_errors: int = 0
    injected_disconnects: int = 0
    stalls: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    files_uploaded: int = 0
    batches_created: dict[str, int] = attrs.Factory(dict)
    batch_lines: int = 0
