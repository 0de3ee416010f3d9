"""Every kind of bad input stops with one clear error naming the file, place and column."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.files import column_bounds
from recsys.data.schema import DataError, DatasetMeta
from recsys.data.stream import ParquetStream, StreamConfig

META = DatasetMeta(kind="ctr", vocab={"item": 10, "category": 3}, side_features=["category"])


def good_rows(n: int = 4) -> dict[str, list]:
    return {
        "user_id": list(range(n)),
        "history_item_ids": [[1, 2, 3]] * n,
        "history_category_ids": [[0, 1, 2]] * n,
        "item_id": [4] * n,
        "category_id": [1] * n,
        "label": [1, 0] * (n // 2),
        "timestamp": [100] * n,
    }


def write(
    directory: Path, tables: dict[str, pa.Table], meta: DatasetMeta = META, statistics: bool = True
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, directory / name, row_group_size=2, write_statistics=statistics)
    (directory / "dataset.json").write_text(meta.to_json())
    return directory


def table(**changes) -> pa.Table:
    rows = good_rows()
    rows.update(changes)
    return pa.table(rows)


def read_all(directory: Path, shuffle: bool = False) -> None:
    for _ in ParquetStream(str(directory), StreamConfig(batch_size=3, shuffle=shuffle)):
        pass


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"history_item_ids": [[1, 2, 3], [1, None, 3], [1, 2, 3], [1, 2, 3]]},
            r"part.parquet, row group 0, row 1, column 'history_item_ids': null value",
        ),
        (
            {"history_item_ids": [[1, 2, 3], [1, 2, 3], None, [1, 2, 3]]},
            r"part.parquet, row group 1, row 0, column 'history_item_ids': null list",
        ),
        (
            {"history_category_ids": [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, -1, 2]]},
            r"row group 1, row 1, column 'history_category_ids': id -1 is negative",
        ),
        (
            {"item_id": [4, 4, 10, 4]},
            r"row group 1, row 0, column 'item_id': id 10 is not below the vocab size 10 of "
            r"'item'",
        ),
        (
            {"label": [1, 0, 2, 0]},
            r"row group 1, row 0, column 'label': label 2; labels must "
            r"be 0 or 1",
        ),
        (
            {"history_category_ids": [[0, 1, 2], [0, 1], [0, 1, 2], [0, 1, 2]]},
            r"row group 0, row 1, column 'history_category_ids': list of 2 values but "
            r"'history_item_ids' has 3",
        ),
        ({"user_id": [0, 1, None, 3]}, r"row group 1, row 0, column 'user_id': null value"),
    ],
)
@pytest.mark.parametrize("statistics", [True, False], ids=["footer-statistics", "no-statistics"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_bad_values_name_file_row_group_row_and_column(
    tmp_path: Path, changes: dict, message: str, statistics: bool, shuffle: bool
) -> None:
    # Footer statistics in range spare the scan of a column; out of range, or absent, the
    # column is scanned and the bad value found all the same.
    directory = write(tmp_path / "d", {"part.parquet": table(**changes)}, statistics=statistics)
    with pytest.raises(DataError, match=message):
        read_all(directory, shuffle)


def test_missing_column(tmp_path: Path) -> None:
    directory = write(tmp_path / "d", {"part.parquet": table().drop_columns(["label"])})
    with pytest.raises(
        DataError,
        match=r"part.parquet, column 'label': missing; a ctr dataset "
        r"needs columns \['user_id'",
    ):
        ParquetStream(str(directory))


def test_wrong_type(tmp_path: Path) -> None:
    bad = table().set_column(3, "item_id", pa.array(["a", "b", "c", "d"]))
    directory = write(tmp_path / "d", {"part.parquet": bad})
    with pytest.raises(DataError, match=r"column 'item_id': type string, expected int64"):
        ParquetStream(str(directory))


def test_narrower_integers_are_accepted(tmp_path: Path) -> None:
    narrow = table().set_column(5, "label", pa.array([1, 0, 1, 0], pa.int8()))
    directory = write(tmp_path / "d", {"part.parquet": narrow})
    batch = next(iter(ParquetStream(str(directory), StreamConfig(shuffle=False))))
    assert batch.labels.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_files_with_different_schemas(tmp_path: Path) -> None:
    other = table().set_column(0, "user_id", pa.array([0, 1, 2, 3], pa.int32()))
    directory = write(tmp_path / "d", {"a.parquet": table(), "b.parquet": other})
    with pytest.raises(
        DataError,
        match=r"different schemas: column 'user_id' is int64 in "
        r".*a.parquet but int32 in .*b.parquet",
    ):
        ParquetStream(str(directory))


def test_empty_file(tmp_path: Path) -> None:
    directory = write(tmp_path / "d", {"a.parquet": table()})
    (directory / "b.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"b.parquet: not a readable Parquet file"):
        ParquetStream(str(directory))


def test_truncated_file(tmp_path: Path) -> None:
    directory = write(tmp_path / "d", {"a.parquet": table()})
    data = (directory / "a.parquet").read_bytes()
    (directory / "a.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError,
        match=r"a.parquet: not a readable Parquet file \(empty, "
        r"truncated or corrupt\)",
    ):
        ParquetStream(str(directory))


def test_corrupt_row_group_is_named(tmp_path: Path) -> None:
    directory = write(tmp_path / "d", {"a.parquet": table()})
    path = directory / "a.parquet"
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(1).column(1).data_page_offset
    data[start : start + 40] = b"\xff" * 40  # the footer stays intact, the pages do not
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"a.parquet, row group 1: cannot be read"):
        read_all(directory)


def test_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: no such file or directory"):
        ParquetStream(str(tmp_path / "nowhere"))


def test_missing_metadata(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    pq.write_table(table(), directory / "a.parquet")
    with pytest.raises(DataError, match=r"dataset.json: missing"):
        ParquetStream(str(directory))


def test_bad_metadata(tmp_path: Path) -> None:
    directory = write(tmp_path / "d", {"a.parquet": table()})
    (directory / "dataset.json").write_text(
        '{"kind": "ctr", "vocab": {"category": 3}, "side_features": ["category"]}'
    )
    with pytest.raises(
        DataError,
        match=r"dataset.json: vocab has no size for features "
        r"\['item'\]",
    ):
        ParquetStream(str(directory))


def test_uri_paths_work(tmp_path: Path) -> None:
    directory = write(tmp_path / "d", {"a.parquet": table()})
    stream = ParquetStream(f"file://{directory}", StreamConfig(shuffle=False))
    assert next(iter(stream)).user_ids.tolist() == [0, 1, 2, 3]


def test_unsigned_ids_beyond_int64(tmp_path: Path) -> None:
    huge = 2**63 + 5
    items = pa.array([[1, 2, 3], [1, 2, 3], [1, 2, huge], [1, 2, 3]], pa.list_(pa.uint64()))
    directory = write(
        tmp_path / "d", {"part.parquet": table().set_column(1, "history_item_ids", items)}
    )
    with pytest.raises(
        DataError,
        match=r"row group 1, row 0, column 'history_item_ids': value "
        r"9223372036854775813 does not fit int64 \(raw 64-bit ids need id_mode "
        r"'hash'\)",
    ):
        read_all(directory)
    hashed = DatasetMeta(
        kind="ctr", vocab={"item": 10, "category": 3}, side_features=["category"], id_mode="hash"
    )
    (directory / "dataset.json").write_text(hashed.to_json())
    values = next(
        b.features["history_item"].values()
        for b in ParquetStream(str(directory), StreamConfig(batch_size=4, shuffle=False))
    )
    assert values.min() >= 0 and values.max() < 10


@pytest.mark.parametrize("shuffle", [False, True], ids=["in order", "shuffled"])
def test_hashed_unsigned_ids_with_empty_histories(tmp_path: Path, shuffle: bool) -> None:
    """Raw uint64 ids hashed, in row groups whose histories are all empty: batches of the
    tables' id type, shuffled or not."""
    empty = pa.array([[], [], [], []], pa.list_(pa.uint64()))
    hashed = DatasetMeta(
        kind="ctr", vocab={"item": 10, "category": 3}, side_features=["category"], id_mode="hash"
    )
    parts = {
        "part.parquet": table()
        .set_column(1, "history_item_ids", empty)
        .set_column(2, "history_category_ids", empty)
    }
    directory = write(tmp_path / "d", parts, hashed)
    config = StreamConfig(batch_size=4, shuffle=shuffle)
    (batch,) = list(ParquetStream(str(directory), config))
    assert batch.features.values().dtype == torch.int32
    assert batch.features["history_item"].values().numel() == 0
    assert batch.features.lengths().tolist()[:8] == [0] * 8


