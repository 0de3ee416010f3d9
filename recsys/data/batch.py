"""Arrow row groups → validated NumPy columns → TorchRec batches, without per-row Python.

This module owns the way from decoded Arrow chunks to batches: the value-level checks of
every chunk (the rules, no nulls, ids in range, labels 0/1, side-feature lists aligned with
item lists, are :mod:`recsys.data.checks`), the ``hash`` id mode, truncation of sequences to
their most recent ``max_len`` events, and the :class:`Batch` handed to models: a
``KeyedJaggedTensor`` of sparse features plus dense tensors. Every step works on whole Arrow
offset and value buffers with vectorised NumPy: :func:`decode` validates a decoded chunk,
:func:`assemble` makes a batch of runs or gathered rows of chunks (file order), and for
shuffled reading :func:`scatter` copies the rows of a whole buffer's chunks straight into the
batches they go to.

Feature keys of the ``KeyedJaggedTensor``:
- ``seq``: ``item`` and one key per side feature (``category``, ...), one list per sequence.
- ``ctr``: ``history_item``, ``history_<side>``, and ``candidate_item``, ``candidate_<side>``
  (one id per sample).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

import numpy as np
import pyarrow as pa
import torch
from torchrec import KeyedJaggedTensor

from recsys.data import checks
from recsys.data.checks import Locate, Report
from recsys.data.memory import Slabs
from recsys.data.schema import DatasetMeta, list_columns, scalar_columns
from recsys.data.segments import Scatter, copy_segments

INT64 = np.dtype(np.int64)

ROW_ID = "__row_id"
"""Column added to every decoded row group: the row's index in the whole dataset."""


@dataclass
class Lists:
    """Aligned list columns of a set of rows: one offsets array, values per column."""

    offsets: np.ndarray
    """int64, length rows + 1, starting at 0."""
    values: dict[str, np.ndarray]
    """Flat ids per column of the batches' lists, all of length offsets[-1]: int64 views of
    Arrow's buffers as decoded, or :attr:`Layout.ids` in a batch carried over to the next
    shuffle buffer (:meth:`Gathered.columns`)."""


@dataclass
class Columns:
    """Decoded, validated rows: aligned list columns (those the batches hold) and a table of
    the scalar columns, as NumPy arrays."""

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
    ids: np.dtype = INT64
    """Type of the ``KeyedJaggedTensor``'s values: int32 when every table has at most 2^31
    rows (every id, checked or hashed into its table, fits; half the bytes to copy and to
    send between ranks), else int64."""

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
        tables = [meta.vocab[lists[c]] for c in list_keys]
        tables += [meta.vocab[scalars[c]] for c in candidates]
        ids = np.dtype(np.int32 if max(tables, default=0) <= 2**31 else np.int64)
        return cls(
            tuple(lists), list_keys, candidates + extra, len(candidates), tuple(keys), ctr, ids
        )


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
        # bytes through the pipe; a stream's batches have them so already when its tables
        # fit, Layout.ids), everything else as one int64 array (labels are 0/1). NumPy, not
        # torch: its reductions and casts are several times faster on one core.
        ids = self.features.values().numpy()
        dtype = ids.dtype.str
        # One pass for both bounds: read as unsigned, only ids in [0, 2^31) are below 2^31.
        if ids.dtype == np.int64 and ids.size and ids.view(np.uint64).max() < 2**31:
            ids = ids.astype(np.int32)
        parts = [self.features.lengths(), self.user_ids, self.row_ids]
        if self.labels is not None:
            parts += [self.labels, self.timestamps]
        packed = np.concatenate([p.numpy() for p in parts], dtype=np.int64, casting="unsafe")
        sizes = [p.shape[0] for p in parts]
        return _unpack, (self.features.keys(), ids, packed, sizes, dtype)


