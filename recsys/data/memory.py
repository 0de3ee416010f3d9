"""Memory for the batches a stream hands out, reused once they are gone.

A shuffle buffer's batches (tens of MB) in fresh arrays would cost the process a page fault
per 4 KiB each time: the C library returns freed blocks of that size to the system and maps
them again. :class:`Slabs` carves arrays out of large slabs instead and reuses a slab once
no array carved from it is alive (its reference count says so), so the pages stay mapped.
"""

from __future__ import annotations

import sys

import numpy as np


def _unreferenced() -> int:
    """The reference count of an array held only by a list, seen as in ``Slabs._next``
    (the interpreter's own counts differ between versions)."""
    for array in [np.empty(0)]:
        return sys.getrefcount(array)
    raise AssertionError


_UNREFERENCED = _unreferenced()


class Slabs:
    """int64 (or int32) arrays carved from reusable slabs."""

    SLAB = 1 << 22
    """int64s per slab (32 MiB)."""
    KEEP = 4
    """Free slabs kept for reuse (the rest go back to the system)."""

    def __init__(self) -> None:
        self._slab: np.ndarray | None = None
        self._at = 0
        self._used: list[np.ndarray] = []  # slabs carved from, some arrays maybe still alive
        self._free: list[np.ndarray] = []

    def empty(self, n: int, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """``n`` uninitialised int64s, or int32s (a view of a slab; a large request gets its
        own)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.int64, np.int32):
            raise ValueError(f"slabs hold int64 or int32 arrays, not {dtype}")
        words = -(-n * dtype.itemsize // 8)  # int64s it takes
        if words > self.SLAB // 2:
            return np.empty(n, dtype=dtype)
        if self._slab is None or self._at + words > len(self._slab):
            self._next()
        assert self._slab is not None
        self._at += words
        carved = self._slab[self._at - words : self._at]
        return carved if dtype == np.int64 else carved.view(dtype)[:n]

    def _next(self) -> None:
        if self._slab is not None:
            self._used.append(self._slab)
        self._slab = None
        still = []
        for slab in self._used:
            # A view holds its slab: a slab referred to no more than an array nothing else
            # refers to (this list, the loop, the call), has no array carved from it left.
            (self._free if sys.getrefcount(slab) <= _UNREFERENCED else still).append(slab)
        self._used = still
        del self._free[self.KEEP :]
        self._slab = self._free.pop() if self._free else np.empty(self.SLAB, dtype=np.int64)
        self._at = 0
