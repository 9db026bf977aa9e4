"""Shared fixtures: a fake LLM server on 127.0.0.1 and an environment with no real keys."""

from __future__ import annotations

import gc
import importlib.util
import logging
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from trio_llm.testing import FakeLLMServer, open_fake_llm
from trio_llm.testing._redis_server import RedisServer, RedisServerError, required


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


#: The warning of coredis's streams left unclosed by a failed connection attempt.
UNCLOSED_STREAM = "Unclosed <MemoryObject"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free 127.0.0.1 port, its files in a temporary directory.

    Skipped when redis-server or the redis extra is missing, unless ``$CI`` is set: then
    the test fails, so that CI never passes with these tests silently skipped.

    coredis 6.9 leaves six anyio memory streams unclosed for each connection attempt
    that fails (``BaseConnection.run`` creates them before connecting), which warns when
    they are collected: the tests that take Redis away mark that warning ignored, and it
    is ignored here while they are collected, so that it cannot fail a later test.
    """
    problem = None
    if importlib.util.find_spec("coredis") is None:
        problem = "the redis extra (coredis) is not installed: pip install -e '.[dev]'"
    else:
        try:
            server = RedisServer(tmp_path)
            server.start()
        except RedisServerError as exc:
            problem = str(exc)
    if problem is not None:
        if required():
            pytest.fail(f"$CI is set and Redis cannot be used: {problem}")
        pytest.skip(problem)
    try:
        yield server
    finally:
        server.kill()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", UNCLOSED_STREAM, ResourceWarning)
            gc.collect()
