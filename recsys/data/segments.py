"""Copying runs of values end to end: the gathers under every shuffled or cut batch.

- :func:`copy_segments` copies ``src[starts[i] : starts[i] + lengths[i]]`` for each ``i``,
  in order, into ``out``;
- :class:`Scatter` appends each row's run to the output of the batch the row goes to, so
  that a shuffled row's ids are copied once, straight into its batch.

Values are int64 or int32, and both narrow int64 sources into int32 outputs (the stream's
ids on their way into a batch). Both use the compiled helper ``recsys.data._segments``
(one ``memcpy`` per run, or a narrowing loop, built with the package) when it could be
built, and NumPy otherwise (a running sum makes a per-value index, then one gather; a
scatter takes one such gather per batch): the results are identical, the helper is several
times faster. ``RECSYS_NATIVE=0`` forces the NumPy path.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from recsys import native

_INT64_P = ctypes.POINTER(ctypes.c_int64)

ABI = 3
"""The compiled helper's calling convention (its ``segments_abi()``); another is not used."""


def _load() -> ctypes.CDLL | None:
    library = native.load("recsys.data._segments", "segments_abi", ABI)
    if library is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.copy_segments.restype = None
    library.copy_segments.argtypes = [pointer] * 3 + [size, pointer, size, size]
    library.scatter_segments.restype = size
    library.scatter_segments.argtypes = (
        [pointer, size] + [pointer] * 3 + [size] * 2 + [pointer] * 2 + [size] * 2
    )
    return library


_LIBRARY = _load()
NATIVE = _LIBRARY is not None
"""Whether the compiled helper is in use."""


def index(starts: np.ndarray, lengths: np.ndarray, total: int) -> np.ndarray:
    """The positions of every run end to end (``total`` of them): one running sum of steps,
    1 within a run and a jump between runs (3x faster than repeat + arange)."""
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    full = lengths > 0  # empty runs take no position
    if not full.all():
        starts, lengths = starts[full], lengths[full]
    firsts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=firsts[1:])
    steps = np.ones(total, dtype=np.int64)
    steps[0] = starts[0]
    steps[firsts[1:]] = starts[1:] - (starts[:-1] + lengths[:-1]) + 1
    return np.cumsum(steps, out=steps)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


TYPES = (np.dtype(np.int64), np.dtype(np.int32))
"""Types of the values copied: int64, or int32 (ids that fit, as batches hold them); an int64
source may fill an int32 output."""


def _outside(size: int, starts: np.ndarray, lengths: np.ndarray) -> bool:
    """Whether any run (non-empty ``starts``, ``lengths``) lies outside a source of ``size``
    values; checked without overflow: start > size − length for a run that ends past it."""
    return bool(lengths.min() < 0 or starts.min() < 0 or (starts > size - lengths).any())


def _int64_array(a: np.ndarray) -> bool:
    return a.dtype == np.int64 and a.flags.c_contiguous


def _values(a: np.ndarray) -> bool:
    return a.dtype in TYPES and a.flags.c_contiguous


