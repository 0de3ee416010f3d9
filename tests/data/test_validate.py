"""``recsys data inspect --check`` lists every value the stream would refuse, with the stream's
own words; dataset.json keys of the wrong type are named; an ``--out`` that cannot be written
is one line."""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# The planted datasets of the stream's own bad-input tests (tests/data is on the import path).
from test_bad_input import META, good_rows, table, write

from recsys.cli import main
from recsys.data import inspect
from recsys.data.schema import DataError, DatasetMeta
from recsys.data.stream import ParquetStream, StreamConfig


def corrupt_row_group(path: Path, row_group: int) -> None:
    """Overwrite the first data page of a row group's second column; the footer stays."""
    data = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(row_group).column(1).data_page_offset
    data[start : start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))


def planted(directory: Path) -> Path:
    """Three files of row groups of 2 rows: a.parquet holds a null, a negative id, an id
    beyond the vocab, a misaligned side list and a label of 2; row group 1 of b.parquet
    cannot be decoded; c.parquet is clean."""
    rows = good_rows(8)
    rows["history_item_ids"][1] = [1, None, 3]
    rows["history_category_ids"][3] = [0, -1, 2]
    rows["item_id"][4] = 10
    rows["history_category_ids"][5] = [0, 1]
    rows["label"][6] = 2
    parts = {"a.parquet": pa.table(rows), "b.parquet": table(), "c.parquet": table()}
    write(directory, parts)
    corrupt_row_group(directory / "b.parquet", 1)
    return directory


def expected_lines(d: Path) -> list[str]:
    a, b = d / "a.parquet", d / "b.parquet"
    return [
        f"{a}, row group 0, row 1, column 'history_item_ids': null value; nulls are not allowed",
        f"{a}, row group 1, row 1, column 'history_category_ids': id -1 is negative; ids must "
        "lie in [0, 3)",
        f"{a}, row group 2, row 0, column 'item_id': id 10 is not below the vocab size 10 of "
        "'item' (dataset.json); remap ids densely or use id_mode 'hash'",
        f"{a}, row group 2, row 1, column 'history_category_ids': list of 2 values but "
        "'history_item_ids' has 3; side-feature lists must align with the item list",
        f"{a}, row group 3, row 0, column 'label': label 2; labels must be 0 or 1",
        f"{b}, row group 1: cannot be read (corrupt data?): ",
    ]


def test_check_lists_every_planted_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = planted(tmp_path / "d")
    assert main(["data", "inspect", "--check", str(d)]) == 1
    out = capsys.readouterr().out.splitlines()
    expected = expected_lines(d)
    assert len(out) == len(expected) + 1
    for line, want in zip(out, expected, strict=False):
        assert line.startswith(want), (line, want)
    assert out[-1] == f"error: {d}: 6 problems; 16 rows in 8 row groups checked"


