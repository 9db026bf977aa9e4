"""Token estimates: what a request will cost a tokens-per-minute limit, before it is sent.

A rate limiter reserves the estimate before sending; the reply's real usage corrects it
(:meth:`trio_llm._ratelimit.Reservation.reconcile`).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_COMPLETION_TOKENS", "estimate_tokens", "token_bounds"]

DEFAULT_COMPLETION_TOKENS = 256
"""Completion tokens assumed for a chat request that sets no ``max_tokens``."""

_CHARS_PER_TOKEN = 4
# OpenAI's accounting: each message costs a few tokens of framing, the reply 3 of priming.
_TOKENS_PER_MESSAGE = 4
_TOKENS_REPLY_PRIMING = 3
# Images, audio and documents are counted as one 1024x1024 high-detail image; their bytes
# are not text. Reconciling with the real usage corrects the guess.
_TOKENS_PER_MEDIA_PART = 765
_MEDIA_TYPES = frozenset(
    {"image_url", "image", "input_image", "input_audio", "audio", "document", "file"}
)
# Framing the per-message overhead already covers.
_SKIPPED_KEYS = frozenset({"role", "type", "cache_control"})


@functools.cache
def _tiktoken_encoding() -> Any:
    """tiktoken's ``o200k_base`` encoding, or None if tiktoken is missing or cannot load it."""
    try:
        tiktoken = importlib.import_module("tiktoken")
        return tiktoken.get_encoding("o200k_base")
    except Exception:  # not installed, or its BPE file is neither cached nor downloadable
        return None


def _collect(value: object, texts: list[str]) -> int:
    """Append the text strings inside ``value`` to ``texts``; return tokens for media."""
    if isinstance(value, str):
        texts.append(value)
        return 0
    fixed = 0
    # Lists first, and dicts by their exact type: an isinstance() against an ABC costs
    # more than the rest of a call, and the estimate runs for every request.
    if isinstance(value, (list, tuple)):
        for item in value:
            fixed += _collect(item, texts)
    elif type(value) is dict or isinstance(value, Mapping):
        if value.get("type") in _MEDIA_TYPES:
            return _TOKENS_PER_MEDIA_PART
        for key, item in value.items():
            if key not in _SKIPPED_KEYS:
                fixed += _collect(item, texts)
    return fixed


def _count_text(texts: list[str]) -> int:
    encoding = _tiktoken_encoding()
    if encoding is not None:
        return sum(len(encoding.encode(text, disallowed_special=())) for text in texts)
    return math.ceil(sum(map(len, texts)) / _CHARS_PER_TOKEN)


def _non_negative_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Estimate the tokens a request will use, before sending it.

    The prompt counts ``ceil(characters / 4)`` of its text (message contents, content-part
    lists, names, tool calls, a top-level ``system`` prompt, tool definitions), plus 4 tokens per
    message and 3 for the reply, plus 765 per image, audio or document part. When
    `tiktoken <https://github.com/openai/tiktoken>`_ is installed and can load
    ``o200k_base`` (the first call may block while it does), the text is counted with it
    instead. The completion counts ``max_completion_tokens`` or ``max_tokens`` (times
    ``n``), or :data:`DEFAULT_COMPLETION_TOKENS` when neither is set. An embeddings body
    (``input``) counts its input only; token-id inputs count exactly.

    Reconcile the estimate with the response's real usage (:meth:`Reservation.reconcile`).
    """
    texts: list[str] = []
    fixed = _collect_prompt(body, ("system", "prompt"), texts)
    if _embeddings(body):
        return fixed + _count_input(body["input"])
    completion = _requested_completion(body)
    if completion is None:
        completion = DEFAULT_COMPLETION_TOKENS * (_non_negative_int(body.get("n")) or 1)
    return fixed + _count_text(texts) + completion


def _collect_prompt(body: Mapping[str, Any], keys: tuple[str, ...], texts: list[str]) -> int:
    """Add the prompt's texts (messages, ``keys``, tool schemas) to ``texts``; return the
    tokens counted without them (message framing, media parts)."""
    fixed = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        fixed += _TOKENS_REPLY_PRIMING + _TOKENS_PER_MESSAGE * len(messages)
        fixed += _collect(messages, texts)
    for key in keys:
        fixed += _collect(body.get(key), texts)
    tools = body.get("tools")
    if tools:
        # Schemas count by their JSON: keys and punctuation are tokens too.
        texts.append(json.dumps(tools, separators=(",", ":"), default=str))
    return fixed


def _embeddings(body: Mapping[str, Any]) -> bool:
    """Whether ``body`` is an embeddings request (``input``, no messages, no prompt)."""
    return "input" in body and body.get("messages") is None and "prompt" not in body


def _requested_completion(body: Mapping[str, Any]) -> int | None:
    """``max_completion_tokens`` or ``max_tokens``, times ``n``; ``None`` if neither is set."""
    completion = _non_negative_int(body.get("max_completion_tokens"))
    if completion is None:
        completion = _non_negative_int(body.get("max_tokens"))
    if completion is None:
        return None
    return completion * (_non_negative_int(body.get("n")) or 1)


def token_bounds(body: Mapping[str, Any], *, default_completion: int) -> tuple[int, int]:
    """Bound the prompt and completion tokens of a request, before sending it (a budget's).

    The prompt counts the UTF-8 bytes of its text, which no byte-level tokenizer exceeds
    (each token is at least one byte), plus the framing and media parts counted as in
    :func:`estimate_tokens` (a media part's 765 tokens are an estimate, not a bound). The
    completion counts ``max_completion_tokens`` or ``max_tokens`` (times ``n``), else
    ``default_completion``; an embeddings body (``input``) has none.
    """
    texts: list[str] = []
    fixed = _collect_prompt(body, ("system", "prompt", "input"), texts)
    if isinstance(body.get("input"), list):  # token ids: one token each
        fixed += sum(len(x) if isinstance(x, list) else 1 for x in body["input"])
    prompt = fixed + sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if _embeddings(body):
        return prompt, 0
    completion = _requested_completion(body)
    return prompt, default_completion if completion is None else completion


def _count_input(value: object) -> int:
    """Tokens of an embeddings ``input``: text, a token-id list, or a list of either."""
    if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
        return len(value)
    if isinstance(value, list) and all(isinstance(x, list) for x in value):
        return sum(_count_input(x) for x in value)
    texts: list[str] = []
    fixed = _collect(value, texts)
    return fixed + _count_text(texts)
