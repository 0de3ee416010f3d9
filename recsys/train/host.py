"""Process-wide settings of a CPU training process: the memory allocator's reuse of freed
activations.

A CPU training step allocates and frees tens of megabytes of activations and gradients.
glibc's malloc serves blocks this large from fresh ``mmap`` pages and hands the memory back
to the kernel when they are freed (or trims the heap), so every step takes one page fault per
4 KiB touched and the kernel zeroes each page again: ~17,000 faults per step at L4H64A4,
batch 256. :func:`reuse_freed_memory` makes malloc keep what it frees (blocks up to 32 MiB
from the heap, which is not trimmed): the next step reuses the same pages. The process's
memory then stays at its high-water mark, as with the caching allocators of CUDA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BLOCK = 32 << 20
"""glibc's upper bound on M_MMAP_THRESHOLD on 64-bit hosts (HEAP_MAX_SIZE / 2)."""


@functools.cache
def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for reuse (glibc only; once per process). Returns
    whether the allocator took the settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # A trim threshold beyond any heap: freed memory at the heap's top stays mapped.
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    )
