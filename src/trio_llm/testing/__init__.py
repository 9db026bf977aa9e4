"""A fake OpenAI-compatible (and Anthropic Messages) LLM server for tests, demos and benchmarks.

>>> async with open_fake_llm(FakeLLMConfig(latency=0.2, error_rate=0.1)) as server:
...     ...  # point a client at server.base_url; read server.stats afterwards

Replies are deterministic: the text depends only on the conversation's text, ``max_tokens``
and the seed. Faults (errors, stalls, cut connections), pacing and rate limits come from
``FakeLLMConfig``.
"""

from ._config import FakeLLMConfig as FakeLLMConfig
from ._server import FakeLLMServer as FakeLLMServer
from ._server import open_fake_llm as open_fake_llm
from ._server import serve_fake_llm as serve_fake_llm
from ._stats import FakeLLMStats as FakeLLMStats

__all__ = [
    "FakeLLMConfig",
    "FakeLLMServer",
    "FakeLLMStats",
    "open_fake_llm",
    "serve_fake_llm",
]
