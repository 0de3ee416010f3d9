"""Checking a plan against the host: what a table needs, whether it fits, what a rank used.

This module owns the small measurements a table-scale run (``benchmarks/table_scale.py``)
compares with ``recsys plan``'s per-rank memory: the bytes a trainable table takes (fp32
weights and the row-wise Adagrad state, one fp32 per row), the host's free memory
(``MemAvailable`` of ``/proc/meminfo``), fail-fast checks of the one against the other
(training a table, loading its checkpoint on fewer ranks), and a process's peak resident
memory (``ru_maxrss``, or sampled over one stretch of code: :class:`PeakRss`).
"""

from __future__ import annotations

import resource
import sys
import threading
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


def _check(need: int, what: str, fix: str, available: int | None) -> int:
    free = available_bytes() if available is None else available
    if need > free:
        gib = 1024**3
        raise TableTooLarge(
            f"{what} needs ~{need / gib:.1f} GiB but the host has {free / gib:.1f} GiB "
            f"available: {fix}"
        )
    return need


def check_fits(rows: int, dim: int, ranks: int, available: int | None = None) -> int:
    """Raise :class:`TableTooLarge` (one line) unless a ``rows`` × ``dim`` table trained on
    ``ranks`` local ranks fits ``available`` bytes (None: the host's ``MemAvailable``);
    return the bytes needed."""
    what = f"item table {rows:,} x {dim} (fp32 + row-wise Adagrad, {ranks} ranks)"
    return _check(needed_bytes(rows, dim, ranks), what, "choose smaller --sizes", available)


def check_host_fits(need: int, ranks: int, available: int | None = None) -> int:
    """Raise :class:`TableTooLarge` (one line) unless a job's ``ranks`` ranks on this host,
    needing ``need`` bytes in all, fit its ``available`` bytes; return ``need``."""
    what = (
        f"placing the tables of this host's {ranks} rank(s) (their shards, optimizer state "
        "and runtime)"
    )
    fix = "use more hosts, smaller or frozen fp16 tables; `recsys plan` shows every rank"
    return _check(need, what, fix, available)


RELOAD_PEAK = 1.8
"""A DCP load's peak over the checkpoint's bytes, all of it read into one rank: the rank's
tables and optimizer state, plus what DCP reads before copying it into them (1.7 measured
loading a 2-rank checkpoint of 2^23 rows on one rank)."""


def reload_bytes(checkpoint: int, ranks: int) -> int:
    """What loading a checkpoint of ``checkpoint`` bytes onto ``ranks`` local ranks needs."""
    return int(checkpoint * RELOAD_PEAK) + ranks * PROCESS_BYTES


def check_reload_fits(checkpoint: int, ranks: int, available: int | None = None) -> int:
    """Raise :class:`TableTooLarge` (one line) unless loading a checkpoint of ``checkpoint``
    bytes onto ``ranks`` local ranks fits ``available`` bytes; return the bytes needed."""
    what = f"loading a checkpoint of {checkpoint / 1024**3:.1f} GiB on {ranks} rank(s)"
    return _check(reload_bytes(checkpoint, ranks), what, "load it on more ranks", available)


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss``: KiB on Linux, bytes
    on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    """This process's resident set size now (``VmRSS`` of ``/proc/self/status``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError("/proc/self/status has no VmRSS line")


class PeakRss:
    """The peak resident memory of a stretch of code (``with PeakRss() as watch: ...``, then
    ``watch.peak``), sampled every ``interval`` seconds on a thread: unlike ``ru_maxrss``, it
    sees the peak of a later phase that stays below an earlier one's."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
