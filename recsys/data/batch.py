"""Arrow row groups → validated NumPy columns → TorchRec batches, without per-row Python.

This module owns the value-level contract of a dataset (no nulls, ids in range, labels 0/1,
side-feature lists aligned with item lists), the ``hash`` id mode, truncation of sequences to
their most recent ``max_len`` events, and the :class:`Batch` handed to models: a
``KeyedJaggedTensor`` of sparse features plus dense tensors. Every step works on whole Arrow
offset and value buffers with vectorised NumPy: :func:`decode` validates a decoded chunk,
:func:`assemble` makes a batch of runs or gathered rows of chunks (file order), and for
shuffled reading :func:`group` regroups a chunk's rows by the batch they go to (into an
:class:`Arena`) so that :func:`assemble_groups` makes a batch of block copies.

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
from recsys.data.segments import copy_segments

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
    """Decoded, validated rows: aligned list columns and a table of the scalar columns, all
    NumPy int64."""

    lists: Lists
    table: np.ndarray
    """int64 [scalar columns, rows]: one row per name of :attr:`Layout.scalars`, in order."""

    def __len__(self) -> int:
        return len(self.lists.offsets) - 1


@dataclass(frozen=True)
class Layout:
    """Where the columns of a dataset go in a :class:`Batch` (worked out once per stream)."""

    lists: tuple[str, ...]
    """Every list column, item list first (offsets shared)."""
    list_keys: tuple[str, ...]
    """The list columns whose ids go to the ``KeyedJaggedTensor``, in key order."""
    scalars: tuple[str, ...]
    """Rows of :attr:`Columns.table`: candidate id columns (``ctr``), then ``user_id``,
    :data:`ROW_ID`, and ``label``, ``timestamp`` (``ctr``)."""
    candidates: int
    """How many leading rows of the table are candidate ids (one per row each)."""
    keys: tuple[str, ...]
    """Feature keys of the ``KeyedJaggedTensor``."""
    ctr: bool

    @classmethod
    def of(cls, meta: DatasetMeta, conditions: bool = False) -> Layout:
        """The layout of ``meta``'s columns; ``conditions``: with its condition lists."""
        lists, scalars = list_columns(meta, conditions), scalar_columns(meta)
        ctr = meta.kind == "ctr"
        list_keys = tuple(c for c, vocab in lists.items() if vocab)
        candidates = tuple(c for c, vocab in scalars.items() if vocab and ctr)
        extra = ("user_id", ROW_ID) + (("label", "timestamp") if ctr else ())
        names = [lists[c] for c in list_keys]
        keys = names if not ctr else [f"history_{v}" for v in names]
        keys += [f"candidate_{scalars[c]}" for c in candidates]
        return cls(tuple(lists), list_keys, candidates + extra, len(candidates), tuple(keys), ctr)


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
    extra: torch.Tensor | None = None
    """float32 [B, k]: dense features joined to the rows after loading (LUM's user-model
    outputs, ``recsys.models.lum_features``); never set inside loader workers."""

    def __len__(self) -> int:
        return len(self.row_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value if value is None else value.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    def __reduce__(self):
        if self.extra is not None:
            raise TypeError("a Batch with extra features is joined after loading, not pickled")
        # Crossing from a loader worker, every tensor would get its own shared-memory segment
        # (a few system calls each). Packed arrays pickled by value through the worker's pipe
        # are cheaper; the ids, the bulk of a batch, travel as int32 when they fit (half the
        # bytes through the pipe), everything else as one int64 array (labels are 0/1).
        # NumPy, not torch: its reductions and casts are several times faster on one core.
        ids = self.features.values().numpy()
        # One pass for both bounds: read as unsigned, only ids in [0, 2^31) are below 2^31.
        if ids.dtype == np.int64 and ids.size and ids.view(np.uint64).max() < 2**31:
            ids = ids.astype(np.int32)
        parts = [self.features.lengths(), self.user_ids, self.row_ids]
        if self.labels is not None:
            parts += [self.labels, self.timestamps]
        packed = np.concatenate([p.numpy() for p in parts], dtype=np.int64, casting="unsafe")
        sizes = [p.shape[0] for p in parts]
        return _unpack, (self.features.keys(), ids, packed, sizes)


def _unpack(keys: list[str], ids: np.ndarray, packed: np.ndarray, sizes: list[int]) -> Batch:
    ends = np.cumsum(sizes).tolist()
    parts = [packed[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    values = torch.from_numpy(ids.astype(np.int64, copy=False))
    features = KeyedJaggedTensor(keys=keys, values=values, lengths=torch.from_numpy(parts[0]))
    batch = Batch(features, torch.from_numpy(parts[1]), torch.from_numpy(parts[2]))
    if len(parts) > 3:
        batch.labels = torch.from_numpy(parts[3].astype(np.float32))
        batch.timestamps = torch.from_numpy(parts[4])
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
    # One pass for both bounds (negative ids read as unsigned are >= 2^63); the offending
    # row is searched only on failure.
    if values.view(np.uint64).max() < size:
        return values
    if values.min() < 0:
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
    table: pa.Table | pa.RecordBatch,
    meta: DatasetMeta,
    first_row_id: int,
    locate: Locate,
    conditions: bool = False,
) -> Columns:
    """Validate rows of a row group and view them as NumPy columns: list values without a
    copy where the Arrow buffers are already int64, scalars copied into one table
    (``conditions``: the condition lists too)."""
    n = table.num_rows
    lists = list_columns(meta, conditions)
    layout = Layout.of(meta, conditions)
    offsets: np.ndarray | None = None
    values: dict[str, np.ndarray] = {}
    for column, vocab in lists.items():
        array = _array(table.column(column))
        if array.null_count:
            i = _first(np.asarray(array.is_null()))
            raise DataError(f"{locate(i, column)}: null list; use an empty list instead")
        raw = np.asarray(array.offsets, dtype=np.int64)
        flat = array.values.slice(raw[0], raw[-1] - raw[0])
        own = raw - raw[0] if raw[0] else raw
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
    scalars = np.empty((len(layout.scalars), n), dtype=np.int64)
    where = {name: i for i, name in enumerate(layout.scalars)}
    for column, vocab in scalar_columns(meta).items():
        raw = bool(vocab) and meta.id_mode == "hash"
        ids = _int64(_array(table.column(column)), column, locate, int, raw=raw)
        if column == "user_id" and meta.id_mode == "remap" and "user" in meta.vocab:
            _check_ids(ids, "user", meta, column, int, locate)  # checked, never hashed
        # One pass each for min and max; the offending row is searched only on failure.
        if column == "label" and n and (ids.min() < 0 or ids.max() > 1):
            i = _first((ids != 0) & (ids != 1))
            raise DataError(f"{locate(i, column)}: label {ids[i]}; labels must be 0 or 1")
        scalars[where[column]] = _check_ids(ids, vocab, meta, column, int, locate)
    scalars[where[ROW_ID]] = np.arange(first_row_id, first_row_id + n, dtype=np.int64)
    assert offsets is not None
    return Columns(Lists(offsets, values), scalars)


Rows = slice | np.ndarray
"""Rows of a chunk: a run ``slice(start, stop)``, or ascending row indices."""


def _fresh(n: int) -> np.ndarray:
    return np.empty(n, dtype=np.int64)


def gather(
    columns: Columns,
    rows: np.ndarray,
    max_len: int | None,
    empty: Callable[[int], np.ndarray] = _fresh,
) -> Columns:
    """The given rows, in that order, with lists cut to their last ``max_len`` values, in
    memory from ``empty(n)`` (n int64s).

    A run of consecutive rows whose lists need no cutting is returned as views (no copy)."""
    offsets = columns.lists.offsets
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and (rows[1:] > rows[:-1]).all():
        start, stop = int(rows[0]), int(rows[-1]) + 1
        run = offsets[start : stop + 1]
        if max_len is None or not (np.diff(run) > max_len).any():
            lo, hi = run[0], run[-1]
            lists = Lists(run - lo, {k: v[lo:hi] for k, v in columns.lists.values.items()})
            return Columns(lists, columns.table[:, start:stop])
    starts, ends = offsets[rows], offsets[rows + 1]
    if max_len is not None:
        starts = np.maximum(starts, ends - max_len)
    lengths = ends - starts
    new_offsets = empty(len(rows) + 1)
    new_offsets[0] = 0
    np.cumsum(lengths, out=new_offsets[1:])
    total = int(new_offsets[-1])
    values = {
        k: copy_segments(v, starts, lengths, empty(total)) for k, v in columns.lists.values.items()
    }
    table = empty(len(columns.table) * len(rows)).reshape(len(columns.table), len(rows))
    np.take(columns.table, rows, axis=1, out=table, mode="clip")
    return Columns(Lists(new_offsets, values), table)


def _spans(chunk: Columns, rows: Rows, max_len: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Where the kept values of each row start, how many there are, and the first value of
    the block they form when they lie end to end (-1 when they do not)."""
    offsets = chunk.lists.offsets
    if isinstance(rows, slice):
        bounds = offsets[rows.start : rows.stop + 1]
        starts, lengths = bounds[:-1], np.diff(bounds)
        if max_len is None or not len(lengths) or lengths.max() <= max_len:
            return starts, lengths, int(bounds[0])  # a run, nothing cut: one block
        ends = bounds[1:]
    else:
        starts, ends = offsets[rows], offsets[rows + 1]
    if max_len is not None:
        starts = np.maximum(starts, ends - max_len)
    lengths = ends - starts
    block = len(starts) > 0 and bool((starts[1:] == ends[:-1]).all())
    return starts, lengths, int(starts[0]) if block else -1


def assemble(pieces: list[tuple[Columns, Rows]], layout: Layout, max_len: int | None) -> Batch:
    """The :class:`Batch` of the given rows of decoded chunks, in that order, with lists cut
    to their last ``max_len`` values.

    ``pieces`` are ``(chunk, rows)`` pairs. Every id is copied exactly once, straight into
    the batch's single ``KeyedJaggedTensor`` values buffer: the rows of a piece whose values
    lie end to end as one block copy, other rows through one index shared by all list
    columns; the scalars of a piece in one copy of its table's columns.
    """
    if len(pieces) == 1 and isinstance(pieces[0][1], slice):  # the common case, in file order
        chunk, rows = pieces[0]
        bounds = chunk.lists.offsets[rows.start : rows.stop + 1]
        lengths = bounds[1:] - bounds[:-1]
        if max_len is None or not len(lengths) or lengths.max() <= max_len:
            lo, hi, table = int(bounds[0]), int(bounds[-1]), chunk.table[:, rows]
            blocks = [chunk.lists.values[key][lo:hi] for key in layout.list_keys]
            values = np.concatenate([*blocks, table[: layout.candidates].reshape(-1)])
            return _batch(values, lengths, table, layout)
    spans = [_spans(chunk, rows, max_len) for chunk, rows in pieces]
    lengths = spans[0][1] if len(spans) == 1 else np.concatenate([s[1] for s in spans])
    n, total = len(lengths), int(lengths.sum())
    lists, c = len(layout.list_keys), layout.candidates
    values = np.empty(total * lists + n * c, dtype=np.int64)
    run = len(pieces) == 1 and isinstance(pieces[0][1], slice)
    if run:  # one run of rows: its scalars are a view of the chunk's table
        table = pieces[0][0].table[:, pieces[0][1]]
    else:
        table = np.empty((len(layout.scalars), n), dtype=np.int64)
    at_value, at_row = 0, 0
    for (chunk, rows), (starts, piece, block) in zip(pieces, spans, strict=True):
        m, k = int(piece.sum()) if len(spans) > 1 else total, len(piece)
        if block >= 0:
            for i, key in enumerate(layout.list_keys):
                base = i * total + at_value
                values[base : base + m] = chunk.lists.values[key][block : block + m]
        else:
            for i, key in enumerate(layout.list_keys):
                base = i * total + at_value
                copy_segments(chunk.lists.values[key], starts, piece, values[base : base + m])
        if not run:
            table[:, at_row : at_row + k] = chunk.table[:, rows]
        at_value, at_row = at_value + m, at_row + k
    if c:
        values[total * lists :].reshape(c, n)[:] = table[:c]
    return _batch(values, lengths, table, layout)


def _batch(values: np.ndarray, lengths: np.ndarray, table: np.ndarray, layout: Layout) -> Batch:
    """The :class:`Batch` of a filled values buffer, the rows' list lengths and their
    scalar table."""
    n, lists, c = len(lengths), len(layout.list_keys), layout.candidates
    key_lengths = np.ones(n * (lists + c), dtype=np.int64)
    for i in range(lists):
        key_lengths[i * n : (i + 1) * n] = lengths
    features = KeyedJaggedTensor(
        keys=list(layout.keys),
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(key_lengths),
    )
    batch = Batch(features, torch.from_numpy(table[c]), torch.from_numpy(table[c + 1]))
    if layout.ctr:
        batch.labels = torch.from_numpy(table[c + 2].astype(np.float32))
        batch.timestamps = torch.from_numpy(table[c + 3])
    return batch


@dataclass
class Groups:
    """The rows of a decoded chunk regrouped by the batch each goes to (shuffled reading):
    batch ``k``'s rows are the run ``rows[k]:rows[k + 1]``, their values
    ``values[k]:values[k + 1]``, lists already cut to ``max_len``."""

    columns: Columns
    lengths: np.ndarray
    """The list length of each (regrouped) row."""
    rows: list[int]
    values: list[int]


class Arena:
    """Memory handed out in slices and reused from one shuffle buffer to the next.

    The regrouped rows of a buffer (tens of MB) in fresh arrays would cost a page fault per
    4 KiB each time: a quarter of the shuffled stream's time."""

    BLOCK = 1 << 22
    """int64s per block (32 MiB)."""

    def __init__(self) -> None:
        self._blocks: list[np.ndarray] = []
        self._block = self._at = 0

    def reset(self) -> None:
        """Make everything handed out so far free again (its users must be gone)."""
        self._block = self._at = 0

    def empty(self, n: int) -> np.ndarray:
        """``n`` uninitialised int64s."""
        while True:
            if self._block == len(self._blocks):
                self._blocks.append(np.empty(max(n, self.BLOCK), dtype=np.int64))
            block = self._blocks[self._block]
            if self._at + n <= len(block):
                self._at += n
                return block[self._at - n : self._at]
            if self._at == 0:  # a block too small for n alone
                self._blocks[self._block] = np.empty(n, dtype=np.int64)
                continue
            self._block, self._at = self._block + 1, 0


def group(
    columns: Columns, batch_of: np.ndarray, batches: int, max_len: int | None, arena: Arena
) -> Groups:
    """Regroup a chunk's rows by ``batch_of[row]`` (in ``[0, batches)``, or -1: not read),
    keeping row order within a batch, in memory of ``arena``.

    Gathering a chunk right after decoding it, while it is still in cache, then copying whole
    runs into each batch, is several times faster than gathering each batch's rows from a
    whole decoded buffer.
    """
    # A stable sort of small integers is a radix sort: several times faster than of int64.
    narrow = np.int16 if batches < 2**15 else np.int32 if batches < 2**31 else np.int64
    order = np.argsort(batch_of.astype(narrow), kind="stable")
    counts = np.bincount(batch_of[batch_of >= 0], minlength=batches)
    rows = np.zeros(batches + 1, dtype=np.int64)
    np.cumsum(counts, out=rows[1:])
    grouped = gather(columns, order[len(order) - int(rows[-1]) :], max_len, arena.empty)
    offsets = grouped.lists.offsets
    lengths = np.subtract(offsets[1:], offsets[:-1], out=arena.empty(len(offsets) - 1))
    return Groups(grouped, lengths, rows.tolist(), offsets[rows].tolist())


def detach(groups: Groups, k: int) -> Groups:
    """Batch ``k``'s rows of ``groups`` as their own groups (batch 0), copied out of their
    arena."""
    a, b, lo, hi = groups.rows[k], groups.rows[k + 1], groups.values[k], groups.values[k + 1]
    columns = groups.columns
    values = {key: v[lo:hi].copy() for key, v in columns.lists.values.items()}
    lists = Lists(columns.lists.offsets[a : b + 1] - lo, values)
    detached = Columns(lists, columns.table[:, a:b].copy())
    return Groups(detached, groups.lengths[a:b].copy(), [0, b - a], [0, hi - lo])


def assemble_groups(parts: list[tuple[Groups, int]], layout: Layout) -> Batch:
    """The :class:`Batch` of batch ``k``'s rows of each ``(groups, k)`` part, in that order:
    one block copy per part and column."""
    spans = [(g, g.rows[k], g.rows[k + 1], g.values[k], g.values[k + 1]) for g, k in parts]
    lengths = np.concatenate([g.lengths[a:b] for g, a, b, _, _ in spans])
    table = np.concatenate([g.columns.table[:, a:b] for g, a, b, _, _ in spans], axis=1)
    blocks = [
        g.columns.lists.values[key][lo:hi] for key in layout.list_keys for g, _, _, lo, hi in spans
    ]
    values = np.concatenate([*blocks, table[: layout.candidates].reshape(-1)])
    return _batch(values, lengths, table, layout)
