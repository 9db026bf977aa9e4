"""Shards of a batch file: N runs (processes, machines) each handle the lines of one.

A line belongs to shard ``K`` of ``N`` when the SHA-256 of its ``custom_id`` (UTF-8),
read as a big-endian integer from its first 8 bytes, is ``K - 1`` modulo ``N``: a hash
that every machine, Python version and language computes alike, and that keeps every
line of one ``custom_id`` (a duplicate included) in one shard. A line with no usable
``custom_id`` (an invalid line, recorded by its line number) belongs to shard
``(line - 1) % N + 1``.
"""

from __future__ import annotations

import argparse
import hashlib
from typing import final

import attrs

__all__ = ["Shard", "parse_shard", "shard_of"]


def shard_of(custom_id: str, count: int) -> int:
    """Return the shard, from 1 to ``count``, that ``custom_id`` belongs to."""
    digest = hashlib.sha256(custom_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def _check(instance: Shard, _attribute: attrs.Attribute[int], _value: int) -> None:
    index, count = instance.index, instance.count
    for value in (index, count):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"a shard is two ints (K, N), not {(index, count)!r}")
    if not 1 <= index <= count:
        raise ValueError(f"a shard K/N needs 1 <= K <= N, not {index}/{count}")


@final
@attrs.frozen
class Shard:
    """Shard ``index`` of ``count`` (``2/3``: the second of three).

    Attributes:
        index: K, from 1 to ``count``.
        count: N, the number of shards.
    """

    index: int
    count: int = attrs.field(validator=_check)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, custom_id: str | None, line: int) -> bool:
        """Whether the line ``line`` with ``custom_id`` (``None``: none usable) is this shard's."""
        if custom_id is None:
            return (line - 1) % self.count + 1 == self.index
        return shard_of(custom_id, self.count) == self.index


def parse_shard(text: str) -> Shard:
    """Parse ``K/N`` (an argparse ``type=``): shard K of N, 1 <= K <= N."""
    index, slash, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except (ValueError, TypeError):
        if slash and index.strip().isdigit() and count.strip().isdigit():
            reason = "K must be from 1 to N"
        else:
            reason = "expected K/N, two whole numbers"
        raise argparse.ArgumentTypeError(
            f"{reason} (e.g. 2/3: the second of three), got {text!r}"
        ) from None
    return shard
