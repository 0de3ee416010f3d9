"""Streaming a Parquet dataset into batches: exactly once per epoch across ranks × workers.

This module owns the order in which rows are read and the cursor that lets a restarted job
continue where it stopped. The unit of work is a row group:

1. every epoch, all row groups of the dataset are shuffled with ``(seed, epoch)`` (the same
   order on every rank), laid end to end and cut into one consecutive share of rows per
   reader (``world_size × num_workers`` readers; a row group may be split between two), so
   each row is read by exactly one reader per epoch; the shares are sized so that every
   reader yields the same number of batches (:class:`Share`), so no rank runs out while
   another still has rows — every row of an epoch is trained on;
2. a reader takes its row groups ``buffer_row_groups`` at a time, shuffles the rows of that
   buffer with ``(seed, epoch, reader, buffer)``, and cuts the row stream into batches
   (a batch may span two buffers; within a batch, rows are in buffer order);
3. the cursor is ``(epoch, rows done)`` per reader. The row stream is a pure function of the
   seed, epoch and reader, so resuming skips whole buffers by their footer row counts and
   restarts inside one buffer at the right offset: no row repeated or lost.

Each pass (``iter``) reads one epoch from its start, or from the cursor given to
:meth:`ParquetStream.load_state_dict`; at its end the stream moves to the next epoch.

Use it with ``torchdata``'s ``StatefulDataLoader(stream, batch_size=None, num_workers=N)``,
whose ``state_dict`` collects each worker's cursor. Call :meth:`ParquetStream.set_epoch`
before each epoch when the loader has workers (as with ``DistributedSampler``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from recsys.data import checks
from recsys.data.batch import (
    Batch,
    Columns,
    Gathered,
    Layout,
    Rows,
    Scattering,
    assemble,
    decode,
    gather,
    scatter,
)
from recsys.data.files import Dataset, column_bounds, open_dataset
from recsys.data.memory import Slabs
from recsys.data.schema import DataError, DatasetMeta, describe, list_columns, scalar_columns

log = logging.getLogger(__name__)

IN_ORDER_ROWS = 2048
"""Rows decoded at a time in file order (rounded to whole batches): pyarrow decodes small
batches into memory that is still in cache, about 1.3x faster than a large chunk."""
SHUFFLE_CHUNK_ROWS = 4096
"""Rows decoded at a time into a shuffle buffer (small chunks decode faster, see above). The
chunks of every column but the item lists stay in Arrow's buffers until the whole buffer is
decoded; the item lists are decoded next, a chunk at a time, and each chunk's ids copied
into their batches at once (:meth:`ParquetStream._two_passes`)."""


@dataclass(frozen=True)
class StreamConfig:
    """How a dataset is read."""

    batch_size: int = 512
    """Rows per batch on each rank."""
    max_len: int | None = 200
    """Keep only the most recent ``max_len`` events of each sequence (None: keep all).
    Longer sequences are cut, not rejected."""
    shuffle: bool = True
    """Shuffle row-group order and rows within each buffer, seeded per epoch."""
    seed: int = 0
    """Seed of every shuffle."""
    buffer_row_groups: int = 1
    """Row groups per shuffle buffer of a reader (memory: this many row groups decoded)."""
    drop_last: bool = False
    """Drop each reader's last, smaller batch of an epoch."""
    conditions: bool = False
    """Also read the dataset's condition lists (LUM), as KJT keys named after them
    (``history_<name>`` in ``ctr``); GPSD's models read none."""
    skip_bad_row_groups: bool = False
    """Skip a row group that cannot be read or holds invalid values (logged, counted in the
    cursor's ``skipped_rows``) instead of stopping with its error."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None, got {self.max_len}")
        if self.buffer_row_groups < 1:
            raise ValueError(f"buffer_row_groups must be >= 1, got {self.buffer_row_groups}")


@dataclass(frozen=True)
class _Unit:
    """Rows ``start:stop`` of one row group (all of it unless row groups are too few)."""

    part: int
    row_group: int
    start: int
    stop: int
    group_first_row_id: int
    """Dataset-wide index of the row group's first row."""

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _Buffer:
    """A shuffle buffer's rows and the batches they go to."""

    units: list[_Unit]
    head: list[tuple[Columns, np.ndarray]]
    """Rows before the buffer's: the pending batch's, carried from the last buffer."""
    batch_of: np.ndarray
    """The batch of each of the buffer's rows (-1: not read)."""
    batches: int


