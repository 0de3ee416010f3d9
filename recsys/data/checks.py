"""The value-level rules of a dataset: what makes a value bad and how it is described.

This module owns the checks every decoded chunk of rows goes through (``batch.decode``): no
null lists or values, unsigned ids that fit int64, ids in ``[0, vocab)`` in ``remap`` mode,
labels 0 or 1, side-feature lists aligned with the item list; and the description of a row
group that cannot be read. A check returns what it found as :class:`Bad` values of one column
(nothing on the good path, after one vectorised pass, or none where the footer's bounds
already vouch for the column) and leaves what to do with them to the caller's :data:`Report`:
the stream raises a :class:`~recsys.data.schema.DataError` naming the first
(:func:`raising`), ``recsys data inspect --check`` collects every one
(``recsys.data.inspect.Findings``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recsys.data.schema import DataError, describe

INT64_MAX = np.iinfo(np.int64).max

Locate = Callable[[int, str], str]
"""``locate(row_in_chunk, column)`` → 'file, row group, row, column' for messages."""


@dataclass(frozen=True)
class Bad:
    """The values of one column of a chunk that break one rule."""

    column: str
    mask: np.ndarray
    """True at each bad position of the checked array (rows, or list values)."""
    row_of: Callable[[int], int]
    """A position of the checked array → its row in the chunk."""
    what: Callable[[int], str]
    """A bad position → what was found there and what was expected."""

    def count(self) -> int:
        return int(np.count_nonzero(self.mask))

    def positions(self, limit: int) -> list[int]:
        """The first ``limit`` bad positions, in order."""
        if limit == 1:
            return [int(np.argmax(self.mask))]
        return np.flatnonzero(self.mask)[:limit].tolist()


Report = Callable[[Bad], None]
"""What a caller of the checks does with bad values: raise, or record and go on."""


def raising(locate: Locate) -> Report:
    """A report that stops at the first bad value with its :class:`DataError`."""

    def report(bad: Bad) -> None:
        (i,) = bad.positions(1)
        raise DataError(f"{locate(bad.row_of(i), bad.column)}: {bad.what(i)}")

    return report


def within(bounds: tuple[int, int] | None, size: int) -> bool:
    """Whether a row group's footer bounds put every value of a column in [0, ``size``)."""
    return bounds is not None and bounds[0] >= 0 and bounds[1] < size


def _row(row: int) -> int:
    return row


def null_lists(array: pa.Array, column: str) -> Bad | None:
    """Rows whose list is null (an empty history is an empty list)."""
    if not array.null_count:
        return None
    return Bad(
        column, np.asarray(array.is_null()), _row, lambda i: "null list; use an empty list instead"
    )


def null_values(array: pa.Array, column: str, row_of: Callable[[int], int]) -> Bad | None:
    """Null values (of a scalar column, or inside lists)."""
    if not array.null_count:
        return None
    return Bad(
        column, np.asarray(array.is_null()), row_of, lambda i: "null value; nulls are not allowed"
    )


def aligned(
    offsets: np.ndarray,
    first: np.ndarray,
    column: str,
    first_column: str,
    skip: np.ndarray | None = None,
) -> Bad | None:
    """Rows whose list in ``column`` (``offsets``, from 0) is not as long as the one in
    ``first_column`` (``first``, the item list); ``skip``: rows not compared (null lists,
    found already)."""
    if np.array_equal(offsets, first):
        return None
    lengths, item_lengths = np.diff(offsets), np.diff(first)
    mask = lengths != item_lengths
    if skip is not None:
        mask &= ~skip
        if not mask.any():
            return None
    return Bad(
        column,
        mask,
        _row,
        lambda i: (
            f"list of {lengths[i]} values but {first_column!r} has {item_lengths[i]}; "
            "side-feature lists must align with the item list"
        ),
    )


def fits_int64(values: np.ndarray, column: str, row_of: Callable[[int], int]) -> Bad | None:
    """uint64 values above 2^63 − 1 (only ``hash`` mode takes them)."""
    if not values.size or values.max() <= INT64_MAX:
        return None
    return Bad(
        column,
        values > INT64_MAX,
        row_of,
        lambda i: f"value {values[i]} does not fit int64 (raw 64-bit ids need id_mode 'hash')",
    )


def ids(
    values: np.ndarray,
    size: int,
    vocab: str,
    column: str,
    row_of: Callable[[int], int],
    bounds: tuple[int, int] | None = None,
) -> tuple[Bad, ...]:
    """Negative ids, then ids not below the vocab size ``size`` of table ``vocab`` (``remap``
    mode). ``bounds``: the column's smallest and largest value in its row group, from the
    footer (no scan when they lie in range)."""
    if values.size == 0 or within(bounds, size):
        return ()
    # One pass for both bounds (negative ids read as unsigned are >= 2^63); the bad positions
    # are searched only on failure.
    if values.view(np.uint64).max() < size:
        return ()
    negative, large = values < 0, values >= size
    found = []
    if negative.any():
        found.append(
            Bad(
                column,
                negative,
                row_of,
                lambda i: f"id {values[i]} is negative; ids must lie in [0, {size})",
            )
        )
    if large.any():
        found.append(
            Bad(
                column,
                large,
                row_of,
                lambda i: (
                    f"id {values[i]} is not below the vocab size {size} of {vocab!r} "
                    "(dataset.json); remap ids densely or use id_mode 'hash'"
                ),
            )
        )
    return tuple(found)


def labels(values: np.ndarray, column: str, bounds: tuple[int, int] | None = None) -> Bad | None:
    """Labels other than 0 and 1 (``bounds`` as for :func:`ids`)."""
    if not values.size or within(bounds, 2) or (values.min() >= 0 and values.max() <= 1):
        return None
    return Bad(
        column,
        (values != 0) & (values != 1),
        _row,
        lambda i: f"label {values[i]}; labels must be 0 or 1",
    )


def unreadable(path: str, row_group: int, error: BaseException) -> str:
    """The description of a row group whose pages cannot be decoded, on one line."""
    text = "".join(c if c.isprintable() else " " for c in str(error))
    reason = " ".join(text.split())
    return f"{describe(path, row_group=row_group)}: cannot be read (corrupt data?): {reason}"
