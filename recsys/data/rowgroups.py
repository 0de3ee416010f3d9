"""Decoding a range of a row group's rows, validated, in small chunks.

This module owns how a stream's readers get rows out of the files: each file opened once
per pass, each row group read in chunks of a given size (decoding into small buffers is
faster than one large table, and no chunk is ever concatenated), every chunk validated, and
a bad row group either reported (its error names the file, row group, row and column) or,
with ``skip_bad_row_groups``, skipped: logged, and its remaining rows handed on as
:class:`Skipped` for the reader to count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from torch.utils.data import get_worker_info

from recsys.data import checks
from recsys.data.batch import Columns, Layout, decode, gather
from recsys.data.files import Dataset, column_bounds
from recsys.data.schema import DataError, describe
from recsys.data.shares import RowRange

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """Rows of a bad row group that are skipped (``skip_bad_row_groups``): they count as read
    for the cursor and the batch layout, and bring no data."""

    rows: int


class RowGroups:
    """The row groups of one dataset, decoded for one pass (its files stay open until the
    pass ends)."""

    def __init__(
        self,
        dataset: Dataset,
        columns: list[str],
        layout: Layout,
        conditions: bool,
        skip_bad: bool,
    ) -> None:
        self.dataset = dataset
        self.columns = columns
        """Every column the stream reads."""
        self.layout = layout
        self.conditions = conditions
        self.skip_bad = skip_bad
        self._files: dict[int, Any] = {}

    def whole(self, ranges: list[RowRange]) -> bool:
        """Whether every range holds all of its row group."""
        parts = self.dataset.parts
        return all(r.rows == parts[r.part].row_groups[r.row_group] for r in ranges)

    def decode(
        self,
        unit: RowRange,
        chunk_rows: int,
        columns: list[str] | None = None,
        strict: bool = False,
    ) -> Iterator[Columns | Skipped]:
        """The range's rows, validated, in chunks of at most ``chunk_rows`` rows.
        ``columns``: only these (None: every column the stream reads); ``strict``: raise every
        error, even with ``skip_bad_row_groups``."""
        columns = columns or self.columns
        skip_bad = self.skip_bad and not strict
        meta = self.dataset.meta
        part = self.dataset.parts[unit.part]
        if unit.part not in self._files:
            self._files[unit.part] = self.dataset.open_file(part)
        file = self._files[unit.part]
        bounds = column_bounds(file.metadata, unit.row_group)
        batches = file.iter_batches(
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
                yield _skip(unit, done, error)
                return
            first, offset = offset, offset + batch.num_rows
            if offset <= unit.start:
                continue  # before the unit's row range

            def locate(row: int, column: str, first: int = first) -> str:
                return describe(part.path, row_group=unit.row_group, row=first + row, column=column)

            try:
                chunk = decode(
                    batch,
                    meta,
                    unit.group_first_row_id + first,
                    locate,
                    self.conditions,
                    bounds,
                    columns,
                    self.layout,
                )
            except DataError as error:
                if not skip_bad:
                    raise
                yield _skip(unit, done, error)
                return
            done = min(offset, unit.stop)
            if unit.start <= first and offset <= unit.stop:
                yield chunk
            else:  # a row range of the group: views of the rows inside it
                lo, hi = max(unit.start - first, 0), min(unit.stop, offset) - first
                yield gather(chunk, np.arange(lo, hi), max_len=None)


def _skip(unit: RowRange, done: int, error: DataError) -> Skipped:
    """The rest of ``unit``'s rows, skipped after ``error`` (logged; counted where the rows
    would have been used)."""
    rows = unit.stop - done
    log.warning("skipping %d rows (skip_bad_row_groups): %s", rows, error)
    return Skipped(rows)
