"""One call's request, encoded once: what every attempt of the call sends."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from ._telemetry import CallTrace

__all__ = ["Request"]


@final
class Request:
    """One call's request, encoded once and sent by each attempt.

    ``waiting_for`` says what the call is waiting for now, for the message of a deadline
    that passes before any response; ``telemetry`` is the call's trace, if traced.
    """

    __slots__ = (
        "content",
        "deadline_at",
        "estimate",
        "model",
        "shown_url",
        "stream",
        "telemetry",
        "url",
        "waiting_for",
    )

    def __init__(
        self, url: str, content: bytes, estimate: int, *, stream: bool, shown_url: str
    ) -> None:
        self.url = url
        self.model = ""  # as the body names it, for pricing
        self.telemetry: CallTrace | None = None
        self.shown_url = shown_url  # the URL as messages show it: credentials redacted
        self.content = content
        self.estimate = estimate
        self.stream = stream
        self.waiting_for = "the response"
        self.deadline_at = math.inf  # the call's deadline, set by the retry loop

    @property
    def label(self) -> str:
        """What the request is, for messages: ``POST <url>``."""
        return f"POST {self.shown_url} (stream)" if self.stream else f"POST {self.shown_url}"
