"""Map-reduce summarisation: split long documents, summarise the parts concurrently, combine.

The classic "summarise 100 articles" job. Sizes are estimated at four characters per
token (good enough for English text and for staying under a context window with margin;
no tokenizer dependency). Documents are split on paragraph, then sentence, then word
boundaries. The combine step runs recursively: while the summaries joined together are
longer than ``chunk_tokens``, they are grouped into parts that fit and each part is
combined concurrently, then the results are combined again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, final

import attrs
import trio

from ._fanout import map_concurrently
from ._prompt import Prompt

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["MapReduceResult", "map_reduce", "split_text"]

CHARS_PER_TOKEN = 4
_SEPARATOR = "\n\n"
_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCES = re.compile(r"(?<=[.!?])\s+")


def estimate_tokens(text: str) -> int:
    """Estimate the tokens in ``text`` (four characters a token, at least one)."""
    return max(1, len(text) // CHARS_PER_TOKEN)


def _pieces(text: str, max_chars: int) -> Iterable[str]:
    """Yield pieces no longer than ``max_chars``, cut at the coarsest boundary that works."""
    for paragraph in _PARAGRAPHS.split(text):
        paragraph = paragraph.strip()
        if len(paragraph) <= max_chars:
            if paragraph:
                yield paragraph
            continue
        for sentence in _SENTENCES.split(paragraph):
            if len(sentence) <= max_chars:
                yield sentence
                continue
            words = sentence.split()
            line = ""
            for word in words:
                while len(word) > max_chars:  # one "word" longer than a chunk: cut it
                    if line:
                        yield line
                        line = ""
                    yield word[:max_chars]
                    word = word[max_chars:]
                if line and len(line) + 1 + len(word) > max_chars:
                    yield line
                    line = word
                else:
                    line = f"{line} {word}" if line else word
            if line:
                yield line


def _pack(pieces: Iterable[str], max_chars: int, separator: str) -> list[str]:
    """Join consecutive pieces into chunks no longer than ``max_chars`` (greedy)."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(separator) + len(piece) > max_chars:
            chunks.append(current)
            current = piece
        else:
            current = f"{current}{separator}{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def split_text(text: str, *, chunk_tokens: int) -> list[str]:
    """Split ``text`` into chunks of at most ``chunk_tokens`` (estimated), on natural boundaries.

    Paragraphs are kept whole when they fit, and consecutive ones are packed together; a
    paragraph too long is cut between sentences, a sentence too long between words.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    max_chars = chunk_tokens * CHARS_PER_TOKEN
    return _pack(_pieces(text, max_chars), max_chars, _SEPARATOR)


@final
@attrs.frozen(kw_only=True)
class MapReduceResult:
    """The outcome of :func:`map_reduce`.

    Attributes:
        text: the final combined summary.
        chunks: how many chunks the documents were split into (one map call each).
        map_calls: how many summarise calls were made (equals ``chunks``).
        reduce_calls: how many combine calls were made, over every round.
        rounds: how many combine rounds ran (1 when the summaries fit at once).
    """

    text: str
    chunks: int
    map_calls: int
    reduce_calls: int
    rounds: int


def _only_field(prompt: Prompt, role: str) -> str:
    if len(prompt.fields) != 1:
        raise ValueError(
            f"the {role} prompt must have exactly one field (the text to fill in); "
            f"it has {len(prompt.fields)}: {', '.join(prompt.fields) or 'none'}"
        )
    return prompt.fields[0]


async def map_reduce(
    client: Client,
    documents: Iterable[str],
    map_prompt: Prompt,
    reduce_prompt: Prompt,
    *,
    chunk_tokens: int = 3000,
    limit: int | None = None,
    max_rounds: int = 8,
) -> MapReduceResult:
    """Summarise ``documents``: split, summarise every chunk concurrently, combine recursively.

    Each prompt has exactly one field, filled with the text: a chunk for ``map_prompt``,
    summaries joined by blank lines for ``reduce_prompt``. Set ``max_tokens`` on the
    prompts (``Prompt(..., max_tokens=200)``) so that summaries are shorter than their
    input, or the combine rounds cannot shrink the text.

    Args:
        client: the client to call.
        documents: the texts to summarise.
        map_prompt: summarises one chunk.
        reduce_prompt: combines several summaries into one.
        chunk_tokens: the most (estimated) tokens of text sent in one call.
        limit: the most calls in progress at once (default: the client's
            ``max_concurrency``).
        max_rounds: after this many combine rounds that did not bring the text under
            ``chunk_tokens``, every summary is combined in one last call regardless.

    Returns:
        The final text and counts of chunks, calls and rounds.

    Raises:
        ValueError: a prompt does not have exactly one field, or ``chunk_tokens`` < 1.
        ExceptionGroup: a call failed (after the client's retries); the other calls are
            cancelled. Catch with ``except*``.

    Cancellation: every call in flight is cancelled and nothing is returned.
    """
    map_field = _only_field(map_prompt, "map")
    reduce_field = _only_field(reduce_prompt, "reduce")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be at least 1, got {max_rounds}")
    chunks = [
        chunk for document in documents for chunk in split_text(document, chunk_tokens=chunk_tokens)
    ]
    limit = limit or client.max_concurrency
    if not chunks:
        await trio.lowlevel.checkpoint()
        return MapReduceResult(text="", chunks=0, map_calls=0, reduce_calls=0, rounds=0)

    async def summarise(chunk: str) -> str:
        return (await map_prompt.run(client, **{map_field: chunk})).text

    async def combine(group: str) -> str:
        return (await reduce_prompt.run(client, **{reduce_field: group})).text

    summaries = await map_concurrently(summarise, chunks, limit=limit)
    max_chars = chunk_tokens * CHARS_PER_TOKEN
    reduce_calls = rounds = 0
    while True:
        rounds += 1
        groups = _pack((s.strip() for s in summaries), max_chars, _SEPARATOR)
        if len(groups) <= 1 or rounds >= max_rounds:
            final = await combine(_SEPARATOR.join(groups))
            reduce_calls += 1
            break
        summaries = await map_concurrently(combine, groups, limit=limit)
        reduce_calls += len(groups)
    return MapReduceResult(
        text=final,
        chunks=len(chunks),
        map_calls=len(chunks),
        reduce_calls=reduce_calls,
        rounds=rounds,
    )