def test_check_as_json_places_each_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = planted(tmp_path / "d")
    assert main(["data", "inspect", "--check", "--json", str(d)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["problems"] == 6 and report["rows"] == 16
    where = [(Path(p["file"]).name, p["row_group"], p["row"], p["column"]) for p in report["shown"]]
    assert where == [
        ("a.parquet", 0, 1, "history_item_ids"),
        ("a.parquet", 1, 1, "history_category_ids"),
        ("a.parquet", 2, 0, "item_id"),
        ("a.parquet", 2, 1, "history_category_ids"),
        ("a.parquet", 3, 0, "label"),
        ("b.parquet", 1, None, None),
    ]


@pytest.mark.parametrize(
    "changes",
    [
        {"history_item_ids": [[1, 2, 3], [1, 2, 3], None, [1, 2, 3]]},
        {"user_id": [0, 1, None, 3]},
        {"history_category_ids": [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 5, 2]]},
        {"item_id": [4, -4, 4, 4]},
        {"label": [1, 0, 0, -1]},
        {
            "history_item_ids": pa.array([[1], [2**63 + 1], [3], [4]], pa.list_(pa.uint64())),
            "history_category_ids": [[0], [1], [2], [0]],
        },
    ],
    ids=["null list", "null user", "category", "negative item", "label", "uint64"],
)
def test_check_says_what_the_stream_says(tmp_path: Path, changes: dict) -> None:
    d = write(tmp_path / "d", {"part.parquet": table(**changes)})
    with pytest.raises(DataError) as refused:
        list(ParquetStream(str(d), StreamConfig(batch_size=3, shuffle=False)))
    findings = inspect.check(str(d))
    assert [p.line for p in findings.in_order()] == [str(refused.value)]


def test_an_unreadable_row_group_is_one_line_in_the_stream_and_in_check(tmp_path: Path) -> None:
    d = write(tmp_path / "d", {"part.parquet": table()})
    corrupt_row_group(d / "part.parquet", 1)
    with pytest.raises(DataError) as refused:
        list(ParquetStream(str(d), StreamConfig(batch_size=3, shuffle=False)))
    assert "\n" not in str(refused.value) and str(refused.value).isprintable()
    findings = inspect.check(str(d))
    assert [p.line for p in findings.in_order()] == [str(refused.value)]


def test_check_of_clean_datasets_is_one_line(
    tmp_path: Path, synth_split, capsys: pytest.CaptureFixture[str]
) -> None:
    out = synth_split(tmp_path / "s", 64, users=120, items=40, categories=4, conditions=2, seed=3)
    for name in ("seq", "ctr_train"):
        meta = DatasetMeta.from_json((out / name / "dataset.json").read_text(), name)
        groups = sum(pq.ParquetFile(out / name / f).num_row_groups for f in meta.files)
        assert main(["data", "inspect", "--check", str(out / name)]) == 0
        assert capsys.readouterr().out == f"ok: {meta.rows} rows in {groups} row groups checked\n"


def test_check_shows_the_first_of_each_column_and_counts_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = good_rows(60)
    rows["item_id"] = list(range(60))  # 50 beyond the vocab of 10
    rows["label"] = [7] * 60
    d = write(tmp_path / "d", {"a.parquet": pa.table(rows)})
    assert main(["data", "inspect", "--check", "--show", "3", str(d)]) == 1
    out = capsys.readouterr().out.splitlines()
    columns = [line.split(": ")[0].split(", ")[-1] for line in out[:6]]
    assert columns == ["column 'label'"] * 3 + ["column 'item_id'"] * 3
    assert "a.parquet, row group 0, row 0, column 'label': label 7; " in out[0]
    assert "a.parquet, row group 5, row 0, column 'item_id': id 10 is not below" in out[3]
    assert out[6:] == [
        "... and 57 more in column 'label' (first 3 shown)",
        "... and 47 more in column 'item_id' (first 3 shown)",
        f"error: {d}: 110 problems; 60 rows in 30 row groups checked",
    ]


def test_check_names_every_file_the_stream_refuses_and_reads_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mistyped = table().drop_columns(["label", "timestamp"])
    mistyped = mistyped.set_column(3, "item_id", pa.array(["a", "b", "c", "d"]))
    parts = {"a.parquet": table(), "b.parquet": mistyped, "d.parquet": table(label=[1, 0, 5, 0])}
    d = write(tmp_path / "d", parts)
    (d / "c.parquet").write_bytes(b"")
    assert main(["data", "inspect", "--check", str(d)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{d / 'b.parquet'}, column 'item_id': type string, expected int64"
    assert out[1].startswith(f"{d / 'b.parquet'}, column 'label': missing; a ctr dataset")
    assert out[2].startswith(f"{d / 'b.parquet'}, column 'timestamp': missing;")
    assert out[3].startswith(f"{d / 'c.parquet'}: not a readable Parquet file")
    assert (
        out[4]
        == f"{d / 'd.parquet'}, row group 1, row 0, column 'label': label 5; labels must be 0 or 1"
    )
    assert out[5] == f"error: {d}: 5 problems; 8 rows in 4 row groups checked"


def test_check_reports_files_that_disagree_with_dataset_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = DatasetMeta(
        kind="ctr", vocab=META.vocab, side_features=["category"], files={"a.parquet": 4}, rows=4
    )
    parts = {"a.parquet": table(), "copy.parquet": table(item_id=[4, 11, 4, 4])}
    d = write(tmp_path / "d", parts, meta)
    assert main(["data", "inspect", "--check", str(d)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dataset.json does not list ['copy.parquet']")
    assert out[1].startswith(f"{d / 'copy.parquet'}, row group 0, row 1, column 'item_id': id 11")


def test_a_dataset_that_cannot_be_checked_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "inspect", "--check", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"recsys data inspect: error: {tmp_path / 'nowhere'}: no such file or directory\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"kind": "ctr", "vocab": {"item": 10}, "protocol": [1]}', r"protocol must be a JSON"),
        ('{"kind": "ctr", "vocab": {"item": true}}', r"vocab sizes must be positive integers"),
        ('{"kind": "ctr", "vocab": {"item": 10}, "rows": "12"}', r"rows must be a row count"),
        (
            '{"kind": "ctr", "vocab": {"item": 10}, "files": {"a.parquet": "4"}}',
            r"files\['a.parquet'\] must be a row count",
        ),
        ('{"kind": 1, "vocab": {"item": 10}}', r"dataset kind must be one of .*, got 1"),
        ('{"kind": ["ctr"], "vocab": {"item": 10}}', r"dataset kind must be one of"),
        ('{"kind": "ctr", "vocab": {"item": 10}, "id_mode": 2}', r"id_mode must be one of"),
        ('{"kind": "seq", "vocab": {"item": 10}, "has_timestamps": "yes"}', r"has_timestamps"),
        ('{"kind": "ctr", "vocab": {"item": 10}, "conditions": "liked"}', r"conditions must be"),
        ('{"kind": "ctr", "vocab": {"item": 10}, "format_version": true}', r"format_version"),
        ('{"vocab": {"item": 10}}', r"missing keys \['kind'\]"),
        ("[1, 2]", r"expected a JSON object, got list"),
        ("{not json", r"not valid JSON"),
    ],
)
def test_dataset_json_of_the_wrong_types_names_the_file_and_key(text: str, message: str) -> None:
    with pytest.raises(DataError, match=rf"^d/dataset.json: {message}"):
        DatasetMeta.from_json(text, "d/dataset.json")


def test_dataset_json_that_is_not_utf8_names_the_file() -> None:
    with pytest.raises(DataError, match=r"^d/dataset.json: not UTF-8 text \(invalid start byte"):
        DatasetMeta.from_json(b'{"kind": "\xff"}', "d/dataset.json")


def test_a_wrong_type_in_dataset_json_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = write(tmp_path / "d", {"a.parquet": table()})
    (d / "dataset.json").write_text('{"kind": "ctr", "vocab": {"item": 10}, "protocol": [1]}')
    assert main(["data", "inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"recsys data inspect: error: {d / 'dataset.json'}: protocol must be a JSON object, "
        "got [1]\n"
    )


def test_a_dataset_json_that_is_not_utf8_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = write(tmp_path / "d", {"a.parquet": table()})
    (d / "dataset.json").write_bytes(b'{"kind": "\xff"}')
    assert main(["data", "inspect", str(d)]) == 2
    assert capsys.readouterr().err.startswith(
        f"recsys data inspect: error: {d / 'dataset.json'}: not UTF-8 text"
    )


SYNTH = ["data", "synth", "--users", "40", "--items", "20", "--categories", "4"]


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def test_out_that_is_a_file_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main([*SYNTH, "--out", str(target), *extra]) == 2
        err = capsys.readouterr().err
        assert err == f"recsys data synth: error: {target}: exists and is not a directory\n"
    assert target.read_text() == "keep me"
    under = target / "data"
    assert main([*SYNTH, "--out", str(under)]) == 2
    assert capsys.readouterr().err == (
        f"recsys data synth: error: {under}: {target} is not a directory\n"
    )


def test_out_in_a_read_only_directory_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    reason = "permission denied"
    if os.geteuid() == 0:  # root writes there anyway: refused as on a read-only mount
        reason = "read-only file system"

        def refuse(*_args, dir: str, **_kwargs) -> str:
            raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, "x"))

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(logging.getLogger("recsys"), "handlers", [])
    assert main([*SYNTH, "--out", str(locked / "data")]) == 2
    assert capsys.readouterr().err == (
        f"recsys data synth: error: {locked / 'data'}: cannot create it in {locked}: {reason}\n"
    )


def test_a_full_disk_names_the_file_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_args, **_kwargs) -> None:  # as pyarrow raises it: an errno, no file name
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    # main() logs to the stderr of its time: not to an earlier test's captured one.
    monkeypatch.setattr(logging.getLogger("recsys"), "handlers", [])
    out = tmp_path / "out" / "data"
    assert main([*SYNTH, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert f"\n{line}\n" in f"\n{err}"  # on a line of its own, after the progress bar
    assert line == (
        f"recsys data synth: error: {out / 'seq' / 'part-00000.parquet'}: no space left on device"
    )
    assert list(out.parent.iterdir()) == []  # no dataset, no temporary directory
