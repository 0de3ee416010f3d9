"""Which rows each reader of a stream reads in an epoch, and in how many batches.

This module owns the split of an epoch over readers (``world_size × num_workers`` of them):
every non-empty row group of the dataset, shuffled with ``(seed, epoch)`` (the same order on
every rank) or in file order, laid end to end and cut into one consecutive share of rows per
reader, sized so that every reader yields the same number of batches (:class:`Share`). A row
group may be split between two readers. It reads nothing but the footers' row counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from recsys.data.files import Dataset


@dataclass(frozen=True)
class RowRange:
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
    def of(cls, total: int, readers: int, batch_size: int, drop_last: bool) -> Share:
        b = batch_size
        if total == 0:
            return cls([0] * readers, 0, b, drop_last)
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
        if drop_last:
            batches = min(rows) // b
        return cls(rows, batches, b, drop_last)

    def size(self, reader: int, index: int) -> int:
        """Rows of batch ``index`` of ``reader`` (0: past its last batch)."""
        if index >= self.batches:
            return 0
        if index < self.batches - 1 or self.drop_last:
            return self.batch_size
        return self.rows[reader] - (self.batches - 1) * self.batch_size


@dataclass(frozen=True)
class ReaderShare:
    """One reader's share of an epoch: what a reader of rows into batches is given."""

    epoch: int
    reader: int
    """Which reader: ``rank × num_workers + worker``."""
    ranges: list[RowRange]
    """Its rows, in the order it reads them."""
    share: Share
    """The epoch's split, which sizes each of the reader's batches."""

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.ranges)

    def batch_size(self, index: int) -> int:
        """Rows of the reader's batch ``index`` (0: past its last batch)."""
        return self.share.size(self.reader, index)

    def buffers(self, row_groups: int, rows_done: int) -> Iterator[tuple[int, list[RowRange], int]]:
        """The reader's ranges ``row_groups`` at a time, each group with its index and the
        rows of it already done; the groups that ``rows_done`` covers whole are left out (a
        resumed pass skips them by their footer row counts)."""
        for b, i in enumerate(range(0, len(self.ranges), row_groups)):
            buffer = self.ranges[i : i + row_groups]
            rows = sum(r.rows for r in buffer)
            if rows_done >= rows:
                rows_done -= rows
                continue
            yield b, buffer, rows_done
            rows_done = 0


def epoch_ranges(dataset: Dataset, epoch: int, seed: int, shuffle: bool) -> list[RowRange]:
    """Every non-empty row group of the dataset, in ``epoch``'s order (shuffled with
    ``(seed, epoch)``, or in file order)."""
    ranges, first = [], 0
    for p, part in enumerate(dataset.parts):
        for g, rows in enumerate(part.row_groups):
            if rows:
                ranges.append(RowRange(p, g, 0, rows, first))
            first += rows
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(ranges))
        ranges = [ranges[i] for i in order]
    return ranges


def split(ranges: list[RowRange], share: Share) -> list[list[RowRange]]:
    """``ranges`` laid end to end and cut into each reader's consecutive ``share.rows``."""
    shares: list[list[RowRange]] = [[] for _ in share.rows]
    reader, room = 0, share.rows[0]
    for r in ranges:
        start = r.start
        while start < r.stop:
            while room == 0:
                reader += 1
                room = share.rows[reader]
            take = min(room, r.stop - start)
            shares[reader].append(
                RowRange(r.part, r.row_group, start, start + take, r.group_first_row_id)
            )
            start, room = start + take, room - take
    return shares