def copy_segments(
    src: np.ndarray, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Fill ``out`` (exactly ``lengths.sum()`` long) with the runs of ``src`` given by
    ``starts`` and ``lengths`` (1-D, of equal length), in order; return ``out``. A run
    outside ``src``, or runs that do not fill ``out`` exactly, raise IndexError on both
    paths. The compiled helper copies int64 or int32 values into an output of the same type,
    and narrows int64 into int32 (values the caller knows to fit); NumPy does any other
    case."""
    total = len(out)
    if starts.ndim != 1 or lengths.ndim != 1 or len(starts) != len(lengths):
        raise IndexError(
            f"copy_segments: starts {starts.shape} and lengths {lengths.shape} must be 1-D "
            "and of equal length"
        )
    if not len(starts):
        if total:
            raise IndexError("copy_segments: no runs to fill the output")
        return out
    if _outside(len(src), starts, lengths) or int(lengths.sum()) != total:
        raise IndexError("copy_segments: a run lies outside the source or the output")
    if (
        _LIBRARY is not None
        and out.flags.writeable
        and (src.dtype == out.dtype or (src.dtype, out.dtype) == TYPES)
        and _values(src)
        and _values(out)
        and _int64_array(starts)
        and _int64_array(lengths)
    ):
        _LIBRARY.copy_segments(
            _address(src),
            _address(starts),
            _address(lengths),
            len(starts),
            _address(out),
            out.dtype.itemsize,
            src.dtype.itemsize,
        )
        return out
    return np.take(src, index(starts, lengths, total), out=out)


def _rows(name: str, a: np.ndarray, n: int | None = None) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int64)
    if a.ndim != 1 or (n is not None and len(a) != n):
        raise IndexError(f"scatter: {name} must be 1-D, one per row ({n}), got {a.shape}")
    return a


class Scatter:
    """Rows of successive chunks appended to the outputs of the batches they go to.

    Batch ``b`` has ``columns`` outputs of ``widths[b]`` values each, laid end to end at the
    start of ``bases[b]`` (1-D, contiguous, writable; all int64 or all int32, and sources of
    that type or int64): column ``c``'s is
    ``bases[b][c * widths[b] : (c + 1) * widths[b]]``. Each is filled from its start in the
    order rows are given, chunk after chunk; a row whose batch is ``-1`` is not read. A run
    outside its source, a batch past the last, or rows that overflow their batch's output
    raise IndexError on both paths (the outputs are then undefined); :meth:`full` says
    whether every output has been filled exactly.
    """

    def __init__(
        self, bases: Sequence[np.ndarray], widths: Sequence[int] | np.ndarray, columns: int = 1
    ) -> None:
        widths = np.asarray(widths, dtype=np.int64).reshape(-1)
        if len(widths) != len(bases) or (len(widths) and widths.min() < 0):
            raise ValueError("scatter: one width >= 0 per batch")
        dtypes = {base.dtype for base in bases}
        if len(dtypes) > 1 or not dtypes <= set(TYPES):
            raise ValueError("scatter: outputs must be all int64 or all int32")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.int64)
        item = self.dtype.itemsize
        for base, width in zip(bases, widths.tolist(), strict=True):
            if base.ndim != 1 or not base.flags.c_contiguous:
                raise ValueError("scatter: outputs must be 1-D contiguous arrays")
            if not base.flags.writeable or len(base) < columns * width:
                raise ValueError("scatter: an output is read-only or too short for its columns")
        self.batches, self.columns = len(bases), columns
        if _LIBRARY is not None:
            addresses = np.array([_address(base) for base in bases], dtype=np.int64)
            # [columns, batches]: where each output is filled up to, and where it ends.
            self._cursors = addresses + item * widths * np.arange(columns, dtype=np.int64)[:, None]
            self._ends = self._cursors + item * widths
            self._outs = None
        else:
            self._outs = [
                [base[c * w : (c + 1) * w] for base, w in zip(bases, widths.tolist(), strict=True)]
                for c in range(columns)
            ]
            self._at = np.zeros((columns, len(bases)), dtype=np.int64)
            self._widths = widths

    def _failed(self, row: int) -> None:
        if row >= 0:
            raise IndexError(
                f"scatter: row {row} lies outside its source, names a batch past "
                f"{self.batches - 1}, or overflows its batch's output"
            )

    def segments(
        self,
        src: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        batch_of: np.ndarray,
        column: int = 0,
    ) -> None:
        """Append ``src[starts[i] : starts[i] + lengths[i]]`` to ``column`` of batch
        ``batch_of[i]`` (``src`` of the outputs' type, or int64 narrowed into int32 outputs:
        values the caller knows to fit)."""
        if not 0 <= column < self.columns:
            raise IndexError(f"scatter: no column {column} of {self.columns}")
        if src.ndim != 1 or src.dtype not in (self.dtype, TYPES[0]):
            raise ValueError(
                f"scatter: src must be 1-D {self.dtype} or int64, got {src.dtype} {src.shape}"
            )
        src = np.ascontiguousarray(src)
        batch_of = _rows("batch_of", batch_of)
        starts = _rows("starts", starts, len(batch_of))
        lengths = _rows("lengths", lengths, len(batch_of))
        if self._outs is None:
            assert _LIBRARY is not None
            at = 8 * column * self.batches
            self._failed(
                _LIBRARY.scatter_segments(
                    _address(src),
                    len(src),
                    _address(starts),
                    _address(lengths),
                    _address(batch_of),
                    len(batch_of),
                    self.batches,
                    _address(self._cursors) + at,
                    _address(self._ends) + at,
                    self.dtype.itemsize,
                    src.dtype.itemsize,
                )
            )
            return
        taken = batch_of >= 0
        batch_of, starts, lengths = batch_of[taken], starts[taken], lengths[taken]
        if len(batch_of) and (
            batch_of.max() >= self.batches or _outside(len(src), starts, lengths)
        ):
            self._failed(0)

        # The chunk's runs gathered in batch order (one gather), then cut into each batch's.
        order = np.argsort(batch_of, kind="stable")
        counts = np.bincount(batch_of, minlength=self.batches)
        sizes = np.bincount(batch_of, weights=lengths, minlength=self.batches).astype(np.int64)
        at = self._at[column]
        if (at + sizes > self._widths).any():
            self._failed(0)
        gathered = copy_segments(
            src, starts[order], lengths[order], np.empty(int(sizes.sum()), dtype=self.dtype)
        )
        ends = np.cumsum(sizes).tolist()
        for b in np.flatnonzero(counts).tolist():
            a, size = int(at[b]), int(sizes[b])
            self._outs[column][b][a : a + size] = gathered[ends[b] - size : ends[b]]
            at[b] = a + size

    def full(self) -> bool:
        """Whether every output is filled exactly."""
        if self._outs is None:
            return bool((self._cursors == self._ends).all())
        return bool((self._at == self._widths).all())
