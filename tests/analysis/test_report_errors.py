"""`recsys report` on what holds no report, on records it cannot read (a result that is no
number, an input that is no path), or writing where it cannot: one line naming the directory,
file or key, exit code 2, no traceback, and no empty report left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.cli import main as cli
from recsys.report import aggregate, collect, table3


def finetune_stage(root: Path, strategy: str = "NT", auc: float = 0.7, done: bool = True) -> Path:
    """A finished (or unfinished) finetune stage's record, as the stage writes it."""
    stage = root / "L1H16A2" / f"finetune-{strategy.lower().replace('&', '_')}"
    stage.mkdir(parents=True)
    record = {
        "config": {"model": {"size": "L1H16A2", "arch": "gpsd"}, "run": {"seed": 0}},
        "strategy": strategy,
        "inputs": {"train": "data/ctr_train", "valid": "data/ctr_test"},
        "results": {"valid_auc": auc, "train_auc": auc + 0.1, "gap_auc": 0.1},
        "seconds": 2.0,
        "epochs": [{"epoch": 0, "train_auc": auc + 0.1, "valid_auc": auc, "gap_auc": 0.1}],
    }
    (stage / "stage.json").write_text(json.dumps(record))
    if done:
        (stage / "DONE").write_text("")
    return stage


def refused(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The one line `recsys report ARGS` stops with."""
    assert cli(["report", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("recsys report: ")
    return lines[0]


def no_report(directory: Path) -> None:
    for name in ("report.md", "report.json", "curves.png"):
        assert not (directory / name).exists(), name


def test_a_missing_or_empty_experiment_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "missing"
    assert f"{missing}: no such directory" in refused(capsys, str(missing))
    assert not missing.exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"{afile}: is not a directory" in refused(capsys, str(afile))
    empty = tmp_path / "empty"
    empty.mkdir()
    line = refused(capsys, str(empty))
    assert f"{empty}: no finetune stage" in line and "run `recsys pipeline run` first" in line
    no_report(empty)


def test_unfinished_finetune_stages_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    finetune_stage(tmp_path, "NT", done=False)
    assert f"{tmp_path}: 1 finetune stage, not finished" in refused(capsys, str(tmp_path))
    finetune_stage(tmp_path, "ST&SF", done=False)
    assert f"{tmp_path}: 2 finetune stages, none finished" in refused(capsys, str(tmp_path))
    no_report(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"strategy": "NT"}', "not the record of a finished finetune stage"),
    ],
)
def test_a_broken_stage_record_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: str, message: str
) -> None:
    stage = finetune_stage(tmp_path)
    (stage / "stage.json").write_text(content)
    line = refused(capsys, str(tmp_path))
    assert f"{stage / 'stage.json'}: {message}" in line
    no_report(tmp_path)


def test_an_out_file_that_cannot_be_written_is_named(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    read_only_dir: Path,
) -> None:
    experiment = tmp_path / "exp"
    finetune_stage(experiment)
    docs = tmp_path / "docs"
    docs.mkdir()
    line = refused(capsys, str(experiment), "--out", str(docs))
    assert f"report file {docs}: is a directory; give a markdown file" in line
    assert not list(docs.iterdir())
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = refused(capsys, str(experiment), "--out", str(afile / "results.md"))
    assert f"report file {afile / 'results.md'}: lies under {afile}, a file" in line
    bare = tmp_path / "results"
    line = refused(capsys, str(experiment), "--out", str(bare))
    assert f"report file {bare}: give a name with a suffix, e.g. {bare}.md" in line
    locked = read_only_dir
    line = refused(capsys, str(experiment), "--out", str(locked / "results.md"))
    assert f"report file {locked / 'results.md'}: cannot be written: " in line
    assert not (locked / "results.md").exists()
    assert not (locked / ".results.md.partial").exists()
    # A file it can write: the report and its figures beside it, nothing half-written.
    out = tmp_path / "docs" / "results.md"
    assert cli(["report", str(experiment), "--out", str(out), "--title", "Tiny"]) == 0
    assert out.read_text().startswith("# Tiny") and (out.parent / "results" / "gap.png").exists()
    assert not list(out.parent.glob(".*.partial"))


def edited(stage: Path, **changes) -> Path:
    """The stage's record with ``changes`` merged into its sections; its stage.json."""
    path = stage / "stage.json"
    record = json.loads(path.read_text())
    for key, value in changes.items():
        record[key] = {**record[key], **value}
    path.write_text(json.dumps(record))
    return path


def test_a_result_that_is_no_number_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    record = edited(finetune_stage(tmp_path), results={"valid_auc": "high"})
    line = refused(capsys, str(tmp_path))
    assert f'{record}: results.valid_auc must be a number (or null), got "high"' in line


def test_an_input_that_is_no_path_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    record = edited(finetune_stage(tmp_path), inputs={"valid": 5})
    assert f"{record}: inputs.valid must be a path (or null), got 5" in refused(
        capsys, str(tmp_path)
    )


def test_a_null_valid_input_is_unknown(tmp_path: Path) -> None:
    edited(finetune_stage(tmp_path), inputs={"valid": None})
    (row,) = collect(tmp_path)
    assert row["eval"] == "?" and row["eval_path"] is None and row["auc"] == 0.7


def test_frozen_tables_stored_in_fp16_are_their_own_strategy(tmp_path: Path) -> None:
    for name, auc, dtype in (("a", 0.8, "fp32"), ("b", 0.7, "fp16")):
        path = finetune_stage(tmp_path / name, "ST&SF", auc=auc) / "stage.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "frozen_dtype": dtype}))
    rows = collect(tmp_path / "a") + collect(tmp_path / "b")
    assert [(r["strategy"], r["auc"]) for r in rows] == [("ST&SF", 0.8), ("ST&SF (fp16)", 0.7)]
    header = table3(aggregate(rows), None).splitlines()[0]
    assert header == "| size | model | seeds | ST&SF | ST&SF (fp16) |"
