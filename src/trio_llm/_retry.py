"""Retries through stamina, inside a trio cancel scope that enforces the deadline.

The deadline is one cancel scope around the whole call, every attempt and wait included.
A client with several endpoints fails over here: after a retryable failure, when another
endpoint can take the call at once, the next attempt goes there without waiting (an
attempt like any other: the policy's attempts and deadline bound them all). The first
attempt runs bare: stamina costs ~16-30 us per call even when nothing fails, so
it is entered only after a retryable failure, which becomes the outcome of its first
attempt. The policy, the waits and stamina's instrumentation are the same either way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Final, Protocol, TypeVar, final

import stamina
import trio

from ._config import RetryPolicy
from ._errors import (
    APIConnectionError,
    APIStatusError,
    LLMError,
    RetryDeadlineExceeded,
)

__all__ = ["Call", "Stats", "call_with_retries", "is_retryable"]

T = TypeVar("T")

logger = logging.getLogger("trio_llm.retry")

# Statuses that say "try again later"; 501 and 505 are server errors no retry can fix.
_RETRIED_STATUSES = frozenset({408, 409, 429})
_NEVER_RETRIED_5XX = frozenset({501, 505})

_NO_SCOPE: Final = nullcontext()


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed attempt may be retried (never for ``Cancelled`` or non-LLM errors)."""
    if isinstance(exc, APIStatusError):
        if exc.should_retry is not None:
            return exc.should_retry
        status = exc.status_code
        return status in _RETRIED_STATUSES or (status >= 500 and status not in _NEVER_RETRIED_5XX)
    return isinstance(exc, APIConnectionError)


class Call(Protocol):
    """What the retry loop reads of the call it repeats."""

    @property
    def label(self) -> str:
        """What the call is, for log records and messages (``"POST <url>"``)."""
        ...

    @property
    def waiting_for(self) -> str:
        """What the attempt in flight is waiting for now (``"a concurrency slot"``, ...)."""
        ...

    #: The trio time the call's deadline scope fires (``inf``: none), set by the loop: the
    #: attempts need no phase timeout that could only end after it.
    deadline_at: float

    @property
    def endpoint(self) -> str:
        """The name of the endpoint the latest attempt went to."""
        ...

    def can_fail_over(self) -> bool:
        """Whether another endpoint (one that has not failed the call) can take it now."""
        ...


class Stats(Protocol):
    """Where the retry loop counts what happened."""

    def count_retry(self, error: LLMError) -> None:
        """Count a retry decided after ``error``."""
        ...

    def count_failure(self, error: LLMError) -> None:
        """Count a call that failed with ``error`` (after its last attempt)."""
        ...


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy | None,
    *,
    call: Call,
    stats: Stats,
) -> T:
    """Run ``attempt`` under ``policy``: retried on retryable errors, within its deadline.

    The deadline is one cancel scope around every attempt and wait, the first attempt
    included. The first attempt runs without stamina (it costs ~16-30 us per call even
    when nothing fails); only a retryable failure enters it, as its first attempt's
    outcome, so the waits, attempts and instrumentation are stamina's own.

    Args:
        attempt: makes one attempt; raises an :class:`LLMError` on failure.
        policy: the retry policy; ``None`` runs one attempt with no deadline.
        call: the call being made, for messages (see :class:`Call`).
        stats: counts each retry decided and the call's failure.

    Raises:
        RetryDeadlineExceeded: the deadline passed (the last error chained, or the
            message says what the call was waiting for), or a server-requested wait
            would end past it.
        LLMError: the last attempt's error, when it was not retryable or the attempts
            ran out.

    Cancellation: a cancel scope of the caller cancels the attempt in flight or the wait;
    nothing is retried after it.
    """
    try:
        if policy is None:
            return await attempt()
        deadline = policy.deadline
        progress = _Progress()
        # No scope without a deadline: a scope costs CPU and memory per call in flight.
        with trio.move_on_after(deadline) if deadline is not None else _NO_SCOPE as scope:
            deadline_at = math.inf if scope is None else scope.deadline
            call.deadline_at = deadline_at
            try:
                return await attempt()
            except LLMError as exc:
                if policy.attempts == 1 or not is_retryable(exc):
                    raise
                first_error = exc
            return await _retry(attempt, policy, first_error, progress, deadline_at, call, stats)
        # Only reached when the deadline's cancel scope fired.
        assert deadline is not None
        raise _deadline_passed(call, deadline, progress) from progress.last_error
    except LLMError as exc:
        stats.count_failure(exc)
        raise


