"""Checking a plan against the host: what a table needs, whether it fits, what a rank used.

This module owns the small measurements a table-scale run (``benchmarks/table_scale.py``)
compares with ``recsys plan``'s per-rank memory: the bytes a trainable table takes (fp32
weights and the row-wise Adagrad state, one fp32 per row), the host's free memory
(``MemAvailable`` of ``/proc/meminfo``), a fail-fast check of the one against the other, and
a process's peak resident memory (``ru_maxrss``).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from recsys.errors import UserError

FP32 = 4
"""Bytes per element of a table and of its row-wise Adagrad state."""

MARGIN = 1.25
"""How much more than the table's own bytes a run is given room for (gradients of the rows a
step touches, checkpoint buffers, the allocator's slack)."""

PROCESS_BYTES = 1 << 30
"""Memory each rank takes besides its tables: Python, torch, TorchRec, the dense model and
the batches (~0.5–1 GiB measured on CPU ranks)."""


class TableTooLarge(UserError, MemoryError):
    """The table (and its optimizer state) does not fit the host's free memory."""


def table_bytes(rows: int, dim: int) -> int:
    """Bytes of a trainable fp32 table of ``rows`` × ``dim`` with row-wise Adagrad state,
    all ranks' shares together."""
    if rows < 1 or dim < 1:
        raise ValueError(f"rows and dim must be >= 1, got {rows} and {dim}")
    return rows * (dim + 1) * FP32


def available_bytes(meminfo: str | None = None) -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (or of the text ``meminfo``) in bytes."""
    if meminfo is None:
        meminfo = Path("/proc/meminfo").read_text()
    for line in meminfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "MemAvailable":
            number, *unit = value.split()
            if unit and unit[0].lower() != "kb":
                raise ValueError(f"/proc/meminfo: MemAvailable in {unit[0]!r}, expected kB")
            return int(number) * 1024
    raise ValueError("/proc/meminfo has no MemAvailable line")


def needed_bytes(rows: int, dim: int, ranks: int) -> int:
    """What a run of a ``rows`` × ``dim`` table on ``ranks`` local ranks needs: the table and
    its state with :data:`MARGIN`, plus :data:`PROCESS_BYTES` per rank."""
    return int(table_bytes(rows, dim) * MARGIN) + ranks * PROCESS_BYTES


def check_fits(rows: int, dim: int, ranks: int, available: int | None = None) -> int:
    """Raise :class:`TableTooLarge` (one line) unless a ``rows`` × ``dim`` table trained on
    ``ranks`` local ranks fits ``available`` bytes (None: the host's ``MemAvailable``);
    return the bytes needed."""
    need = needed_bytes(rows, dim, ranks)
    free = available_bytes() if available is None else available
    if need > free:
        gib = 1024**3
        raise TableTooLarge(
            f"item table {rows:,} x {dim} (fp32 + row-wise Adagrad, {ranks} ranks) needs "
            f"~{need / gib:.1f} GiB but the host has {free / gib:.1f} GiB available: "
            f"choose smaller --sizes"
        )
    return need


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss``: KiB on Linux, bytes
    on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
