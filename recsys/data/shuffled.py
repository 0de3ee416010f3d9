"""Reading a reader's share through shuffle buffers (``shuffle=True``) into batches.

This module owns the shuffled row stream: a reader takes its row ranges
``buffer_row_groups`` row groups at a time, shuffles the rows of that buffer with ``(seed,
epoch, reader, buffer)``, and cuts the row stream into batches (a batch may span two
buffers: the last one of a buffer is carried into the next; within a batch, rows are in
buffer order). Each buffer is decoded whole and its rows scattered straight into their
batches; rows of a skipped bad row group keep their places in the batch layout and bring no
data (a batch of them only is counted and not yielded).

The permutation of a buffer depends on nothing read, so a resumed pass skips the buffers its
cursor covers whole by their footer row counts and drops the permuted rows before the
cursor in the buffer it stopped in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import InitVar, dataclass, field

import numpy as np
import pyarrow as pa

from recsys.data.batch import Batch, Columns, Gathered, Layout, Scattering, scatter
from recsys.data.cursor import Cursor
from recsys.data.memory import Slabs
from recsys.data.rowgroups import RowGroups, Skipped
from recsys.data.schema import DataError
from recsys.data.shares import ReaderShare, RowRange

SHUFFLE_CHUNK_ROWS = 4096
"""Rows decoded at a time into a shuffle buffer (small chunks decode faster: pyarrow decodes
into memory that is still in cache). The chunks of every column but the item lists stay in
Arrow's buffers until the whole buffer is decoded; the item lists are decoded next, a chunk
at a time, and each chunk's ids copied into their batches at once
(:meth:`ShuffledReader._two_passes`)."""


@dataclass(frozen=True)
class _Buffer:
    """A shuffle buffer's rows and the batches they go to."""

    ranges: list[RowRange]
    head: list[tuple[Columns, np.ndarray]]
    """Rows before the buffer's: the pending batch's, carried from the last buffer."""
    batch_of: np.ndarray
    """The batch of each of the buffer's rows (-1: not read)."""
    batches: int


