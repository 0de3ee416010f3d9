"""Streaming a Parquet dataset into batches: exactly once per epoch across ranks × workers.

This module owns the stream that a loader iterates: which reader (``world_size ×
num_workers`` of them) a pass is, which epoch it reads, and its cursor's saved form. The
unit of work is a row group; the stream hands each pass to the parts that do the work:

1. the split (:mod:`recsys.data.shares`): every epoch, all row groups of the dataset are
   shuffled with ``(seed, epoch)`` (the same order on every rank), laid end to end and cut
   into one consecutive share of rows per reader (a row group may be split between two), so
   each row is read by exactly one reader per epoch; the shares are sized so that every
   reader yields the same number of batches (:class:`Share`), so no rank runs out while
   another still has rows — every row of an epoch is trained on;
2. one of two readers of a share into batches, behind one interface (:class:`ShareReader`):
   :class:`~recsys.data.shuffled.ShuffledReader` takes its row groups ``buffer_row_groups``
   at a time and shuffles the rows of each buffer with ``(seed, epoch, reader, buffer)``;
   :class:`~recsys.data.file_order.FileOrderReader` reads them in file order. Both cut the
   row stream into batches of the sizes the split gives (a batch may span two buffers) and
   decode through :class:`~recsys.data.rowgroups.RowGroups`, which validates every chunk and
   skips bad row groups when asked;
3. the cursor (:mod:`recsys.data.cursor`) is ``(epoch, rows done)`` per reader. The row
   stream is a pure function of the seed, epoch and reader, so resuming skips whole buffers
   by their footer row counts and restarts inside one buffer at the right offset: no row
   repeated or lost.

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
from typing import Any, Protocol

import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from recsys.data.batch import Batch, Layout
from recsys.data.cursor import Cursor
from recsys.data.file_order import FileOrderReader
from recsys.data.files import Dataset, open_dataset
from recsys.data.rowgroups import RowGroups
from recsys.data.schema import DatasetMeta, list_columns, scalar_columns
from recsys.data.shares import ReaderShare, RowRange, Share, epoch_ranges, split
from recsys.data.shuffled import ShuffledReader

log = logging.getLogger(__name__)


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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShareReader(Protocol):
    """Reads one reader's share of an epoch into batches: the interface of
    :class:`~recsys.data.shuffled.ShuffledReader` and
    :class:`~recsys.data.file_order.FileOrderReader`."""

    def read(self, share: ReaderShare, row_groups: RowGroups, cursor: Cursor) -> Iterator[Batch]:
        """The batches of ``share`` from ``cursor.rows_done`` on, in order; before yielding
        a batch, its rows are counted on ``cursor`` (and rows of bad row groups skipped,
        when the cursor has not counted them yet)."""
        ...


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
        self._cursor = Cursor()
        config = self.config
        lists = list(list_columns(self.meta, config.conditions))
        self._columns = [*lists, *scalar_columns(self.meta)]
        self._layout = Layout.of(self.meta, config.conditions)
        self._reader: ShareReader = (
            ShuffledReader(
                self._layout,
                lists,
                config.seed,
                config.batch_size,
                config.max_len,
                config.buffer_row_groups,
                config.drop_last,
            )
            if config.shuffle
            else FileOrderReader(
                self._layout,
                config.batch_size,
                config.max_len,
                config.buffer_row_groups,
                config.drop_last,
            )
        )

    @property
    def meta(self) -> DatasetMeta:
        return self.dataset.meta

    @property
    def epoch(self) -> int:
        """The epoch the stream reads, or read last."""
        return self._cursor.epoch

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next (its own shuffle); a loaded cursor of another epoch is
        dropped."""
        self._cursor.set_epoch(epoch)

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
        return self._cursor.state(self._settings())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue from a cursor saved by :meth:`state_dict`."""
        self._cursor.load(state)

    @property
    def skipped_rows(self) -> int:
        """Rows of bad row groups skipped so far in this epoch (``skip_bad_row_groups``)."""
        return self._cursor.skipped_rows

    def _shares(self, epoch: int, readers: int) -> tuple[list[list[RowRange]], Share]:
        """Each reader's row ranges of ``epoch`` and the split that sized them."""
        ranges = epoch_ranges(self.dataset, epoch, self.config.seed, self.config.shuffle)
        total = sum(r.rows for r in ranges)
        share = Share.of(total, readers, self.config.batch_size, self.config.drop_last)
        return split(ranges, share), share

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
        cursor = self._cursor
        cursor.start(reader, self._settings())
        shares, share = self._shares(cursor.epoch, reader[1])
        mine = ReaderShare(cursor.epoch, reader[0], shares[reader[0]], share)
        if not mine.ranges:
            log.warning(
                "reader %d of %d has no rows: the dataset has fewer rows than readers", *reader
            )
        row_groups = RowGroups(
            self.dataset,
            self._columns,
            self._layout,
            self.config.conditions,
            self.config.skip_bad_row_groups,
        )
        yield from self._reader.read(mine, row_groups, cursor)
        # The epoch is done: the cursor stays on it with every row counted (dropped ones too).
        cursor.finish(mine.rows)
