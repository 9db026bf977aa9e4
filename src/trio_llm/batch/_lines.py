"""Reading batch files fast: whole lines in large blocks, a bit per line, line counts.

Files of millions of lines are read in blocks of :data:`BLOCK_SIZE` bytes cut at a newline
(:func:`chunks`) and split into lines in one C call each, rather than a line at a time;
the passes over them keep O(1) state per line (a bit, or a hash in ``_keys``) and no
object per line beyond the block in hand. Lines are what a file iteration in binary mode
gives: split at ``b"\\n"`` only (a ``\\r`` before it stays, as JSON whitespace), numbered
from 1, blank ones included in the count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import IO, Any, Final, final

try:
    import orjson
except ImportError:  # pragma: no cover - PyPy: no orjson (see _json)
    orjson = None  # type: ignore[assignment]

__all__ = [
    "BLOCK_SIZE",
    "Bits",
    "chunks",
    "estimate_lines",
    "fast_loads",
    "file_identity",
    "marked_lines",
    "read_lines",
]

#: Bytes read at a time: large enough that a read costs nothing per line, small enough
#: that a block's lines, split, hold a few megabytes.
BLOCK_SIZE: Final = 1 << 20


def _no_orjson(data: bytes) -> Any:  # pragma: no cover - PyPy
    raise ValueError("no orjson")


#: orjson's ``loads`` (without orjson, a function that refuses every line). Where it
#: refuses a line, or could read it differently, the callers ask the standard library.
fast_loads: Callable[[bytes], Any] = orjson.loads if orjson is not None else _no_orjson

# Where a large file's lines are counted to estimate them all (see estimate_lines).
_SAMPLES: Final = 32
_SAMPLE_SIZE: Final = 1 << 16


def chunks(file: IO[bytes]) -> Iterator[bytes]:
    """Yield ``file``'s bytes from its start in pieces that end at a newline.

    Each piece is whole lines, each ending with ``b"\\n"``, except that the last piece may
    end with what follows the file's last newline (a last line with no newline). A line
    longer than a block is carried over until its newline comes.
    """
    file.seek(0)
    read = file.read
    carried: list[bytes] = []
    while True:
        block = read(BLOCK_SIZE)
        if not block:
            break
        cut = block.rfind(b"\n") + 1
        if not cut:  # no newline in this block: part of a long line
            carried.append(block)
            continue
        if carried:
            carried.append(block[:cut])
            yield b"".join(carried)
            carried.clear()
        else:
            yield block if cut == len(block) else block[:cut]
        if cut < len(block):
            carried.append(block[cut:])
    if carried:
        yield b"".join(carried)


def read_lines(file: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, bytes)`` for each non-blank line of ``file``, from its start.

    The bytes are the line's, its newline included (none on a last line without one).
    """
    number = 0
    for chunk in chunks(file):
        lines = chunk.split(b"\n")
        last = lines.pop()  # b"" after a final newline, else a last line without one
        for raw in lines:
            number += 1
            if raw and not raw.isspace():
                yield number, raw + b"\n"
        if last:
            number += 1
            if not last.isspace():
                yield number, last


def marked_lines(file: IO[bytes], marked: Bits) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, bytes)`` for each line of ``file`` whose bit is set in ``marked``.

    As :func:`read_lines` (only non-blank lines are ever marked), but a block none of
    whose lines is marked is skipped after counting its newlines, without splitting it:
    resuming after millions of answered lines reaches the first line to send in seconds.
    """
    number = 0  # lines before this chunk
    for chunk in chunks(file):
        count = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
        if not marked.any(number + 1, number + count + 1):
            number += count
            continue
        lines = chunk.split(b"\n")
        last = lines.pop()
        for raw in lines:
            number += 1
            if marked[number]:
                yield number, raw + b"\n"
        if last:
            number += 1
            if marked[number]:
                yield number, last


def estimate_lines(file: IO[bytes]) -> int:
    """Estimate how many lines ``file`` holds, from the newlines of a few samples.

    A file of up to ``_SAMPLES * _SAMPLE_SIZE`` bytes (2 MiB) is counted whole; a larger
    one in that many samples spread evenly over it, so that a file whose lines grow
    longer towards its end is not estimated from its first lines alone. Reads only the
    samples; leaves the position anywhere.
    """
    size = os.fstat(file.fileno()).st_size
    if size <= _SAMPLES * _SAMPLE_SIZE:
        file.seek(0)
        data = file.read()
        return data.count(b"\n") + (bool(data) and not data.endswith(b"\n"))
    newlines = 0
    for index in range(_SAMPLES):  # one sample in the middle of each 32nd of the file
        file.seek(size * (2 * index + 1) // (2 * _SAMPLES) - _SAMPLE_SIZE // 2)
        newlines += file.read(_SAMPLE_SIZE).count(b"\n")
    return round(newlines * size / (_SAMPLES * _SAMPLE_SIZE)) + 1


@final
class Bits:
    """A growable bit per line number: 1 bit a line (125 KB for a million lines)."""

    __slots__ = ("_bytes",)

    def __init__(self) -> None:
        self._bytes = bytearray()

    def set(self, index: int) -> None:
        """Set bit ``index``."""
        byte = index >> 3
        if byte >= len(self._bytes):
            self._bytes.extend(bytes(byte - len(self._bytes) + 4096))
        self._bytes[byte] |= 1 << (index & 7)

    def __getitem__(self, index: int) -> bool:
        byte = index >> 3
        return byte < len(self._bytes) and bool(self._bytes[byte] & (1 << (index & 7)))

    def any(self, start: int, stop: int) -> bool:
        """Whether a bit from ``start`` up to (not including) ``stop`` is set.

        Whole bytes are looked at: a set bit next to the range, in one of its end bytes,
        may also answer ``True`` (the caller then looks at each bit).
        """
        part = self._bytes[start >> 3 : ((stop - 1) >> 3) + 1]
        return part.count(0) != len(part)


def file_identity(file: IO[bytes]) -> tuple[int, int, int, int]:
    """Return ``file``'s (device, inode, size, mtime in ns)."""
    status = os.fstat(file.fileno())
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
