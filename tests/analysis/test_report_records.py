"""Records a report cannot read (a result that is no number, an input that is no path) are
one line naming the stage.json and the key; a null valid input is read as unknown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.cli import main as cli
from recsys.report import collect


def stage(root: Path, **changes) -> Path:
    directory = root / "L1H16A2" / "finetune-nt"
    directory.mkdir(parents=True)
    record = {
        "config": {"model": {"size": "L1H16A2", "arch": "gpsd"}, "run": {"seed": 0}},
        "strategy": "NT",
        "inputs": {"train": "data/ctr_train", "valid": "data/ctr_test"},
        "results": {"valid_auc": 0.7, "train_auc": 0.8, "gap_auc": 0.1},
        "seconds": 2.0,
        "epochs": [],
    }
    for key, value in changes.items():
        record[key] = {**record[key], **value} if isinstance(value, dict) else value
    (directory / "stage.json").write_text(json.dumps(record))
    (directory / "DONE").write_text("")
    return directory / "stage.json"


def refused(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert cli(["report", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_result_that_is_no_number_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    record = stage(tmp_path, results={"valid_auc": "high"})
    line = refused(capsys, str(tmp_path))
    assert f'{record}: results.valid_auc must be a number (or null), got "high"' in line


def test_an_input_that_is_no_path_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    record = stage(tmp_path, inputs={"valid": 5})
    assert f"{record}: inputs.valid must be a path (or null), got 5" in refused(
        capsys, str(tmp_path)
    )


def test_a_null_valid_input_is_unknown(tmp_path: Path) -> None:
    stage(tmp_path, inputs={"valid": None})
    (row,) = collect(tmp_path)
    assert row["eval"] == "?" and row["eval_path"] is None and row["auc"] == 0.7
