"""A fake LLM server for tests, examples, benchmarks and offline demos.

A real HTTP/1.1 server (``h11`` on trio sockets) that speaks the OpenAI wire format::

    async with open_fake_llm(FakeLLMConfig(latency=0.2, error_rate=0.1)) as server:
        ...  # point any OpenAI-compatible client at server.base_url
        print(server.stats.requests_by_status)

Endpoints: ``POST /v1/chat/completions`` (JSON, or SSE with ``stream: true``; ``n``,
``max_tokens``/``max_completion_tokens``, ``tools``/``tool_choice``, ``response_format``
``json_object``/``json_schema``, ``stream_options.include_usage``), ``POST /v1/embeddings``
(float or base64, ``dimensions``), ``GET /v1/models`` and ``GET /v1/models/{id}``, and
Anthropic's ``POST /v1/messages`` (JSON and SSE; base URL ``server.root_url``), and the
provider Batch APIs: OpenAI ``/v1/files`` and ``/v1/batches``, Anthropic
``/v1/messages/batches`` (lines answered like the online endpoints, after
``batch_delay``; files and results kept in memory; ``server.hold(route)`` for crash tests).

Replies are deterministic: the text depends only on the conversation's text (message
contents, strings or text parts, joined), ``max_tokens`` and the seed; never on ``stream``.
Token counts use a documented fake tokenizer: a token is ``\\w+`` or one other non-space
character; a prompt costs its tokens plus 3 per message plus 3.

Checks and faults, in order: authentication (401, when ``api_key`` is set), validation
(400), the server's RPM/TPM limits (429, with ``x-ratelimit-*`` headers), then drawn from a
``random.Random(seed)``: an injected ``error_status``, a stall, latency and generation pace,
a connection cut mid-response. ``GET /v1/models`` is never faulted or rate-limited.
``invalid_structured_replies`` breaks the schema of structured replies (JSON schema
response formats, forced tool calls) for the first tries of each conversation, so that
repair loops can be tested.

For tests against a real model, :func:`open_replay_client` records its replies once in a
response cache file and replays them after, offline.
"""

from .._errors import CacheMissError as CacheMissError
from ._config import FakeLLMConfig as FakeLLMConfig
from ._replay import open_replay_client as open_replay_client
from ._server import FakeLLMServer as FakeLLMServer
from ._server import open_fake_llm as open_fake_llm
from ._server import serve_fake_llm as serve_fake_llm
from ._stats import FakeLLMStats as FakeLLMStats

__all__ = [
    "CacheMissError",
    "FakeLLMConfig",
    "FakeLLMServer",
    "FakeLLMStats",
    "open_fake_llm",
    "open_replay_client",
    "serve_fake_llm",
]
