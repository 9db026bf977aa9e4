"""Retries through stamina, inside a trio cancel scope that enforces the deadline.

The first attempt runs bare: stamina costs ~30 us per call even when nothing fails, so it is
entered only after a retryable failure, which is then replayed into it as its first
attempt. The policy, the waits and stamina's instrumentation are the same either way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar, final

import stamina
import trio

from ._config import RetryPolicy
from ._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    LLMError,
    RetryDeadlineExceeded,
)

__all__ = ["call_with_retries", "is_retryable"]

T = TypeVar("T")

logger = logging.getLogger("trio_llm.retry")

# Statuses that say "try again later"; 501 and 505 are server errors no retry can fix.
_RETRIED_STATUSES = frozenset({408, 409, 429})
_NEVER_RETRIED_5XX = frozenset({501, 505})


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed attempt may be retried (never for ``Cancelled`` or non-LLM errors)."""
    if isinstance(exc, APIStatusError):
        if exc.should_retry is not None:
            return exc.should_retry
        status = exc.status_code
        return status in _RETRIED_STATUSES or (status >= 500 and status not in _NEVER_RETRIED_5XX)
    return isinstance(exc, APIConnectionError)


async def call_with_retries(
    attempt: Callable[[float], Awaitable[T]],
    policy: RetryPolicy | None,
    *,
    label: str,
    on_retry: Callable[[LLMError], None] | None = None,
    bounded: bool = False,
) -> T:
    """Run ``attempt`` under ``policy``: retried on retryable errors, within its deadline.

    Args:
        attempt: makes one attempt, given the deadline as a trio time (``math.inf`` for
            none); raises an :class:`LLMError` on failure.
        policy: the retry policy; ``None`` runs one attempt with no deadline.
        label: what the call is, for log records and messages (``"POST <url>"``).
        on_retry: called with the error each time a retry is decided.
        bounded: ``attempt`` itself ends by the deadline it is given (every wait and I/O
            timeout cut short to it, raising :class:`APITimeoutError`), so the first
            attempt needs no cancel scope: a scope costs CPU and about 0.8 KB per request
            in flight, and most calls succeed at once. Otherwise a scope enforces it.

    Raises:
        RetryDeadlineExceeded: the deadline passed, or a server-requested wait would
            end past it; the last error is chained.
        LLMError: the last attempt's error, when it was not retryable or the attempts
            ran out.

    Cancellation: a cancel scope of the caller cancels the attempt in flight or the wait;
    nothing is retried after it.
    """
    if policy is None:
        return await attempt(math.inf)
    deadline = policy.deadline
    if deadline is None or bounded:
        deadline_at = math.inf if deadline is None else trio.current_time() + deadline
        try:
            return await attempt(deadline_at)
        except LLMError as exc:
            if (
                deadline is not None
                and isinstance(exc, APITimeoutError)
                and trio.current_time() >= deadline_at
            ):
                # A wait the attempt cut short at the deadline: the deadline passed. (Any
                # other error stands: a reply that came in time is the call's outcome.)
                raise _deadline_passed(label, deadline, 1, None) from None
            if policy.attempts == 1 or not is_retryable(exc):
                raise
            first_error = exc
        if deadline is None:
            return await _retry(
                attempt, policy, first_error, _Progress(), deadline_at, label, on_retry
            )
        progress = _Progress()
        with trio.move_on_at(deadline_at):
            return await _retry(
                attempt, policy, first_error, progress, deadline_at, label, on_retry
            )
    else:
        progress = _Progress()
        deadline_at = trio.current_time() + deadline
        with trio.move_on_at(deadline_at):
            try:
                return await attempt(deadline_at)
            except LLMError as exc:
                if policy.attempts == 1 or not is_retryable(exc):
                    raise
                first_error = exc
            return await _retry(
                attempt, policy, first_error, progress, deadline_at, label, on_retry
            )
    # Only reached when the deadline's cancel scope fired.
    raise _deadline_passed(
        label, deadline, progress.attempts, progress.last_error
    ) from progress.last_error


def _deadline_passed(
    label: str, deadline: float, attempts: int, last_error: LLMError | None
) -> RetryDeadlineExceeded:
    what = f"{type(last_error).__name__}: {last_error}" if last_error else "no response yet"
    return RetryDeadlineExceeded(
        f"{label}: deadline of {deadline:g} s passed ({attempts} attempt(s) started; "
        f"last error: {what})",
        deadline=deadline,
        attempts=attempts,
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
    attempt: Callable[[float], Awaitable[T]],
    policy: RetryPolicy,
    first_error: LLMError,
    progress: _Progress,
    deadline_at: float,
    label: str,
    on_retry: Callable[[LLMError], None] | None,
) -> T:
    """Retry after the retryable ``first_error``, through stamina, until ``deadline_at``."""
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
        requested = exc.retry_after if isinstance(exc, APIStatusError) else None
        shortest = (
            requested
            if requested is not None
            else min(policy.wait_max, policy.wait_initial * 2.0 ** (attempts - 1))
        )
        if trio.current_time() + shortest > deadline_at:
            past_deadline.append(shortest)
            return False
        if on_retry is not None:
            on_retry(exc)
        if logger.isEnabledFor(logging.INFO):
            why = (
                f"server asked for {requested:g} s"
                if requested is not None
                else f"backoff of at least {shortest:g} s"
            )
            logger.info(
                "retrying %s: attempt %d of %d failed with %s: %s; waiting (%s)",
                label,
                attempts,
                policy.attempts,
                type(exc).__name__,
                exc,
                why,
            )
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
                return await attempt(deadline_at)
    except LLMError as exc:
        if past_deadline:
            raise RetryDeadlineExceeded(
                f"{label}: not retried after attempt {progress.attempts}: the wait "
                f"({past_deadline[0]:g} s) would pass the {policy.deadline:g} s deadline; "
                f"last error: {type(exc).__name__}: {exc}",
                deadline=policy.deadline or math.inf,
                attempts=progress.attempts,
                last_error=exc,
            ) from exc
        raise
    raise AssertionError("unreachable: stamina raises the last attempt's error")  # pragma: no cover
