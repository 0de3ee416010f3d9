"""Arrow row groups → validated NumPy columns → TorchRec batches, without per-row Python.

This module owns the value-level contract of a dataset (no nulls, ids in range, labels 0/1,
side-feature lists aligned with item lists), the ``hash`` id mode, truncation of sequences to
their most recent ``max_len`` events, and the :class:`Batch` handed to models: a
``KeyedJaggedTensor`` of sparse features plus dense tensors. Every step works on whole Arrow
offset and value buffers with vectorised NumPy.

Feature keys of the ``KeyedJaggedTensor``:
- ``seq``: ``item`` and one key per side feature (``category``, ...), one list per sequence.
- ``ctr``: ``history_item``, ``history_<side>``, and ``candidate_item``, ``candidate_<side>``
  (one id per sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import torch
from torchrec import KeyedJaggedTensor

from recsys.data.schema import DataError, DatasetMeta, list_columns, scalar_columns

ROW_ID = "__row_id"
"""Column added to every decoded row group: the row's index in the whole dataset."""

Locate = Callable[[int, str], str]
"""``locate(row_in_group, column)`` → 'file, row group, row, column' for error messages."""


@dataclass
class Lists:
    """Aligned list columns of a set of rows: one offsets array, values per column."""

    offsets: np.ndarray
    """int64, length rows + 1, starting at 0."""
    values: dict[str, np.ndarray]
    """int64 flat values per column, all of length offsets[-1]."""


@dataclass
class Columns:
    """Decoded, validated rows: aligned list columns and scalar columns, all NumPy int64."""

    lists: Lists
    scalars: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.lists.offsets) - 1


@dataclass
class Batch:
    """One training batch."""

    features: KeyedJaggedTensor
    """Sparse features (see the module docstring for the keys)."""
    user_ids: torch.Tensor
    """int64 [B]: the user of each row (gAUC groups by it)."""
    row_ids: torch.Tensor
    """int64 [B]: each row's index in the whole dataset (file order)."""
    labels: torch.Tensor | None = None
    """float32 [B], ``ctr`` only."""
    timestamps: torch.Tensor | None = None
    """int64 [B], ``ctr`` only: time of the candidate event."""

    def __len__(self) -> int:
        return len(self.row_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value if value is None else value.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    def __reduce__(self):
        # Crossing from a loader worker, every tensor would get its own shared-memory segment
        # (a few system calls each). One packed int64 array per batch, pickled by value
        # through the worker's pipe, is cheaper (labels are 0/1: exact as int64).
        parts = [self.features.values(), self.features.lengths(), self.user_ids, self.row_ids]
        if self.labels is not None:
            parts += [self.labels.to(torch.int64), self.timestamps]
        sizes = [len(p) for p in parts]
        return _unpack, (self.features.keys(), torch.cat(parts).numpy(), sizes)


def _unpack(keys: list[str], packed: np.ndarray, sizes: list[int]) -> Batch:
    parts = torch.split(torch.from_numpy(packed), sizes)
    features = KeyedJaggedTensor(keys=keys, values=parts[0], lengths=parts[1])
    batch = Batch(features, parts[2], parts[3])
    if len(parts) > 4:
        batch.labels, batch.timestamps = parts[4].to(torch.float32), parts[5]
    return batch


def hash_ids(values: np.ndarray, size: int) -> np.ndarray:
    """Map raw 64-bit ids into [0, size) with a fixed mixing function (SplitMix64's finaliser),
    so that nearby raw ids land far apart and the mapping is stable across runs and hosts."""
    x = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(size)).astype(np.int64)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _check_ids(
    values: np.ndarray,
    vocab: str,
    meta: DatasetMeta,
    column: str,
    row_of: Callable[[int], int],
    locate: Locate,
) -> np.ndarray:
    """Validate (remap) or hash (hash mode) the ids of one column; return int64 ids."""
    if not vocab or values.size == 0:
        return values
    size = meta.vocab[vocab]
    if meta.id_mode == "hash":
        return hash_ids(values, size)
    if values.min() < 0:  # one pass each; the offending row is searched only on failure
        i = _first(values < 0)
        raise DataError(
            f"{locate(row_of(i), column)}: id {values[i]} is negative; ids must lie in [0, {size})"
        )
    if values.max() >= size:
        i = _first(values >= size)
        raise DataError(
            f"{locate(row_of(i), column)}: id {values[i]} is not below the vocab "
            f"size {size} of {vocab!r} (dataset.json); remap ids densely or use "
            "id_mode 'hash'"
        )
    return values


INT64_MAX = np.iinfo(np.int64).max


def _int64(
    array: pa.Array,
    column: str,
    locate: Locate,
    row_of: Callable[[int], int],
    raw: bool = False,
) -> np.ndarray:
    """The column's values as int64 (``raw``: unsigned 64-bit ids kept as they are, for
    hashing)."""
    if array.null_count:
        i = _first(np.asarray(array.is_null()))
        raise DataError(f"{locate(row_of(i), column)}: null value; nulls are not allowed")
    if pa.types.is_uint64(array.type):
        values = np.asarray(array)
        if raw:
            return values
        if values.size and values.max() > INT64_MAX:
            i = _first(values > INT64_MAX)
            raise DataError(
                f"{locate(row_of(i), column)}: value {values[i]} does not fit "
                "int64 (raw 64-bit ids need id_mode 'hash')"
            )
        return values.astype(np.int64)
    return np.asarray(array if array.type == pa.int64() else array.cast(pa.int64()))