def test_user_ids_checked_against_the_user_vocab(tmp_path: Path) -> None:
    meta = DatasetMeta(
        kind="ctr", vocab={"item": 10, "category": 3, "user": 4}, side_features=["category"]
    )
    directory = write(tmp_path / "d", {"p.parquet": table(user_id=[0, 1, -3, 2])}, meta)
    with pytest.raises(
        DataError,
        match=r"row group 1, row 0, column 'user_id': id -3 is "
        r"negative",
    ):
        read_all(directory)


def test_files_must_match_dataset_json(tmp_path: Path) -> None:
    meta = DatasetMeta(
        kind="ctr", vocab=META.vocab, side_features=["category"], files={"a.parquet": 4}, rows=4
    )
    directory = write(tmp_path / "d", {"a.parquet": table()}, meta)
    ParquetStream(str(directory))  # consistent: fine
    (directory / "copy.parquet").write_bytes((directory / "a.parquet").read_bytes())
    with pytest.raises(DataError, match=r"dataset.json does not list \['copy.parquet'\]"):
        ParquetStream(str(directory))
    (directory / "copy.parquet").unlink()
    pq.write_table(pa.table(good_rows(6)), directory / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: 6 rows, but dataset.json says 4"):
        ParquetStream(str(directory))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"kind": "ctr", "vocab": [10, 3]}', r"vocab must map feature names to table sizes"),
        (
            '{"kind": "ctr", "vocab": {"item": 10, "category": 3}, "side_features": "category"}',
            r"side_features must be a list of feature names, got 'category'",
        ),
        ('{"kind": "rows", "vocab": {"item": 10}}', r"dataset kind must be one of"),
        ("{not json", r"not valid JSON"),
    ],
)
def test_malformed_metadata(tmp_path: Path, text: str, message: str) -> None:
    directory = write(tmp_path / "d", {"a.parquet": table()})
    (directory / "dataset.json").write_text(text)
    with pytest.raises(DataError, match=message):
        ParquetStream(str(directory))