def _deadline_passed(call: Call, deadline: float, progress: _Progress) -> RetryDeadlineExceeded:
    last_error = progress.last_error
    what = (
        f"last error: {type(last_error).__name__}: {last_error}"
        if last_error
        else f"no response yet: waiting for {call.waiting_for}"
    )
    return RetryDeadlineExceeded(
        f"{call.label}: deadline of {deadline:g} s passed "
        f"({progress.attempts} attempt(s) started; {what})",
        deadline=deadline,
        attempts=progress.attempts,
        last_error=last_error,
    )


@final
class _Progress:
    """How far a call has got: attempts started, and the last retryable error."""

    __slots__ = ("attempts", "last_error")

    def __init__(self) -> None:
        self.attempts = 1
        self.last_error: LLMError | None = None


async def _retry(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    first_error: LLMError,
    progress: _Progress,
    deadline_at: float,
    call: Call,
    stats: Stats,
) -> T:
    """Retry after the retryable ``first_error``, through stamina.

    ``deadline_at`` is the trio time the deadline's scope fires: a wait that would end
    past it is not started.
    """
    progress.last_error = first_error
    pending: LLMError | None = first_error
    past_deadline: list[float] = []

    def decide(exc: Exception) -> bool | float:
        if not isinstance(exc, LLMError) or not is_retryable(exc):
            return False
        progress.last_error = exc
        attempts = progress.attempts
        if attempts >= policy.attempts:
            return False
        if call.can_fail_over():
            # Another endpoint can take it now: no wait (the failed one's pause or
            # cooldown keeps the traffic away from it meanwhile).
            stats.count_retry(exc)
            _log(call, attempts, policy, exc, "failing over to another endpoint at once")
            return 0.0
        requested = exc.retry_after if isinstance(exc, APIStatusError) else None
        shortest = (
            requested
            if requested is not None
            else min(policy.wait_max, policy.wait_initial * 2.0 ** (attempts - 1))
        )
        if trio.current_time() + shortest > deadline_at:
            past_deadline.append(shortest)
            return False
        stats.count_retry(exc)
        why = (
            f"server asked for {requested:g} s"
            if requested is not None
            else f"backoff of at least {shortest:g} s"
        )
        _log(call, attempts, policy, exc, f"waiting ({why})")
        return requested if requested is not None else True

    try:
        async for retry in stamina.retry_context(
            on=decide,
            attempts=policy.attempts,
            timeout=None,  # stamina's timeout counts wall time; the deadline is our scope
            wait_initial=policy.wait_initial,
            wait_max=policy.wait_max,
            wait_jitter=policy.wait_jitter,
        ):
            with retry:
                if pending is not None:  # replay the bare first attempt's failure
                    error, pending = pending, None
                    raise error
                progress.attempts += 1
                return await attempt()
    except LLMError as exc:
        if past_deadline:
            raise RetryDeadlineExceeded(
                f"{call.label}: not retried after attempt {progress.attempts}: the wait "
                f"({past_deadline[0]:g} s) would pass the {policy.deadline:g} s deadline; "
                f"last error: {type(exc).__name__}: {exc}",
                deadline=policy.deadline or math.inf,
                attempts=progress.attempts,
                last_error=exc,
            ) from exc
        raise
    raise AssertionError("unreachable: stamina raises the last attempt's error")  # pragma: no cover


def _log(call: Call, attempts: int, policy: RetryPolicy, error: LLMError, then: str) -> None:
    """Log a retry decided after attempt ``attempts`` failed with ``error``.

    The record's ``endpoint`` attribute names the endpoint that failed.
    """
    if logger.isEnabledFor(logging.INFO):
        endpoint = call.endpoint
        logger.info(
            "retrying %s: attempt %d of %d failed at endpoint %s with %s: %s; %s",
            call.label,
            attempts,
            policy.attempts,
            endpoint,
            type(error).__name__,
            error,
            then,
            extra={"endpoint": endpoint},
        )
