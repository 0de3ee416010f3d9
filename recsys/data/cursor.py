"""A stream's cursor: where one reader stands in an epoch, saved and restored.

This module owns the cursor's state and every change to it. The cursor is ``(epoch, rows
done)`` of one reader (``rank × num_workers + worker``), with the reader, the settings the
row order depends on, and the rows of bad row groups skipped so far in the epoch. The row
stream of a reader is a pure function of the seed, epoch and reader, so a pass started from
a saved cursor reads exactly the rows the interrupted one had not yet read.

A pass (:meth:`Cursor.start`) begins at a loaded cursor, or at the start of an epoch: the
same one after :meth:`Cursor.set_epoch`, the next one after a pass read its epoch to the
end. The readers of rows into batches move the cursor only by :meth:`Cursor.count` (a
batch's rows are done) and :meth:`Cursor.skip` (rows of a bad row group skipped); the
stream ends a pass read to its end with :meth:`Cursor.finish`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recsys.data.schema import DataError


@dataclass(frozen=True)
class Position:
    """A saved cursor, as :meth:`Cursor.state` writes it."""

    epoch: int
    rows_done: int
    reader: tuple[int, int] | None
    """(reader, readers) of the pass that saved it; None before any pass."""
    settings: dict[str, Any] | None
    """What the row order depends on besides epoch and reader (None: not recorded)."""
    skipped_rows: int

    @classmethod
    def of(cls, state: dict[str, Any]) -> Position:
        reader = state.get("reader")
        return cls(
            epoch=int(state["epoch"]),
            rows_done=int(state["rows_done"]),
            reader=tuple(reader) if reader is not None else None,
            settings=state.get("settings"),
            skipped_rows=int(state.get("skipped_rows", 0)),
        )

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "rows_done": self.rows_done,
            "reader": self.reader,
            "settings": self.settings,
            "skipped_rows": self.skipped_rows,
        }

    def check(self, reader: tuple[int, int], settings: dict[str, Any]) -> None:
        """Refuse to resume as another reader or with other settings or files."""
        # DataError (a user error): the guard prints these as one line, no traceback.
        if self.reader is not None and self.reader != reader:
            raise DataError(
                f"the saved data cursor belongs to reader {self.reader[0]} of "
                f"{self.reader[1]} but this is reader {reader[0]} of {reader[1]}: "
                "resume with the same world size and number of loader workers"
            )
        saved = self.settings
        if saved is not None and saved != settings:
            changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            raise DataError(
                "the saved data cursor was made with other stream settings or files "
                f"(saved, now): {changed}; resume with the same ones or start the epoch over"
            )


class Cursor:
    """The cursor of one stream: its epoch, the current pass's position in it, and a loaded
    cursor that the next pass starts at."""

    def __init__(self) -> None:
        self.epoch = 0
        self.rows_done = 0
        """Rows of the reader's share done in the current pass's epoch: those of every batch
        yielded (with their rows in skipped row groups); all of them once it is read."""
        self.skipped_rows = 0
        """Rows of bad row groups skipped in the current epoch (``skip_bad_row_groups``)."""
        self.reader: tuple[int, int] | None = None
        """(reader, readers) of the current pass."""
        self._finished = False  # the last pass read its epoch to the end
        self._loaded: Position | None = None  # where the next pass starts

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` next, from its start unless the loaded cursor is in it."""
        self.epoch, self._finished = epoch, False
        if self._loaded is not None and self._loaded.epoch != epoch:
            self._loaded = None

    def load(self, state: dict[str, Any]) -> None:
        """Make the next pass start at a cursor saved by :meth:`state`."""
        self._loaded = Position.of(state)
        self.epoch, self._finished = self._loaded.epoch, False

    def state(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The saved form: the loaded cursor until a pass starts from it, else where the
        current pass stands (at an epoch's end, on it with every row done: a pass started
        from it reads nothing)."""
        if self._loaded is not None:
            return self._loaded.state()
        position = Position(self.epoch, self.rows_done, self.reader, settings, self.skipped_rows)
        return position.state()

    def start(self, reader: tuple[int, int], settings: dict[str, Any]) -> None:
        """Begin a pass of ``reader``: at the loaded cursor (checked against the reader and
        ``settings``), else at the start of the epoch — the next one after a finished pass."""
        loaded, self._loaded = self._loaded, None
        if self._finished and loaded is None:
            self.epoch += 1
        self._finished = False
        if loaded is not None and loaded.rows_done:
            loaded.check(reader, settings)
        self.reader = reader
        self.rows_done = loaded.rows_done if loaded is not None else 0
        self.skipped_rows = loaded.skipped_rows if loaded is not None else 0

    def count(self, rows: int) -> None:
        """``rows`` of the reader's share are done: a batch's, including its rows in skipped
        row groups (a batch of them all yields nothing)."""
        self.rows_done += rows

    def skip(self, rows: int) -> None:
        """``rows`` of a bad row group are skipped."""
        self.skipped_rows += rows

    def finish(self, rows: int) -> None:
        """The pass read its epoch to the end: the reader's ``rows`` are all done."""
        self.rows_done, self._finished = rows, True