BAD_COLUMNS = {
    "item_id": {"item_id": [4, 4, 99, 4]},
    # Shuffled, the item lists are decoded in a pass of their own, after the other columns.
    "history_item_ids": {"history_item_ids": [[1, 2, 3]] * 2 + [[1, 99, 3], [1, 2, 3]]},
}


def dataset_with_a_bad_row_group(tmp_path: Path, column: str = "item_id") -> Path:
    """12 rows in 3 files of 2 row groups; row group 1 of b.parquet (rows 6, 7) holds an id
    beyond the item vocabulary in ``column``."""
    bad = table(**BAD_COLUMNS[column])
    return write(tmp_path / "d", {"a.parquet": table(), "b.parquet": bad, "c.parquet": table()})


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_misaligned_row_stops_every_reader_of_its_row_group(
    tmp_path: Path, shuffle: bool
) -> None:
    # One row group of 8 rows split between 2 readers: rank 0 reads rows 0-3, and its chunk
    # holds the whole group, whose row 6 has fewer categories than items.
    rows = good_rows(8)
    rows["history_category_ids"][6] = [0, 1]
    directory = tmp_path / "d"
    directory.mkdir()
    pq.write_table(pa.table(rows), directory / "a.parquet", row_group_size=8)
    (directory / "dataset.json").write_text(META.to_json())
    for rank in (0, 1):
        stream = ParquetStream(
            str(directory), StreamConfig(batch_size=2, shuffle=shuffle), rank=rank, world_size=2
        )
        with pytest.raises(DataError, match=r"row 6, column 'history_category_ids': list of 2"):
            list(stream)


@pytest.mark.parametrize("column", list(BAD_COLUMNS))
@pytest.mark.parametrize("shuffle", [False, True])
def test_bad_row_groups_are_skipped_and_counted_only_when_asked(
    tmp_path: Path, shuffle: bool, column: str
) -> None:
    directory = dataset_with_a_bad_row_group(tmp_path, column)
    with pytest.raises(DataError, match=rf"b.parquet, row group 1, row 0, column '{column}'"):
        list(ParquetStream(str(directory), StreamConfig(batch_size=3, shuffle=shuffle)))
    config = StreamConfig(batch_size=3, shuffle=shuffle, skip_bad_row_groups=True)
    seen, skipped, counts = [], 0, []
    for rank in (0, 1):
        stream = ParquetStream(str(directory), config, rank=rank, world_size=2)
        batches = list(stream)
        counts.append(len(batches))
        seen += [i for b in batches for i in b.row_ids.tolist()]
        skipped += stream.skipped_rows
        assert stream.state_dict()["skipped_rows"] == stream.skipped_rows
    assert sorted(seen) == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    assert skipped == 2