def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def decode(
    table: pa.Table | pa.RecordBatch, meta: DatasetMeta, first_row_id: int, locate: Locate
) -> Columns:
    """Validate rows of a row group and view them as NumPy columns (no copy where the Arrow
    buffers are already int64)."""
    n = table.num_rows
    lists = list_columns(meta)
    offsets: np.ndarray | None = None
    values: dict[str, np.ndarray] = {}
    for column, vocab in lists.items():
        array = _array(table.column(column))
        if array.null_count:
            i = _first(np.asarray(array.is_null()))
            raise DataError(f"{locate(i, column)}: null list; use an empty list instead")
        raw = np.asarray(array.offsets, dtype=np.int64)
        flat = array.values.slice(raw[0], raw[-1] - raw[0])
        own = raw - raw[0]
        if offsets is None:
            offsets = own
        elif not np.array_equal(own, offsets):
            lengths, item_lengths = np.diff(own), np.diff(offsets)
            i = _first(lengths != item_lengths)
            first = next(iter(lists))
            raise DataError(
                f"{locate(i, column)}: list of {lengths[i]} values but "
                f"{first!r} has {item_lengths[i]}; side-feature lists must align "
                "with the item list"
            )

        def row_of(position: int, own: np.ndarray = own) -> int:
            return int(np.searchsorted(own, position, side="right") - 1)

        ids = _int64(flat, column, locate, row_of, raw=bool(vocab) and meta.id_mode == "hash")
        values[column] = _check_ids(ids, vocab, meta, column, row_of, locate)
    scalars: dict[str, np.ndarray] = {}
    for column, vocab in scalar_columns(meta).items():
        raw = bool(vocab) and meta.id_mode == "hash"
        ids = _int64(_array(table.column(column)), column, locate, int, raw=raw)
        if column == "user_id" and meta.id_mode == "remap" and "user" in meta.vocab:
            _check_ids(ids, "user", meta, column, int, locate)  # checked, never hashed
        if column == "label":
            bad = (ids != 0) & (ids != 1)
            if bad.any():
                i = _first(bad)
                raise DataError(f"{locate(i, column)}: label {ids[i]}; labels must be 0 or 1")
        scalars[column] = _check_ids(ids, vocab, meta, column, int, locate)
    scalars[ROW_ID] = np.arange(first_row_id, first_row_id + n, dtype=np.int64)
    assert offsets is not None
    return Columns(Lists(offsets, values), scalars)


def gather(columns: Columns, rows: np.ndarray, max_len: int | None) -> Columns:
    """The given rows, in that order, with lists cut to their last ``max_len`` values.

    A run of consecutive rows whose lists need no cutting is returned as views (no copy)."""
    offsets = columns.lists.offsets
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and (rows[1:] > rows[:-1]).all():
        start, stop = int(rows[0]), int(rows[-1]) + 1
        run = offsets[start : stop + 1]
        if max_len is None or not (np.diff(run) > max_len).any():
            lo, hi = run[0], run[-1]
            lists = Lists(run - lo, {k: v[lo:hi] for k, v in columns.lists.values.items()})
            return Columns(lists, {k: v[start:stop] for k, v in columns.scalars.items()})
    starts, ends = offsets[rows], offsets[rows + 1]
    if max_len is not None:
        starts = np.maximum(starts, ends - max_len)
    lengths = ends - starts
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    index = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    lists = Lists(new_offsets, {k: v[index] for k, v in columns.lists.values.items()})
    return Columns(lists, {k: v[rows] for k, v in columns.scalars.items()})


def concat(parts: list[Columns]) -> Columns:
    """Rows of several :class:`Columns` one after the other."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.concatenate([np.diff(p.lists.offsets) for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    keys = parts[0].lists.values
    lists = Lists(offsets, {k: np.concatenate([p.lists.values[k] for p in parts]) for k in keys})
    scalars = {k: np.concatenate([p.scalars[k] for p in parts]) for k in parts[0].scalars}
    return Columns(lists, scalars)


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Views of Arrow buffers are read-only, and torch wants writable memory: copy those.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def to_batch(columns: Columns, meta: DatasetMeta) -> Batch:
    """The :class:`Batch` of ``columns``."""
    n = len(columns)
    lengths = np.diff(columns.lists.offsets)
    keys, values, key_lengths = [], [], []
    for column, vocab in list_columns(meta).items():
        if not vocab:
            continue  # timestamps are not an embedding feature
        keys.append(vocab if meta.kind == "seq" else f"history_{vocab}")
        values.append(columns.lists.values[column])
        key_lengths.append(lengths)
    if meta.kind == "ctr":
        for column, vocab in scalar_columns(meta).items():
            if vocab:
                keys.append(f"candidate_{vocab}")
                values.append(columns.scalars[column])
                key_lengths.append(np.ones(n, dtype=np.int64))
    features = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(key_lengths)),
    )
    s = columns.scalars
    batch = Batch(features, _tensor(s["user_id"]), _tensor(s[ROW_ID]))
    if meta.kind == "ctr":
        batch.labels = _tensor(s["label"]).to(torch.float32)
        batch.timestamps = _tensor(s["timestamp"])
    return batch