def _unpack(
    keys: list[str], ids: np.ndarray, packed: np.ndarray, sizes: list[int], dtype: str
) -> Batch:
    ends = np.cumsum(sizes).tolist()
    parts = [packed[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    values = torch.from_numpy(ids.astype(dtype, copy=False))  # the type the batch had
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


def _ids(
    values: np.ndarray,
    vocab: str,
    meta: DatasetMeta,
    column: str,
    row_of: Callable[[int], int],
    report: Report,
    bounds: tuple[int, int] | None = None,
) -> np.ndarray:
    """Check (remap) or hash (hash mode) the ids of one column; return the ids (int64).
    ``bounds``: the smallest and largest id of the column's row group, from its footer (no
    scan when they lie in range)."""
    if not vocab:
        return values
    size = meta.vocab[vocab]
    if meta.id_mode == "hash":  # raw ids (uint64 too) in, int64 out, even when empty
        return hash_ids(values, size)
    for bad in checks.ids(values, size, vocab, column, row_of, bounds):
        report(bad)
    return values


def _int64(
    array: pa.Array,
    column: str,
    row_of: Callable[[int], int],
    report: Report,
    raw: bool = False,
) -> np.ndarray:
    """The column's values as int64 (``raw``: unsigned 64-bit ids kept as they are, for
    hashing). Bad values that ``report`` lets through are read as 0, so that the rest of
    the column is checked."""
    bad = checks.null_values(array, column, row_of)
    if bad is not None:
        report(bad)
        array = array.fill_null(0)
    if pa.types.is_uint64(array.type):
        values = np.asarray(array)
        if raw:
            return values
        bad = checks.fits_int64(values, column, row_of)
        if bad is not None:
            report(bad)
            values = np.where(bad.mask, 0, values)
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
    bounds: Mapping[str, tuple[int, int]] = MappingProxyType({}),
    columns: Collection[str] | None = None,
    layout: Layout | None = None,
    report: Report | None = None,
) -> Columns:
    """Validate rows of a row group and view them as NumPy columns: list values without a
    copy where the Arrow buffers are already int64, scalars copied into one table
    (``conditions``: the condition lists too).

    ``columns``: the dataset's columns ``table`` holds, at least one list column and every
    scalar column or none (None: all). List columns are checked against the first of them;
    without scalar columns the table has no rows. ``layout``: ``Layout.of(meta,
    conditions)``, when the caller has it.

    ``bounds``: the smallest and largest value per column of the rows' row group, as its
    footer records them (:func:`recsys.data.files.column_bounds`): a column whose bounds are
    in range is not scanned (ids, labels); the others are, value by value.

    ``report``: what to do with bad values (:mod:`recsys.data.checks`); by default the first
    raises its :class:`DataError`, placed by ``locate``. A report that returns gets every bad
    value of the chunk, and the columns returned are then of no use.

    List ids stay views of Arrow's buffers (int64), narrowed to :attr:`Layout.ids` as they
    are copied into a batch."""
    n = table.num_rows
    report = report or checks.raising(locate)
    lists, scalar_names = list_columns(meta, conditions), scalar_columns(meta)
    if columns is not None:
        lists = {c: v for c, v in lists.items() if c in columns}
        every = len(scalar_names)
        scalar_names = {c: v for c, v in scalar_names.items() if c in columns}
        if scalar_names and len(scalar_names) != every:
            raise ValueError("decode: columns must hold every scalar column or none")
    layout = layout or Layout.of(meta, conditions)
    offsets: np.ndarray | None = None
    first = next(iter(lists), "")
    nulls: np.ndarray | None = None  # rows of null lists, when a report let them through
    values: dict[str, np.ndarray] = {}
    for column, vocab in lists.items():
        array = _array(table.column(column))
        bad = checks.null_lists(array, column)
        if bad is not None:
            report(bad)
            nulls = bad.mask if nulls is None else nulls | bad.mask
        raw = np.asarray(array.offsets, dtype=np.int64)
        flat = array.values.slice(raw[0], raw[-1] - raw[0])
        own = raw - raw[0] if raw[0] else raw
        if offsets is None:
            offsets = own
        else:
            bad = checks.aligned(own, offsets, column, first, nulls)
            if bad is not None:
                report(bad)

        def row_of(position: int, own: np.ndarray = own) -> int:
            return int(np.searchsorted(own, position, side="right") - 1)

        ids = _int64(flat, column, row_of, report, raw=bool(vocab) and meta.id_mode == "hash")
        if not vocab:  # checked (nulls, alignment), but no batch holds it: not kept
            continue
        values[column] = _ids(ids, vocab, meta, column, row_of, report, bounds.get(column))
    rows = layout.scalars if scalar_names else ()
    scalars = np.empty((len(rows), n), dtype=np.int64)
    where = {name: i for i, name in enumerate(rows)}
    for column, vocab in scalar_names.items():
        raw = bool(vocab) and meta.id_mode == "hash"
        ids = _int64(_array(table.column(column)), column, int, report, raw=raw)
        if column == "user_id" and meta.id_mode == "remap" and "user" in meta.vocab:
            _ids(ids, "user", meta, column, int, report, bounds.get(column))  # never hashed
        if column == "label":
            bad = checks.labels(ids, column, bounds.get(column))
            if bad is not None:
                report(bad)
        scalars[where[column]] = _ids(ids, vocab, meta, column, int, report, bounds.get(column))
    if rows:
        scalars[where[ROW_ID]] = np.arange(first_row_id, first_row_id + n, dtype=np.int64)
    assert offsets is not None, "decode: no list column"
    return Columns(Lists(offsets, values), scalars)


Rows = slice | np.ndarray
"""Rows of a chunk: a run ``slice(start, stop)``, or ascending row indices."""


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
            return Columns(lists, columns.table[:, start:stop])
    starts, ends = offsets[rows], offsets[rows + 1]
    if max_len is not None:
        starts = np.maximum(starts, ends - max_len)
    lengths = ends - starts
    new_offsets = np.empty(len(rows) + 1, dtype=np.int64)
    new_offsets[0] = 0
    np.cumsum(lengths, out=new_offsets[1:])
    total = int(new_offsets[-1])
    values = {
        k: copy_segments(v, starts, lengths, np.empty(total, dtype=v.dtype))
        for k, v in columns.lists.values.items()
    }
    table = np.empty((len(columns.table), len(rows)), dtype=np.int64)
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
            candidates = table[: layout.candidates].reshape(-1)
            values = np.concatenate([*blocks, candidates], dtype=layout.ids, casting="same_kind")
            return _batch(values, lengths, table, layout)
    spans = [_spans(chunk, rows, max_len) for chunk, rows in pieces]
    lengths = spans[0][1] if len(spans) == 1 else np.concatenate([s[1] for s in spans])
    n, total = len(lengths), int(lengths.sum())
    lists, c = len(layout.list_keys), layout.candidates
    values = np.empty(total * lists + n * c, dtype=layout.ids)
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
class Gathered:
    """One batch's shuffled rows, copied out of their chunks (:func:`scatter`)."""

    values: np.ndarray
    """The batch's ``KeyedJaggedTensor`` values: each list key's ids end to end, then room
    for the candidate ids (one per row and candidate column)."""
    lengths: np.ndarray
    """The list length of each row."""
    table: np.ndarray
    """int64 [scalar columns, rows], as :attr:`Columns.table`."""

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, layout: Layout) -> Batch:
        """The :class:`Batch` of these rows."""
        c, n = layout.candidates, len(self)
        if c:
            self.values[len(self.values) - c * n :].reshape(c, n)[:] = self.table[:c]
        return _batch(self.values, self.lengths, self.table, layout)

    def columns(self, layout: Layout) -> Columns:
        """These rows as a chunk of :attr:`Layout.list_keys` (to join a later buffer's)."""
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        total = int(offsets[-1])
        values = {
            k: self.values[i * total : (i + 1) * total] for i, k in enumerate(layout.list_keys)
        }
        return Columns(Lists(offsets, values), self.table)


