"""Empty or broken work never looks like success: a stage that trained no step, whose results
are NaN, or that scored no sample or got NaN scores stops with one line and no DONE."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from recsys.data.schema import DatasetMeta
from recsys.stages import evaluate, finetune, pretrain, transfer
from recsys.stages.common import StageDir, StageError, run_stage

TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, synth_split) -> Path:
    out = tmp_path_factory.mktemp("empty") / "data"
    config = {"items": 60, "categories": 3, "min_events": 6, "max_events": 20, "seed": 2}
    return synth_split(out, row_group_rows=16, users=120, **config)


def without_rows(dataset: Path, out: Path) -> Path:
    """A copy of ``dataset`` whose files hold no rows (their footers and dataset.json agree),
    its vocabularies beside it."""
    out.mkdir(parents=True)
    if not (out.parent / "vocab").exists():
        shutil.copytree(dataset.parent / "vocab", out.parent / "vocab")
    files = {}
    for part in sorted(dataset.glob("*.parquet")):
        pq.write_table(pq.read_table(part).slice(0, 0), out / part.name)
        files[part.name] = 0
    meta = DatasetMeta.from_json((dataset / "dataset.json").read_text(), str(dataset))
    (out / "dataset.json").write_text(dataclasses.replace(meta, rows=0, files=files).to_json())
    return out


def assert_nothing_recorded(stage: Path) -> None:
    assert not (stage / "DONE").exists() and not (stage / "stage.json").exists()


def test_a_dataset_without_rows_trains_no_step_and_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = without_rows(data / "seq", tmp_path / "seq")
    out = tmp_path / "p"
    assert run_stage(pretrain.main, ["--out", str(out), *TINY, f"data.train={empty}"]) == 2
    assert (
        f"error (rank 0): {out}: stage pretrain trained no step: data.train={empty} gave no "
        "batch (no rows, or every row skipped); nothing recorded (no stage.json, no DONE)"
    ) in capsys.readouterr().err
    assert_nothing_recorded(out)


def test_a_stage_whose_every_row_was_skipped_is_refused(data: Path, tmp_path: Path) -> None:
    seq = tmp_path / "seq"
    shutil.copytree(data / "seq", seq)
    shutil.copytree(data / "vocab", tmp_path / "vocab")
    for part in seq.glob("*.parquet"):
        meta = pq.ParquetFile(part).metadata
        raw = bytearray(part.read_bytes())
        for group in range(meta.num_row_groups):  # the footer stays intact, the pages do not
            start = meta.row_group(group).column(1).data_page_offset
            raw[start : start + 40] = b"\xff" * 40
        part.write_bytes(bytes(raw))
    out = tmp_path / "p"
    args = ["--out", str(out), *TINY, f"data.train={seq}", "data.skip_bad_row_groups=true"]
    with pytest.raises(StageError, match="stage pretrain trained no step"):
        pretrain.main(args)
    assert_nothing_recorded(out)


def test_a_result_that_is_not_finite_is_not_recorded(tmp_path: Path) -> None:
    stage = StageDir(tmp_path / "finetune", "finetune")
    stage.begin()
    nan = math.nan
    results = {"valid_auc": nan, "valid_logloss": nan, "valid_gauc": nan, "valid_samples": 0.0}
    with pytest.raises(StageError) as err:
        stage.finish({"fingerprint": "f", "steps": 3, "results": results})
    assert str(err.value) == (
        f"{stage.path}: stage finetune ended with non-finite results: valid_auc=nan, "
        "valid_logloss=nan, valid_samples=0; nothing recorded (no stage.json, no DONE; "
        "run.resume=false starts over)"
    )
    assert_nothing_recorded(stage.path)
    # gAUC alone may be undefined (no user with both labels): that result is recorded.
    results = {"valid_auc": 0.6, "valid_logloss": 0.69, "valid_gauc": nan, "valid_samples": 8.0}
    stage.finish({"fingerprint": "f", "steps": 3, "results": results})
    assert (stage.path / "DONE").exists()


@pytest.fixture(scope="module")
def finetuned(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetuned")
    ctr = [*TINY, f"data.train={data / 'ctr_train'}", "run.max_steps=1"]
    transfer.main(["--strategy", "NT", "--out", str(root / "nt"), *ctr])
    finetune.main(["--init", str(root / "nt"), "--out", str(root / "finetune"), *ctr])
    return root / "finetune"


def test_evaluate_refuses_nan_scores(data: Path, finetuned: Path, tmp_path: Path) -> None:
    # A copy of the finetuned stage whose embedding of one test candidate is NaN.
    broken = tmp_path / "finetune"
    shutil.copytree(finetuned, broken, ignore=shutil.ignore_patterns("weights", "checkpoint"))
    dcp_to_torch_save(str(finetuned / "weights"), str(tmp_path / "weights.pt"))
    weights = torch.load(tmp_path / "weights.pt")
    first = next((data / "ctr_test").glob("*.parquet"))
    item = pq.read_table(first, columns=["item_id"])[0][0].as_py()
    weights["table/item"][item] = math.nan
    torch.save(weights, tmp_path / "weights.pt")
    torch_save_to_dcp(str(tmp_path / "weights.pt"), str(broken / "weights"))
    out = tmp_path / "evaluate"
    args = ["--model", str(broken), "--data", str(data / "ctr_test"), "--out", str(out), *TINY]
    with pytest.raises(StageError) as err:
        evaluate.main(args)
    found = re.fullmatch(
        rf"--data {data / 'ctr_test'}: (\d+) of (\d+) samples got a NaN or infinite score "
        r"\(the first on this rank: user \d+, candidate item \d+\); nothing recorded",
        str(err.value),
    )
    assert found and 0 < int(found[1]) < int(found[2]), str(err.value)
    assert_nothing_recorded(out)
    assert not (out / "predictions").exists()


def test_evaluate_refuses_a_dataset_without_samples(
    data: Path, finetuned: Path, tmp_path: Path
) -> None:
    empty = without_rows(data / "ctr_test", tmp_path / "ctr_test")
    out = tmp_path / "evaluate"
    args = ["--model", str(finetuned), "--data", str(empty), "--out", str(out), *TINY]
    with pytest.raises(StageError, match=rf"--data {empty}: no sample was scored \(its dataset"):
        evaluate.main(args)
    assert_nothing_recorded(out)
