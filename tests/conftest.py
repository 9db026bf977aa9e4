"""Shared fixtures: a fake LLM server on 127.0.0.1 and an environment with no real keys."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from trio_llm.testing import FakeLLMServer, open_fake_llm


@pytest.fixture(autouse=True)
def _no_real_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's real keys and URLs out of every test."""
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "TRIO_LLM_MODEL",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _trio_llm_logging_restored() -> Iterator[None]:
    """Undo what a command run in-process did to trio-llm's loggers (levels, handlers)."""
    names = ("trio_llm", "trio_llm.testing", "stamina")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    handlers = list(logging.getLogger("trio_llm").handlers)
    yield
    for logger, level in saved:
        logger.setLevel(level)
    logging.getLogger("trio_llm").handlers[:] = handlers


@pytest.fixture(autouse=True)
def _opentelemetry_unset() -> Iterator[None]:
    """Forget OpenTelemetry providers a test (or a docs example) set: later tests run untraced.

    The API sets its global providers once per process; this undoes it as OpenTelemetry's
    own test utilities do, through its private globals.
    """
    yield
    trace = sys.modules.get("opentelemetry.trace")
    if trace is not None and trace._TRACER_PROVIDER is not None:
        from opentelemetry.util._once import Once

        getattr(trace._TRACER_PROVIDER, "shutdown", lambda: None)()
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None
    metrics = sys.modules.get("opentelemetry.metrics._internal")
    if metrics is not None and metrics._METER_PROVIDER is not None:
        from opentelemetry.util._once import Once

        getattr(metrics._METER_PROVIDER, "shutdown", lambda: None)()
        metrics._METER_PROVIDER_SET_ONCE = Once()
        metrics._METER_PROVIDER = None


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLMServer]:
    """A fake LLM server with default behaviour (instant, no faults)."""
    async with open_fake_llm() as server:
        yield server
