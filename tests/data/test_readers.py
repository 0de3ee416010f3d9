"""The two readers of a share into batches, used alone (without a stream), and the cursor
that they move."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.data.batch import Layout
from recsys.data.cursor import Cursor
from recsys.data.file_order import FileOrderReader
from recsys.data.files import open_dataset
from recsys.data.rowgroups import RowGroups
from recsys.data.schema import DataError, list_columns, scalar_columns
from recsys.data.shares import ReaderShare, Share, epoch_ranges, split
from recsys.data.shuffled import ShuffledReader
from recsys.data.stream import ParquetStream, StreamConfig


@pytest.mark.parametrize("shuffle", [False, True], ids=["file-order", "shuffled"])
def test_a_reader_alone_reads_its_share_as_the_stream_does(synth_dir: Path, shuffle: bool) -> None:
    source = str(synth_dir / "ctr_train")
    dataset = open_dataset(source)
    lists = list(list_columns(dataset.meta))
    layout = Layout.of(dataset.meta, False)
    ranges = epoch_ranges(dataset, epoch=0, seed=0, shuffle=shuffle)
    share = Share.of(dataset.rows, 2, batch_size=30, drop_last=False)
    readers = {
        False: FileOrderReader(layout, 30, 6, 2, False),
        True: ShuffledReader(layout, lists, 0, 30, 6, 2, False),
    }
    for reader, mine in enumerate(split(ranges, share)):
        cursor = Cursor()
        row_groups = RowGroups(
            dataset, [*lists, *scalar_columns(dataset.meta)], layout, False, False
        )
        batches = list(
            readers[shuffle].read(ReaderShare(0, reader, mine, share), row_groups, cursor)
        )
        assert cursor.rows_done == share.rows[reader]  # every batch counted
        config = StreamConfig(batch_size=30, max_len=6, shuffle=shuffle, buffer_row_groups=2)
        stream = ParquetStream(source, config, rank=reader, world_size=2)
        expected = list(stream)
        assert [b.row_ids.tolist() for b in batches] == [b.row_ids.tolist() for b in expected]
        assert [b.features.values().tolist() for b in batches] == [
            b.features.values().tolist() for b in expected
        ]


def test_the_cursor_starts_each_pass_where_it_should() -> None:
    settings = {"seed": 0}
    cursor = Cursor()
    cursor.start((0, 1), settings)
    cursor.count(10)
    assert cursor.state(settings) == {
        "epoch": 0,
        "rows_done": 10,
        "reader": (0, 1),
        "settings": settings,
        "skipped_rows": 0,
    }
    cursor.finish(25)
    saved = cursor.state(settings)
    cursor.start((0, 1), settings)  # a plain pass after a finished one: the next epoch
    assert (cursor.epoch, cursor.rows_done) == (1, 0)
    cursor.load(saved)
    assert cursor.state({"seed": 1}) == saved  # loaded, not started: the same position
    cursor.start((0, 1), settings)  # from the loaded cursor: epoch 0 with every row done
    assert (cursor.epoch, cursor.rows_done) == (0, 25)
    cursor.load(saved)
    cursor.set_epoch(3)  # a loaded cursor of another epoch is dropped
    cursor.start((0, 1), settings)
    assert (cursor.epoch, cursor.rows_done) == (3, 0)
    cursor.load({**saved, "skipped_rows": 2})
    with pytest.raises(DataError, match="belongs to reader 0 of 1 but this is reader 1 of 2"):
        cursor.start((1, 2), settings)