@dataclass
class ShuffledReader:
    """A reader's share through shuffle buffers, each buffer's rows scattered to their
    batches."""

    layout: Layout
    lists: InitVar[list[str]]
    """The list columns read (the first is decoded last when there are two)."""
    seed: int
    batch_size: int
    max_len: int | None
    buffer_row_groups: int
    drop_last: bool
    late: str | None = field(init=False)
    """The list column decoded in a pass of its own (:meth:`_two_passes`), where another
    list column gives the rows' lengths first; None: every buffer in one pass."""

    def __post_init__(self, lists: list[str]) -> None:
        self.late = lists[0] if len(lists) > 1 else None

    def read(self, share: ReaderShare, row_groups: RowGroups, cursor: Cursor) -> Iterator[Batch]:
        """The batches of ``share`` from ``cursor.rows_done`` on, counted on ``cursor``."""
        layout, batch_size = self.layout, self.batch_size
        carry: Gathered | None = None  # the last batch of a buffer, completed by the next
        slabs = Slabs()
        pending_rows = 0  # rows of the batch being filled
        for b, ranges, skip in share.buffers(self.buffer_row_groups, cursor.rows_done):
            rows = sum(r.rows for r in ranges)
            rng = np.random.default_rng([self.seed, share.epoch, share.reader, b])
            order = rng.permutation(rows)[skip:]
            end = pending_rows + len(order)  # the pending batch is completed first
            base = cursor.rows_done // batch_size  # index of the pending batch
            last = share.share.batches - 1 - base  # of this reader's last batch, from it
            if last < 0:
                break  # every batch is out (drop_last leaves the rest)
            within = np.arange(pending_rows, end) // batch_size
            if self.drop_last:
                within[within > last] = -1
            else:  # the last batch takes in the row that has no step of its own
                np.minimum(within, last, out=within)
            batches = min(-(-end // batch_size), last + 1)
            batch_of = np.full(rows, -1, dtype=np.int64)
            batch_of[order] = within
            head = (
                [] if carry is None else [(carry.columns(layout), np.zeros(len(carry), np.int64))]
            )
            # skip: resumed inside this buffer, its skipped rows counted already
            buffer = _Buffer(ranges, head, batch_of, batches)
            filled = self._scattered(buffer, row_groups, cursor if not skip else None, slabs)
            carry = None
            for k in range(batches):
                gathered, filled[k] = filled[k], None
                assert gathered is not None
                target = share.batch_size(base + k)
                pending_rows = min(end - k * batch_size, target)
                if pending_rows < target:  # the last batch, completed by the next buffer
                    carry = gathered
                    continue
                if len(gathered):
                    batch = gathered.batch(layout)
                    cursor.count(target)
                    yield batch
                else:  # every row of this batch was in skipped row groups
                    cursor.count(target)
                pending_rows = 0
        if pending_rows and not self.drop_last and carry is not None and len(carry):
            batch = carry.batch(layout)
            cursor.count(pending_rows)
            yield batch

    def _scattered(
        self, buffer: _Buffer, row_groups: RowGroups, counts: Cursor | None, slabs: Slabs
    ) -> list[Gathered | None]:
        """The batches of a shuffle buffer; the rows of skipped row groups are counted on
        ``counts`` (None: counted already)."""
        # A row group split between readers goes in one pass: decoding checks the alignment of
        # list columns over the whole chunk, the rows of other readers too, as in file order.
        if self.late is not None and row_groups.whole(buffer.ranges):
            try:
                return self._two_passes(buffer, row_groups, slabs)
            except (DataError, OSError, pa.ArrowException):
                pass  # read again in one pass, which reports or skips the error as always
        chunks = self._chunks(buffer, row_groups, counts=counts)
        return list(scatter(chunks, buffer.batches, self.layout, self.max_len, slabs))

    def _chunks(
        self,
        buffer: _Buffer,
        row_groups: RowGroups,
        columns: list[str] | None = None,
        strict: bool = False,
        counts: Cursor | None = None,
    ) -> list[tuple[Columns, np.ndarray]]:
        """The buffer's decoded chunks (``columns`` only; None: every column), after
        ``buffer.head``, each with the batch of each of its rows. ``strict``: raise every
        error, a row group shorter than its footer says too; otherwise a bad row group is
        skipped as configured (``skip_bad_row_groups``), its rows counted on ``counts``
        (None: not counted)."""
        chunks, at = list(buffer.head), 0
        for unit in buffer.ranges:
            unit_at = at
            for chunk in row_groups.decode(unit, SHUFFLE_CHUNK_ROWS, columns, strict):
                if isinstance(chunk, Skipped):
                    if counts is not None:
                        counts.skip(chunk.rows)
                    break
                chunks.append((chunk, buffer.batch_of[at : at + len(chunk)]))
                at += len(chunk)
            if strict and at != unit_at + unit.rows:
                raise DataError(f"row group {unit.row_group}: fewer rows than its footer says")
            at = unit_at + unit.rows
        return chunks

    def _two_passes(
        self, buffer: _Buffer, row_groups: RowGroups, slabs: Slabs
    ) -> list[Gathered | None]:
        """:meth:`_scattered` in two passes over the buffer: every column but the item lists
        first, which gives every row's list length and so every batch's size; then the item
        lists one chunk at a time, each chunk's ids copied into their batches while they are
        still in cache, and its memory handed back to pyarrow at once (which then decodes
        into memory still in cache: holding a whole buffer's item lists decoded, ~30 MB per
        65,536 rows, slows their decoding). Raises on any error."""
        late, layout = self.late, self.layout
        assert late is not None
        early = [c for c in row_groups.columns if c != late]
        chunks = self._chunks(buffer, row_groups, early, strict=True)
        filling = Scattering(chunks, buffer.batches, layout, self.max_len, slabs)
        for i, (columns, _) in enumerate(chunks):
            for key in columns.lists.values:
                filling.copy(i, key, columns.lists.values[key])
        i = len(buffer.head)
        for unit in buffer.ranges:
            for chunk in row_groups.decode(unit, SHUFFLE_CHUNK_ROWS, [late], strict=True):
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
