"""`recsys plan` on sizes and settings beyond what can be planned: one line naming the table or
option and the limit, exit code 1, never a traceback; `--out` where no file can be written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recsys.cli import main as cli
from recsys.plan.make import TENSOR_BYTES, most_rows, parse_table

SIDE = ["--table", "category=100"]
WIDTH = 64  # the default model.size, L4H64A4


def refused(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The one line `recsys plan ARGS` stops with."""
    assert cli(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("recsys plan: ")
    return lines[0]


def test_the_largest_table_is_what_one_tensor_holds_in_int64_bytes() -> None:
    assert TENSOR_BYTES == 2**63 - 1
    assert most_rows(WIDTH) == 36_028_797_018_963_967
    assert most_rows(WIDTH) * WIDTH * 4 <= TENSOR_BYTES < (most_rows(WIDTH) + 1) * WIDTH * 4


@pytest.mark.parametrize(
    "table, message",
    [
        ("item=1e30x64", "1e30 rows is over 2^63 - 1"),
        ("item=1e19x64", "1e19 rows is over 2^63 - 1"),
        ("item=9223372036854775808x64", "9223372036854775808 rows is over 2^63 - 1"),
        ("item=1e400x64", "1e400 rows is over 2^63 - 1"),
        ("item=1e999999999x64", "rows is over 2^63 - 1"),
        ("item=-5x64", "rows must be a whole number >= 1"),
        ("item=100x0", "the width must be >= 1"),
        ("item=100x-4", "the width must be >= 1"),
        ("item=1e17x64", "at width 64 a table has at most 36,028,797,018,963,967 rows"),
        ("item=36028797018963968x64", "at most 36,028,797,018,963,967 rows"),
        ("item=1e17", "the most a tensor holds"),
    ],
)
def test_table_sizes_beyond_a_tensor_are_refused_naming_the_table(
    capsys: pytest.CaptureFixture, table: str, message: str
) -> None:
    line = refused(capsys, "--table", table, *SIDE)
    assert message in line and "item" in line


def test_the_largest_table_is_planned_and_explained(capsys: pytest.CaptureFixture) -> None:
    assert cli(["plan", "--table", f"item={most_rows(WIDTH)}x64", *SIDE]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "the tables do not fit 8 ranks" in err
    assert "more than a plan is made for (65,536): smaller tables" in err


def test_rows_are_read_exactly() -> None:
    assert parse_table("item=9007199254740993") == ("item", (9_007_199_254_740_993, None))
    assert parse_table("item=4e9x64") == ("item", (4_000_000_000, 64))
    assert parse_table("item=1_000,000") == ("item", (1_000_000, None))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "-5"], "--batch-size -5: the per-rank batch must be >= 1"),
        (["--batch-size", "0"], "--batch-size 0: the per-rank batch must be >= 1"),
        (["data.batch_size=0"], "data.batch_size 0: the per-rank batch must be >= 1"),
        (["--batch-size", str(10**30)], "would be over 2^63 - 1 bytes"),
        (["--world-size", "100000000"], "at most 65,536"),
        (["-j", "100000x100000"], "-j 100000x100000: 10,000,000,000 ranks"),
        (["--hbm-gb", "nan"], "--hbm-gb must be a finite number > 0, got nan"),
        (["--ddr-gb", "inf"], "--ddr-gb must be a finite number > 0, got inf"),
        (["--hbm-gb", "1e300"], "--hbm-gb 1e+300: at most 8,589,934,592 GB"),
        (["--table", "keys=5"], "--table keys: a table cannot be named like an attribute"),
        (["--table", "item=5"], "--table item is given twice"),
    ],
)
def test_settings_beyond_a_plan_are_refused(
    capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    line = refused(capsys, "--table", "item=1000", *SIDE, *args)
    if message.startswith("data.batch_size") and message not in line:
        # The config may refuse the value itself on load (its own range checks).
        assert "batch_size" in line
        return
    assert message in line


def test_a_huge_batch_that_the_planner_cannot_fit_gets_a_batch_that_fits(
    capsys: pytest.CaptureFixture,
) -> None:
    assert cli(["plan", "--table", "item=100", "--batch-size", str(10**14)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "- a smaller --batch-size: 67,108,864 rows per rank fit" in err


def test_a_dense_part_no_rank_holds_is_named_without_allocating_it(
    capsys: pytest.CaptureFixture,
) -> None:
    # 4 × 13 × 1e12 fp32 dense weights: 208 TB if it were allocated instead of on meta.
    assert cli(["plan", "--table", "item=100", "model.size=L4H1000000A4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "- a smaller model.size: the dense part of L4H1000000A4 needs" in err


def test_out_where_no_file_can_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, read_only_dir: Path
) -> None:
    plan = ["--table", "item=1000", *SIDE, "--out"]
    folder = tmp_path / "plans"
    folder.mkdir()
    line = refused(capsys, *plan, str(folder))
    assert f"--out {folder}: is a directory; give a file, e.g. {folder / 'plan.json'}" in line
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = refused(capsys, *plan, str(afile / "plan.json"))
    assert f"--out {afile / 'plan.json'}: lies under {afile}, a file" in line
    assert afile.read_text() == "x"
    locked = read_only_dir
    line = refused(capsys, *plan, str(locked / "plan.json"))
    assert f"--out {locked / 'plan.json'}: cannot be written: " in line
    assert not [p for p in os.listdir(locked) if "plan.json" in p]  # no half-written file


def test_a_hand_edited_plan_file_is_named_with_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = tmp_path / "plan.json"
    assert cli(["plan", "--table", "item=1000", *SIDE, "--out", str(good)]) == 0
    capsys.readouterr()
    doc = json.loads(good.read_text())
    broken = {
        "rows": ({**doc, "tables": [{**doc["tables"][0], "rows": "many"}]}, "rows must be"),
        "tables": ({**doc, "tables": 5}, "'tables' must be a list"),
        "cluster": ({**doc, "cluster": []}, "'cluster' is not an object"),
        "shard": (
            {**doc, "tables": [{**doc["tables"][0], "shards": [{"rank": 0}]}]},
            "shard 0 lacks offsets",
        ),
    }
    for name, (content, message) in broken.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        assert message in refused(capsys, "--show", str(path))
        assert message in refused(capsys, "--compare", str(good), str(path))
