"""A compact set of ``custom_id`` hashes: 8 bytes a slot, for files of any length.

A batch must know which ``custom_id``\\ s it has seen (duplicates in the input) and which
are already answered (resume). Keeping the strings would cost ~100 bytes each in a Python
``set``; this keeps a 64-bit hash of each in an open-addressing table of unsigned 64-bit
slots (``array("Q")``, at most half full), ~16-32 bytes per id, in one flat buffer the
allocator gives back to the OS when the table is dropped.

Two different ids share a 64-bit hash with probability ~n**2 / 2**65 over n ids (about
3e-8 for a million): then the second would count as a duplicate, or as answered. The
duplicate case is checked exactly before it is reported (see ``_input``); the answered
case is left to that probability and documented.
"""

from __future__ import annotations

from array import array
from typing import Final, final

__all__ = ["AnsweredKeys", "HashSet", "key_hash"]

_MASK64: Final = (1 << 64) - 1
_MIN_SLOTS: Final = 1024


def key_hash(key: str) -> int:
    """Return the non-zero 64-bit hash of ``key`` used by :class:`HashSet`.

    Python's own string hash (SipHash, seeded per process): fast and well mixed, and a
    table never outlives the process that filled it. Zero marks an empty slot, so a zero
    hash becomes 1.
    """
    return (hash(key) & _MASK64) or 1


@final
class HashSet:
    """A set of string keys, stored as 64-bit hashes with linear probing."""

    __slots__ = ("_count", "_mask", "_slots")

    def __init__(self) -> None:
        self._slots = array("Q", bytes(8 * _MIN_SLOTS))
        self._mask = _MIN_SLOTS - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: str) -> bool:
        return self.contains_hash(key_hash(key))

    def contains_hash(self, value: int) -> bool:
        """Whether the hash ``value`` (from :func:`key_hash`) is in the set."""
        slots, mask = self._slots, self._mask
        index = value & mask
        while True:
            found = slots[index]
            if found == value:
                return True
            if found == 0:
                return False
            index = (index + 1) & mask

    def add(self, key: str) -> bool:
        """Add ``key``; return ``False`` if it (or a key of the same hash) was there."""
        return self.add_hash(key_hash(key))

    def add_hash(self, value: int) -> bool:
        """Add the hash ``value``; return ``False`` if it was there already."""
        slots, mask = self._slots, self._mask
        index = value & mask
        while True:
            found = slots[index]
            if found == value:
                return False
            if found == 0:
                break
            index = (index + 1) & mask
        slots[index] = value
        self._count += 1
        if self._count * 2 > len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self._slots
        size = len(old) * 2
        self._slots = slots = array("Q", bytes(8 * size))
        self._mask = mask = size - 1
        for value in old:
            if value:
                index = value & mask
                while slots[index]:
                    index = (index + 1) & mask
                slots[index] = value

    def nbytes(self) -> int:
        """The size of the table's buffer, in bytes."""
        return len(self._slots) * self._slots.itemsize


@final
class AnsweredKeys:
    """What OUTPUT already answers: ``custom_id``\\ s, and line numbers of keyless lines."""

    def __init__(self) -> None:
        self.ok = HashSet()
        self.failed = HashSet()
        self.failed_lines: set[int] = set()