class Scattering:
    """The rows of a shuffle buffer's decoded chunks on their way into the batches they go to
    (:func:`scatter` copies them all at once).

    Made from ``(chunk, batch_of)`` pairs as :func:`scatter` takes them, whose chunks need
    hold only the lists' offsets and the scalars: it counts each batch's size from the rows'
    list lengths (cut to ``max_len``), allocates each batch's ``KeyedJaggedTensor`` values
    buffer in memory from ``slabs``, and puts the scalars in batch order. Each list key's ids
    are then copied by :meth:`copy`, chunk after chunk, straight into their batches: a key
    can come from a later decoding of the same rows (the stream decodes the item lists last,
    one chunk at a time, and copies each while it is still in cache).
    """

    def __init__(
        self,
        chunks: list[tuple[Columns, np.ndarray]],
        batches: int,
        layout: Layout,
        max_len: int | None,
        slabs: Slabs | None = None,
    ) -> None:
        slabs = slabs or Slabs()
        self._keys = {key: i for i, key in enumerate(layout.list_keys)}
        self._spans, self._batch_of, tables = [], [], []
        for columns, batch_of in chunks:
            if len(batch_of) != len(columns):
                raise IndexError("scatter: one batch per row of a chunk")
            starts, lengths, _ = _spans(columns, slice(0, len(columns)), max_len)
            self._spans.append((starts, lengths))
            self._batch_of.append(batch_of)
            tables.append((columns.table, lengths))
        self._ids: Scatter | None = None
        if not chunks:  # every row of the buffer was in skipped row groups
            empty = np.zeros((len(layout.scalars), 0), dtype=np.int64)
            self._out = [Gathered(np.zeros(0, layout.ids), empty[0], empty) for _ in range(batches)]
            return
        batch_of = np.concatenate(self._batch_of)
        if len(batch_of) and (batch_of.min() < -1 or batch_of.max() >= batches):
            raise IndexError(f"scatter: rows sent outside batches -1 to {batches - 1}")
        # The scalars (a few per row) by a stable sort on the batch: a radix sort of small
        # integers, then one gather in order, several times faster than scattering them.
        narrow = np.int16 if batches < 2**15 - 1 else np.int64
        order = np.argsort(batch_of.astype(narrow), kind="stable")
        counts = np.bincount(batch_of + 1, minlength=batches + 1)  # bincount takes no -1
        s, lists, c, n = (
            len(layout.scalars),
            len(layout.list_keys),
            layout.candidates,
            len(batch_of),
        )
        whole = slabs.empty((s + 1) * n).reshape(s + 1, n)  # the scalars, then the list lengths
        at = 0
        for scalars, lengths in tables:
            whole[:s, at : at + len(lengths)], whole[s, at : at + len(lengths)] = scalars, lengths
            at += len(lengths)
        kept = n - int(counts[0])
        table = slabs.empty((s + 1) * kept).reshape(s + 1, kept)
        np.take(whole, order[counts[0] :], axis=1, out=table)
        del whole
        edges = np.zeros(batches + 1, dtype=np.int64)
        np.cumsum(counts[1:], out=edges[1:])
        values_before = np.zeros(len(order) - counts[0] + 1, dtype=np.int64)
        np.cumsum(table[s], out=values_before[1:])
        totals = (values_before[edges[1:]] - values_before[edges[:-1]]).tolist()
        self._out = [
            Gathered(
                slabs.empty(t * lists + (b - a) * c, layout.ids), table[s, a:b], table[:s, a:b]
            )
            for a, b, t in zip(edges[:-1].tolist(), edges[1:].tolist(), totals, strict=True)
        ]
        self._ids = Scatter([g.values for g in self._out], totals, columns=lists)

    def copy(self, chunk: int, key: str, values: np.ndarray) -> None:
        """Copy list key ``key``'s ids of chunk ``chunk`` (``values``: laid out by that
        chunk's offsets) into their batches; a key's chunks come in order."""
        if self._ids is None:
            raise IndexError("scatter: no chunks to copy into")
        starts, lengths = self._spans[chunk]
        self._ids.segments(values, starts, lengths, self._batch_of[chunk], column=self._keys[key])

    def result(self) -> list[Gathered]:
        """The batches, once every key of every chunk is copied."""
        if self._ids is not None and not self._ids.full():
            raise AssertionError("scatter: a batch was not filled exactly")
        return self._out


def scatter(
    chunks: list[tuple[Columns, np.ndarray]],
    batches: int,
    layout: Layout,
    max_len: int | None,
    slabs: Slabs | None = None,
) -> list[Gathered]:
    """The rows of decoded chunks gathered by the batch each goes to (shuffled reading).

    ``chunks`` are ``(chunk, batch_of)`` pairs: row ``i`` of a chunk goes to batch
    ``batch_of[i]`` (in ``[0, batches)``, or -1: not read), after the rows of earlier chunks
    and rows before it. Lists are cut to their last ``max_len`` values. The batches' sizes
    are counted first, so every id is copied exactly once, straight into its batch's
    ``KeyedJaggedTensor`` values buffer, in memory from ``slabs`` (reused from one buffer to
    the next once its batches are gone).
    """
    filling = Scattering(chunks, batches, layout, max_len, slabs)
    for i, (columns, _) in enumerate(chunks):
        for key in layout.list_keys:
            filling.copy(i, key, columns.lists.values[key])
    return filling.result()
