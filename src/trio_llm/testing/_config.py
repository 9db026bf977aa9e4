"""Configuration of the fake LLM server: timing, faults and limits."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, final

import attrs


def _non_negative(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _fraction(_instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


def _positive_or_none(
    _instance: object, attribute: attrs.Attribute[Any], value: float | None
) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 or None, got {value!r}")


def _error_status(_instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 400 <= value <= 599:
        raise ValueError(f"{attribute.name} must be an HTTP error status (400-599), got {value}")


def _api_key(_instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not value:
        raise ValueError(f"{attribute.name} must be a non-empty string or None")


def _to_names(value: Iterable[str]) -> tuple[str, ...]:
    """Accept one model name or any iterable of names."""
    return (value,) if isinstance(value, str) else tuple(value)


def _models(_instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value or not all(isinstance(name, str) and name for name in value):
        raise ValueError(f"{attribute.name} must be a non-empty sequence of model names")


@final
@attrs.frozen(kw_only=True)
class FakeLLMConfig:
    """How the fake LLM server behaves.

    Every field carries ``metadata["help"]`` (one line) and optionally ``metadata["flag"]``
    (a short command-line flag), so a command line can be generated from
    ``attrs.fields(FakeLLMConfig)``. Change a running server's behaviour with
    ``server.config = attrs.evolve(server.config, ...)``: each request reads the config once,
    when it arrives.

    Timing: ``latency`` passes before the first byte; then a JSON reply waits
    ``completion_tokens / tokens_per_second`` (of its longest choice), while a stream
    waits ``1 / tokens_per_second`` before each token's chunk. Errors and 429s are immediate.

    Limits: ``requests_per_minute`` and ``tokens_per_minute`` are buckets of that capacity
    refilling continuously (``limit / 60`` per second); a request is charged one request and
    its prompt plus completion tokens when admitted.

    Faults, drawn per request from ``random.Random(seed)``: ``error_rate`` answers with
    ``error_status``; ``stall_rate`` never answers (until the client or the server goes);
    ``disconnect_rate`` sends half the body (or half the stream's events) and closes.

    Batch APIs (``/v1/batches``, ``/v1/messages/batches``): a batch reads the config once,
    when it is created. It ends ``batch_delay`` seconds (trio time) later: the first tenth
    validating (OpenAI), eight tenths answering its lines in order, the last tenth
    finalizing. ``batch_fail_rate`` and ``batch_expire_rate`` are drawn per batch;
    ``batch_error_rate`` and ``batch_line_expire_rate`` per line, from the same
    ``random.Random(seed)`` as the faults above. Batch lines are never rate-limited and never
    see ``error_rate``, ``stall_rate``, ``latency`` or ``disconnect_rate``.

    Repairs: with ``invalid_structured_replies=N``, a structured reply (``response_format``
    ``json_schema``, or the arguments of a forced tool call, through either API) breaks its
    schema while its conversation has fewer than N assistant turns; so a client that sends
    each bad reply back for repair gets N invalid values, then a valid one. Deterministic.
    """

    latency: float = attrs.field(
        default=0.0,
        validator=_non_negative,
        metadata={"help": "Seconds before the first byte of a response (time to first token)."},
    )
    tokens_per_second: float | None = attrs.field(
        default=None,
        validator=_positive_or_none,
        metadata={"help": "Generation pace in tokens per second; unset means instant replies."},
    )
    error_rate: float = attrs.field(
        default=0.0,
        validator=_fraction,
        metadata={"help": "Fraction of requests answered with error_status (0 to 1)."},
    )
    error_status: int = attrs.field(
        default=500,
        validator=_error_status,
        metadata={"help": "HTTP status of injected errors (400-599)."},
    )
    requests_per_minute: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.ge(1)),
        metadata={"help": "Server-side request limit per minute (429 beyond it).", "flag": "--rpm"},
    )
    tokens_per_minute: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.ge(1)),
        metadata={"help": "Server-side token limit per minute (429 beyond it).", "flag": "--tpm"},
    )
    stall_rate: float = attrs.field(
        default=0.0,
        validator=_fraction,
        metadata={"help": "Fraction of requests accepted and never answered (0 to 1)."},
    )
    disconnect_rate: float = attrs.field(
        default=0.0,
        validator=_fraction,
        metadata={"help": "Fraction of responses cut off mid-body or mid-stream (0 to 1)."},
    )
    seed: int = attrs.field(
        default=0,
        validator=attrs.validators.instance_of(int),
        metadata={"help": "Seed of the reply texts and of the fault decisions."},
    )
    api_key: str | None = attrs.field(
        default=None,
        validator=_api_key,
        repr=False,
        metadata={"help": "Require 'Authorization: Bearer KEY' on every request."},
    )
    invalid_structured_replies: int = attrs.field(
        default=0,
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)],
        metadata={
            "help": "Invalid structured replies (json_schema or a forced tool) per "
            "conversation before valid ones, counted by its assistant turns."
        },
    )
    models: tuple[str, ...] = attrs.field(
        default=("fake-gpt",),
        converter=_to_names,
        validator=_models,
        metadata={"help": "Model names listed by /v1/models (any name is accepted)."},
    )
    batch_delay: float = attrs.field(
        default=0.0,
        validator=_non_negative,
        metadata={
            "help": "Seconds a Batch API batch takes from creation to its end (validating, "
            "in progress, finalizing), in trio time."
        },
    )
    batch_error_rate: float = attrs.field(
        default=0.0,
        validator=_fraction,
        metadata={"help": "Fraction of batch lines answered with a 400 error (0 to 1)."},
    )
    batch_error_ids: tuple[str, ...] = attrs.field(
        default=(),
        converter=_to_names,
        metadata={"help": "custom_ids of batch lines answered with a 400 error."},
    )
    batch_line_expire_rate: float = attrs.field(
        default=0.0,
        validator=_fraction,
        metadata={
            "help": "Fraction of batch lines that expire unanswered (an OpenAI batch with "
            "one then ends 'expired')."
        },
    )
    batch_fail_rate: float = attrs.field(
        default=0.0,
        validator=_fraction,
        metadata={
            "help": "Fraction of batches that fail validation (OpenAI 'failed'; Anthropic: "
            "every request errored)."
        },
    )
    batch_expire_rate: float = attrs.field(
        default=0.0,
        validator=_fraction,
        metadata={"help": "Fraction of batches that expire with no line answered (0 to 1)."},
    )
    batch_poll_throttle: int = attrs.field(
        default=0,
        validator=attrs.validators.ge(0),
        metadata={
            "help": "The first N retrievals of each batch are answered 429 with Retry-After "
            "batch_retry_after."
        },
    )
    batch_retry_after: float = attrs.field(
        default=1.0,
        validator=_non_negative,
        metadata={"help": "Retry-After seconds of a throttled batch retrieval."},
    )


# Real types in attrs.fields(FakeLLMConfig)[...].type (not strings), for generated CLIs.
attrs.resolve_types(FakeLLMConfig)