@pytest.mark.parametrize("column", list(BAD_COLUMNS))
@pytest.mark.parametrize("shuffle", [False, True])
def test_a_stream_that_skips_resumes_exactly(tmp_path: Path, shuffle: bool, column: str) -> None:
    directory = dataset_with_a_bad_row_group(tmp_path, column)
    config = StreamConfig(batch_size=2, shuffle=shuffle, skip_bad_row_groups=True)
    whole = [b.row_ids.tolist() for b in ParquetStream(str(directory), config)]
    for stop in range(1, len(whole)):
        first = ParquetStream(str(directory), config)
        it = iter(first)
        head = [next(it).row_ids.tolist() for _ in range(stop)]
        state = first.state_dict()
        second = ParquetStream(str(directory), config)
        second.load_state_dict(state)
        rest = [b.row_ids.tolist() for b in second]
        assert head + rest == whole, stop
        assert second.skipped_rows == 2, stop


def test_a_resume_inside_a_skipped_row_group_counts_it_once(tmp_path: Path) -> None:
    # Row groups of 3 rows, the middle one bad, batches of 2: batch [2] ends inside the
    # skipped rows 3-5, so the cursor after it lies within them.
    bad = pa.table(
        {
            "user_id": list(range(9)),
            "history_item_ids": [[1, 2, 3]] * 9,
            "history_category_ids": [[0, 1, 2]] * 9,
            "item_id": [4, 4, 4, 99, 4, 4, 4, 4, 4],
            "category_id": [1] * 9,
            "label": [1, 0, 1, 0, 1, 0, 1, 0, 1],
            "timestamp": [100] * 9,
        }
    )
    directory = tmp_path / "d"
    directory.mkdir()
    pq.write_table(bad, directory / "a.parquet", row_group_size=3)
    (directory / "dataset.json").write_text(META.to_json())
    config = StreamConfig(batch_size=2, shuffle=False, skip_bad_row_groups=True)
    whole = [b.row_ids.tolist() for b in ParquetStream(str(directory), config)]
    assert whole == [[0, 1], [2], [6, 7], [8]]
    for stop in range(1, len(whole)):
        first = ParquetStream(str(directory), config)
        it = iter(first)
        for _ in range(stop):
            next(it)
        second = ParquetStream(str(directory), config)
        second.load_state_dict(first.state_dict())
        assert [b.row_ids.tolist() for b in second] == whole[stop:]
        assert second.skipped_rows == 3, stop


def test_footer_bounds_are_read_only_where_recorded(tmp_path: Path) -> None:
    rows = table(user_id=pa.array([0, 1, 2, 3], pa.uint64()), item_id=[4, 9, 10, 4])
    with_stats = write(tmp_path / "a", {"part.parquet": rows})
    without = write(tmp_path / "b", {"part.parquet": rows}, statistics=False)
    footer = pq.ParquetFile(with_stats / "part.parquet").metadata
    assert column_bounds(footer, 1) == {  # unsigned user ids: no signed bounds to trust
        "history_item_ids": (1, 3),
        "history_category_ids": (0, 2),
        "item_id": (4, 10),
        "category_id": (1, 1),
        "label": (0, 1),
        "timestamp": (100, 100),
    }
    assert column_bounds(pq.ParquetFile(without / "part.parquet").metadata, 1) == {}


def test_footer_bounds_follow_columns_not_dotted_paths(tmp_path: Path) -> None:
    # Extra columns whose names begin with a required one and a dot must not lend it their
    # bounds: the bad ids and label below are still found.
    rows = table(item_id=[4, 4, 2**32 + 3, 4], label=[1, 0, 7, 0])
    rows = rows.append_column("item_id.raw", pa.array([1, 2, 3, 4]))
    rows = rows.append_column("label.orig", pa.array([0, 1, 0, 1]))
    directory = write(tmp_path / "d", {"part.parquet": rows})
    bounds = column_bounds(pq.ParquetFile(directory / "part.parquet").metadata, 1)
    assert bounds["item_id"] == (4, 2**32 + 3) and bounds["item_id.raw"] == (3, 4)
    assert bounds["label"] == (0, 7)
    for shuffle in (False, True):
        with pytest.raises(DataError, match=r"row group 1, row 0, column 'item_id'"):
            read_all(directory, shuffle)


def test_bounds_in_range_spare_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the footer says is trusted, as query engines trust it to skip row groups: bounds
    # claiming every id in range let a bad id through unscanned (a file whose writer recorded
    # wrong statistics is corrupt).
    import recsys.data.rowgroups as rowgroups

    directory = write(tmp_path / "d", {"part.parquet": table(item_id=[4, 4, 10, 4])})
    with pytest.raises(DataError, match="not below the vocab size"):
        read_all(directory)
    monkeypatch.setattr(rowgroups, "column_bounds", lambda *_: {"item_id": (0, 9)})
    read_all(directory)
