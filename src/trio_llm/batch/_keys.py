"""One compact table of ``custom_id`` hashes with a few flags each: ~14 bytes an id.

A batch must know which ``custom_id``\\ s the output answers already (resume), and which
the input repeats (duplicates). Keeping the strings would cost ~100 bytes each in a
Python ``set``; this keeps a 64-bit hash of each in an open-addressing table of unsigned
64-bit slots (``array("Q")``, linear probing), with a byte of flags beside each slot: the
output's scan marks :data:`OK` or :data:`FAILED`, the input's check marks :data:`SEEN`,
so the ids both files share (all of them, when resuming) take one slot, not two.

The table is sized up front for the ids expected (estimated from each file's size and
lines), at most :data:`_LOAD` full, and only grows if there turn out to be more: 9 bytes
a slot, ~14 bytes an id, in two flat buffers the allocator gives back to the OS when
dropped.

Two different ids share a 64-bit hash with probability ~n**2 / 2**65 over n ids (about
3e-8 for a million, 3e-6 for ten million): then the second would count as a duplicate,
or as answered. The duplicate case is checked exactly before it is reported (see
``_input``); the answered case is left to that probability and documented.
"""

from __future__ import annotations

from array import array
from typing import Final, final

__all__ = ["FAILED", "OK", "SEEN", "AnsweredKeys", "KeyTable", "key_hash"]

#: Flags: answered without an error in OUTPUT, answered with one, found in INPUT.
OK: Final = 1
FAILED: Final = 2
SEEN: Final = 4

_MASK64: Final = (1 << 64) - 1
_MIN_SLOTS: Final = 1024
# The table is sized to be at most this full with the ids expected...
_LOAD: Final = 0.65
# ... and doubles if it gets fuller than this (more ids than expected). Linear probing
# at 0.85 still finds a key in ~3.8 probes, a free slot in ~22.
_MAX_LOAD: Final = 0.85


def key_hash(key: str) -> int:
    """Return the non-zero 64-bit hash of ``key`` used by :class:`KeyTable`.

    Python's own string hash (SipHash, seeded per process): fast and well mixed, and a
    table never outlives the process that filled it. Zero marks an empty slot, so a zero
    hash becomes 1.
    """
    return (hash(key) & _MASK64) or 1


@final
class KeyTable:
    """A map from string keys (stored as 64-bit hashes) to a byte of flags."""

    __slots__ = ("_count", "_flags", "_limit", "_size", "_slots")

    def __init__(self, expected: int = 0) -> None:
        """Make a table for about ``expected`` keys (it grows if more come)."""
        self._count = 0
        self._allocate(max(_MIN_SLOTS, int(expected / _LOAD) + 1))

    def _allocate(self, size: int) -> None:
        self._slots = array("Q", [0]) * size  # (from bytes, it would be built twice)
        self._flags = bytearray(size)
        self._size = size
        self._limit = int(size * _MAX_LOAD)

    def __len__(self) -> int:
        return self._count

    def mark(self, key: str, flag: int) -> int:
        """Set ``flag`` on ``key``, adding the key if absent; return its flags before.

        ``0`` means the key (or one of the same hash) was not there.
        """
        value = key_hash(key)
        slots, size = self._slots, self._size
        index = (value * size) >> 64  # in [0, size): no power-of-two sizes needed
        while True:
            found = slots[index]
            if found == value:
                flags = self._flags
                before = flags[index]
                flags[index] = before | flag
                return before
            if not found:
                break
            index += 1
            if index == size:
                index = 0
        slots[index] = value
        self._flags[index] = flag
        self._count += 1
        if self._count > self._limit:
            self._grow()
        return 0

    def flags(self, key: str) -> int:
        """Return ``key``'s flags (``0``: absent)."""
        value = key_hash(key)
        slots, size = self._slots, self._size
        index = (value * size) >> 64
        while True:
            found = slots[index]
            if found == value:
                return self._flags[index]
            if not found:
                return 0
            index += 1
            if index == size:
                index = 0

    def clear(self, flag: int) -> None:
        """Clear ``flag`` on every key (in one C call); the keys stay."""
        self._flags = self._flags.translate(bytes(byte & ~flag for byte in range(256)))

    def reserve(self, count: int) -> None:
        """Make room for ``count`` keys in all (those there included) without growing."""
        if count > self._limit:
            self._resize(int(count / _LOAD) + 1)

    def _grow(self) -> None:
        self._resize(self._size * 2)

    def _resize(self, size: int) -> None:
        old_slots, old_flags = self._slots, self._flags
        self._allocate(size)
        slots, flags = self._slots, self._flags
        for value, flag in zip(old_slots, old_flags, strict=True):
            if value:
                index = (value * size) >> 64
                while slots[index]:
                    index += 1
                    if index == size:
                        index = 0
                slots[index] = value
                flags[index] = flag

    def nbytes(self) -> int:
        """The size of the table's buffers, in bytes."""
        return self._size * (self._slots.itemsize + 1)


@final
class AnsweredKeys:
    """What OUTPUT already answers: ``custom_id``\\ s, and line numbers of keyless lines.

    Attributes:
        keys: each answered ``custom_id``, flagged :data:`OK` and/or :data:`FAILED`;
            the input's check then flags the ids of its lines :data:`SEEN` there too.
        failed_lines: the line numbers of the error lines with no ``custom_id``.
    """

    def __init__(self, expected: int = 0) -> None:
        """Make room for about ``expected`` ids (those of the input and the output)."""
        self.keys = KeyTable(expected)
        self.failed_lines: set[int] = set()