@dataclass(frozen=True)
class Skipped:
    """Rows of a bad row group that are skipped (``skip_bad_row_groups``): they count as read
    for the cursor and the batch layout, and bring no data."""

    rows: int


@dataclass(frozen=True)
class Share:
    """How an epoch's rows are split over readers so that every reader yields the same
    number of batches (collectives need every rank at every step).

    With ``N`` rows, ``R`` readers and batches of ``B``: ``K = ⌈N / (R·B)⌉`` steps. When the
    last step has at least one row per reader (``M = N − R·(K−1)·B ≥ R``), each reader gets
    ``(K−1)·B`` rows and a share of the last step's ``M``. Otherwise each reader gets
    ``(K−1)·B`` rows and ``M`` of them one more, which its last batch takes in (a batch of
    ``B + 1``): no row is left out. With ``drop_last``, every reader yields the batches of
    ``B`` rows that all readers can fill, and the rest is dropped."""

    rows: list[int]
    """Rows of each reader."""
    batches: int
    """Batches of every reader that has rows."""
    batch_size: int
    drop_last: bool

    @classmethod
    def of(cls, total: int, readers: int, config: StreamConfig) -> Share:
        b = config.batch_size
        if total == 0:
            return cls([0] * readers, 0, b, config.drop_last)
        steps = -(-total // (readers * b))
        last = total - readers * (steps - 1) * b
        if last >= readers:
            rows = [
                (steps - 1) * b + last // readers + (i < last % readers) for i in range(readers)
            ]
            batches = steps
        else:
            rows = [(steps - 1) * b + (i < last) for i in range(readers)]
            batches = max(steps - 1, 1)
        if config.drop_last:
            batches = min(rows) // b
        return cls(rows, batches, b, config.drop_last)

    def size(self, reader: int, index: int) -> int:
        """Rows of batch ``index`` of ``reader`` (0: past its last batch)."""
        if index >= self.batches:
            return 0
        if index < self.batches - 1 or self.drop_last:
            return self.batch_size
        return self.rows[reader] - (self.batches - 1) * self.batch_size


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ParquetStream(IterableDataset):
    """Batches of a ``seq`` or ``ctr`` Parquet dataset for one rank (see the module doc)."""

    def __init__(
        self,
        source: str | Sequence[str],
        config: StreamConfig | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        meta: DatasetMeta | None = None,
    ) -> None:
        self.config = config or StreamConfig()
        self.dataset: Dataset = open_dataset(source, meta)
        world_rank, world = _world()
        self.rank = world_rank if rank is None else rank
        self.world_size = world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.epoch = 0
        self._rows_done = 0
        self._finished = False  # the last pass read its epoch to the end
        self._skipped = 0  # rows of bad row groups skipped in the current epoch
        self._resume: dict[str, Any] | None = None  # a loaded cursor the next pass starts at
        self._reader: tuple[int, int] | None = None  # (reader, readers) of the current pass
        lists = list_columns(self.meta, self.config.conditions)
        self._columns = [*lists, *scalar_columns(self.meta)]
        self._layout = Layout.of(self.meta, self.config.conditions)
        # Shuffled buffers decode the item lists in a pass of their own (_two_passes) where
        # another list column gives the rows' lengths first.
        self._late: str | None = next(iter(lists)) if len(lists) > 1 else None

    @property
    def meta(self) -> DatasetMeta:
        return self.dataset.meta

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next (its own shuffle); a loaded cursor of another epoch is
        dropped."""
        self.epoch, self._finished = epoch, False
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None

    def _settings(self) -> dict[str, Any]:
        """What the row order depends on besides epoch and reader: a cursor is only valid
        with the same settings and the same files."""
        layout = [(posixpath.basename(p.path), p.row_groups) for p in self.dataset.parts]
        return {
            "seed": self.config.seed,
            "shuffle": self.config.shuffle,
            "buffer_row_groups": self.config.buffer_row_groups,
            "batch_size": self.config.batch_size,
            "files": hashlib.sha256(repr(layout).encode()).hexdigest()[:16],
        }

    def state_dict(self) -> dict[str, Any]:
        """The cursor of this reader: epoch, rows done in it, which reader, which settings.

        At the end of an epoch the cursor stays on it with every row done (a pass started
        from it reads nothing); the next pass without a loaded cursor moves to the next epoch.
        """
        if self._resume is not None:  # loaded but not started yet: still the same position
            return dict(self._resume)
        return {
            "epoch": self.epoch,
            "rows_done": self._rows_done,
            "reader": self._reader,
            "settings": self._settings(),
            "skipped_rows": self._skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue from a cursor saved by :meth:`state_dict`."""
        self.epoch, self._finished = int(state["epoch"]), False
        reader = state.get("reader")
        self._resume = {
            "epoch": self.epoch,
            "rows_done": int(state["rows_done"]),
            "reader": tuple(reader) if reader is not None else None,
            "settings": state.get("settings"),
            "skipped_rows": int(state.get("skipped_rows", 0)),
        }

    def _check_resume(self, resume: dict[str, Any], reader: tuple[int, int]) -> None:
        # DataError (a user error): the guard prints these as one line, no traceback.
        if resume["reader"] is not None and resume["reader"] != reader:
            raise DataError(
                f"the saved data cursor belongs to reader {resume['reader'][0]} of "
                f"{resume['reader'][1]} but this is reader {reader[0]} of {reader[1]}: "
                "resume with the same world size and number of loader workers"
            )
        saved, current = resume.get("settings"), self._settings()
        if saved is not None and saved != current:
            changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
            raise DataError(
                "the saved data cursor was made with other stream settings or files "
                f"(saved, now): {changed}; resume with the same ones or start the epoch over"
            )

    def _units(self, epoch: int) -> list[_Unit]:
        """Every non-empty row group of the dataset, in this epoch's order."""
        units, first = [], 0
        for p, part in enumerate(self.dataset.parts):
            for g, rows in enumerate(part.row_groups):
                if rows:
                    units.append(_Unit(p, g, 0, rows, first))
                first += rows
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(units))
            units = [units[i] for i in order]
        return units

    def _shares(self, epoch: int, readers: int) -> tuple[list[list[_Unit]], Share]:
        """Each reader's row ranges of ``epoch``: the epoch's row groups laid end to end and
        cut into ``readers`` consecutive shares whose batch counts are equal."""
        units = self._units(epoch)
        share = Share.of(sum(u.rows for u in units), readers, self.config)
        shares: list[list[_Unit]] = [[] for _ in range(readers)]
        reader, room = 0, share.rows[0]
        for u in units:
            start = u.start
            while start < u.stop:
                while room == 0:
                    reader += 1
                    room = share.rows[reader]
                take = min(room, u.stop - start)
                shares[reader].append(
                    _Unit(u.part, u.row_group, start, start + take, u.group_first_row_id)
                )
                start, room = start + take, room - take
        return shares, share

    def batches_in_epoch(self, epoch: int, num_workers: int = 0) -> int:
        """How many batches this rank yields in ``epoch`` through a loader with
        ``num_workers`` workers (0: the stream itself), from the footers alone: the same on
        every rank (readers without rows, when the dataset has fewer rows than readers,
        yield none)."""
        workers = max(1, num_workers)
        _, share = self._shares(epoch, self.world_size * workers)
        first = self.rank * workers
        return sum(share.batches if share.rows[first + w] else 0 for w in range(workers))

    def _reader_id(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[Batch]:
        reader = self._reader_id()
        resume, self._resume = self._resume, None
        if self._finished and resume is None:
            self.epoch += 1  # a plain new pass after a finished one reads the next epoch
        self._finished = False
        skip = resume["rows_done"] if resume else 0
        if skip:
            self._check_resume(resume, reader)
        self._reader, self._rows_done = reader, skip
        self._skipped = resume.get("skipped_rows", 0) if resume else 0
        epoch = self.epoch
        shares, share = self._shares(epoch, reader[1])
        units = shares[reader[0]]
        if not units:
            log.warning(
                "reader %d of %d has no rows: the dataset has fewer rows than readers", *reader
            )
        size = self.config.buffer_row_groups
        buffers = [units[i : i + size] for i in range(0, len(units), size)]
        layout, batch_size, max_len = (
            self._layout,
            self.config.batch_size,
            self.config.max_len,
        )
        in_order_rows = batch_size * max(1, IN_ORDER_ROWS // batch_size)
        pending: list[tuple[Columns, Rows]] = []  # rows of the next batch, in file order
        carry: Gathered | None = None  # or shuffled
        slabs = Slabs()
        pending_rows = 0
        files: dict[int, Any] = {}
        for b, buffer in enumerate(buffers):
            rows = sum(u.rows for u in buffer)
            if skip >= rows:
                skip -= rows
                continue
            if self.config.shuffle:  # the whole buffer decoded, its rows permuted
                rng = np.random.default_rng([self.config.seed, epoch, reader[0], b])
                order = rng.permutation(rows)[skip:]
                end = pending_rows + len(order)  # the pending batch is completed first
                base = self._rows_done // batch_size  # index of the pending batch
                last = share.batches - 1 - base  # of this reader's last batch, from it
                if last < 0:
                    break  # every batch is out (drop_last leaves the rest)
                within = np.arange(pending_rows, end) // batch_size
                if self.config.drop_last:
                    within[within > last] = -1
                else:  # the last batch takes in the row that has no step of its own
                    np.minimum(within, last, out=within)
                batches = min(-(-end // batch_size), last + 1)
                batch_of = np.full(rows, -1, dtype=np.int64)
                batch_of[order] = within
                head = (
                    []
                    if carry is None
                    else [(carry.columns(layout), np.zeros(len(carry), np.int64))]
                )
                # skip: resumed inside this buffer, its skipped rows counted already
                shuffled = _Buffer(buffer, head, batch_of, batches)
                filled = self._shuffled(shuffled, files, slabs, not skip)
                carry = None
                for k in range(batches):
                    gathered, filled[k] = filled[k], None
                    assert gathered is not None
                    target = share.size(reader[0], base + k)
                    pending_rows = min(end - k * batch_size, target)
                    if pending_rows < target:  # the last batch, completed by the next buffer
                        carry = gathered
                        continue
                    if len(gathered):
                        yield self._count(gathered.batch(layout), target)
                    else:  # every row of this batch was in skipped row groups
                        self._rows_done += target
                    pending_rows = 0
            else:  # in file order, one small decoded chunk held at a time, runs of its rows
                for chunk, at in self._in_order(buffer, files, skip, in_order_rows):
                    if isinstance(chunk, Skipped):  # rows that fill batches with no data
                        if not at:  # a resume inside this run counted all of it already
                            self._skipped += chunk.rows
                        left = chunk.rows
                        while left:
                            target = share.size(reader[0], self._rows_done // batch_size)
                            if not target:
                                break
                            take = min(target - pending_rows, left)
                            left, pending_rows = left - take, pending_rows + take
                            if pending_rows == target:
                                if pending:
                                    yield self._count(assemble(pending, layout, max_len), target)
                                else:
                                    self._rows_done += target
                                pending, pending_rows = [], 0
                        continue
                    while at < len(chunk):
                        target = share.size(reader[0], self._rows_done // batch_size)
                        if not target:
                            break  # every batch is out (drop_last leaves the rest)
                        take = min(target - pending_rows, len(chunk) - at)
                        pending.append((chunk, slice(at, at + take)))
                        at += take
                        pending_rows += take
                        if pending_rows == target:
                            yield self._count(assemble(pending, layout, max_len), target)
                            pending, pending_rows = [], 0
            skip = 0
        if pending_rows and not self.config.drop_last:
            if carry is not None and len(carry):
                yield self._count(carry.batch(layout), pending_rows)
            elif pending:
                yield self._count(assemble(pending, layout, max_len), pending_rows)
        # The epoch is done: the cursor stays on it with every row counted (dropped ones too).
        self._rows_done, self._finished = sum(u.rows for u in units), True

    def _shuffled(
        self, buffer: _Buffer, files: dict[int, Any], slabs: Slabs, count_skipped: bool
    ) -> list[Gathered | None]:
        """The batches of a shuffle buffer; ``count_skipped``: count the rows of skipped row
        groups."""
        # A row group split between readers goes in one pass: decoding checks the alignment of
        # list columns over the whole chunk, the rows of other readers too, as in file order.
        parts = self.dataset.parts
        whole = all(u.rows == parts[u.part].row_groups[u.row_group] for u in buffer.units)
        if self._late is not None and whole:
            try:
                return self._two_passes(buffer, files, slabs)
            except (DataError, OSError, pa.ArrowException):
                pass  # read again in one pass, which reports or skips the error as always
        chunks = self._chunks(buffer, files, count_skipped=count_skipped)
        return list(scatter(chunks, buffer.batches, self._layout, self.config.max_len, slabs))

    def _chunks(
        self,
        buffer: _Buffer,
        files: dict[int, Any],
        columns: list[str] | None = None,
        strict: bool = False,
        count_skipped: bool = False,
    ) -> list[tuple[Columns, np.ndarray]]:
        """The buffer's decoded chunks (``columns`` only; None: every column), after
        ``buffer.head``, each with the batch of each of its rows. ``strict``: raise every
        error, a row group shorter than its footer says too; otherwise a bad row group is
        skipped as configured (``skip_bad_row_groups``), its rows counted when
        ``count_skipped``."""
        chunks, at = list(buffer.head), 0
        for unit in buffer.units:
            unit_at = at
            for chunk in self._decode(unit, files, SHUFFLE_CHUNK_ROWS, columns, strict):
                if isinstance(chunk, Skipped):
                    if count_skipped:
                        self._skipped += chunk.rows
                    break
                chunks.append((chunk, buffer.batch_of[at : at + len(chunk)]))
                at += len(chunk)
            if strict and at != unit_at + unit.rows:
                raise DataError(f"row group {unit.row_group}: fewer rows than its footer says")
            at = unit_at + unit.rows
        return chunks

    def _two_passes(
        self, buffer: _Buffer, files: dict[int, Any], slabs: Slabs
    ) -> list[Gathered | None]:
        """:meth:`_shuffled` in two passes over the buffer: every column but the item lists
        first, which gives every row's list length and so every batch's size; then the item
        lists one chunk at a time, each chunk's ids copied into their batches while they are
        still in cache, and its memory handed back to pyarrow at once (which then decodes
        into memory still in cache: holding a whole buffer's item lists decoded, ~30 MB per
        65,536 rows, slows their decoding). Raises on any error."""
        late, layout = self._late, self._layout
        assert late is not None
        early = [c for c in self._columns if c != late]
        chunks = self._chunks(buffer, files, early, strict=True)
        filling = Scattering(chunks, buffer.batches, layout, self.config.max_len, slabs)
        for i, (columns, _) in enumerate(chunks):
            for key in columns.lists.values:
                filling.copy(i, key, columns.lists.values[key])
        i = len(buffer.head)
        for unit in buffer.units:
            for chunk in self._decode(unit, files, SHUFFLE_CHUNK_ROWS, [late], strict=True):
                assert isinstance(chunk, Columns)
                if i >= len(chunks) or not np.array_equal(
                    chunk.lists.offsets, chunks[i][0].lists.offsets
                ):
                    raise DataError(f"{late}: lists not aligned with the other list columns")
                filling.copy(i, late, chunk.lists.values[late])
                i += 1
        if i != len(chunks):
            raise DataError(f"{late}: fewer rows than the other columns")
        return list(filling.result())

    def _count(self, batch: Batch, rows: int) -> Batch:
        """``batch``, after counting the ``rows`` of the reader's share it stands for (more
        than it holds when some were in skipped row groups)."""
        self._rows_done += rows
        return batch

    @property
    def skipped_rows(self) -> int:
        """Rows of bad row groups skipped so far in this epoch (``skip_bad_row_groups``)."""
        return self._skipped

    def _in_order(
        self, buffer: list[_Unit], files: dict[int, Any], skip: int, chunk_rows: int
    ) -> Iterator[tuple[Columns, int]]:
        """The buffer's chunks in file order, each with its first row past the first ``skip``
        rows of the buffer."""
        seen = 0
        for unit in buffer:
            for chunk in self._decode(unit, files, chunk_rows):
                rows = chunk.rows if isinstance(chunk, Skipped) else len(chunk)
                first, seen = max(skip - seen, 0), seen + rows
                if first < rows and isinstance(chunk, Skipped):
                    yield Skipped(rows - first), first
                elif first < rows:
                    yield chunk, first

    def _skip(self, unit: _Unit, done: int, error: DataError) -> Skipped:
        """The rest of ``unit``'s rows, skipped after ``error`` (logged; counted where the
        rows would have been used)."""
        rows = unit.stop - done
        log.warning("skipping %d rows (skip_bad_row_groups): %s", rows, error)
        return Skipped(rows)

    def _decode(
        self,
        unit: _Unit,
        files: dict[int, Any],
        chunk_rows: int,
        columns: list[str] | None = None,
        strict: bool = False,
    ) -> Iterator[Columns | Skipped]:
        """The unit's rows, validated, in chunks of at most ``chunk_rows`` rows (decoding into
        small buffers is faster than one large table, and no chunk is ever concatenated).
        ``columns``: only these (None: every column the stream reads); ``strict``: raise every
        error, even with ``skip_bad_row_groups``."""
        columns = columns or self._columns
        skip_bad = self.config.skip_bad_row_groups and not strict
        part = self.dataset.parts[unit.part]
        if unit.part not in files:
            files[unit.part] = self.dataset.open_file(part)
        bounds = column_bounds(files[unit.part].metadata, unit.row_group)
        batches = files[unit.part].iter_batches(
            batch_size=chunk_rows,
            row_groups=[unit.row_group],
            columns=columns,
            # Columns decoded in parallel only where pyarrow has threads to spare: with one,
            # handing each column to its pool costs ~15% (more on a busy host).
            use_threads=get_worker_info() is None and pa.cpu_count() > 1,
        )
        offset, done = 0, unit.start  # rows of the group read, and yielded up to
        while offset < unit.stop:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (OSError, pa.ArrowException) as err:
                error = DataError(checks.unreadable(part.path, unit.row_group, err))
                if not skip_bad:
                    raise error from None
                yield self._skip(unit, done, error)
                return
            first, offset = offset, offset + batch.num_rows
            if offset <= unit.start:
                continue  # before the unit's row range

            def locate(row: int, column: str, first: int = first) -> str:
                return describe(part.path, row_group=unit.row_group, row=first + row, column=column)

            try:
                chunk = decode(
                    batch,
                    self.meta,
                    unit.group_first_row_id + first,
                    locate,
                    self.config.conditions,
                    bounds,
                    columns,
                    self._layout,
                )
            except DataError as error:
                if not skip_bad:
                    raise
                yield self._skip(unit, done, error)
                return
            done = min(offset, unit.stop)
            if unit.start <= first and offset <= unit.stop:
                yield chunk
            else:  # a row range of the group: views of the rows inside it
                lo, hi = max(unit.start - first, 0), min(unit.stop, offset) - first
                yield gather(chunk, np.arange(lo, hi), max_len=None)
