"""The report's pretraining table: each pretraining's sampled hit rate beside the
full-catalogue metrics of the retrieve stage that scored it, mean ± std over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.analysis import pretraining
from recsys.report import write


def stage(path: Path, record: dict, done: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "stage.json").write_text(json.dumps(record))
    if done:
        (path / "DONE").write_text("")
    return path


def finetune_stage(root: Path) -> Path:
    config = {"model": {"size": "L1H16A2", "arch": "gpsd"}, "run": {"seed": 0}}
    record = {
        "config": config,
        "strategy": "NT",
        "inputs": {"train": "data/ctr_train", "valid": "data/ctr_test"},
        "results": {"valid_auc": 0.7, "train_auc": 0.8, "gap_auc": 0.1},
        "seconds": 2.0,
    }
    return stage(root / "L1H16A2" / "finetune-nt", record)


def pretrain(root: Path, size: str, seed: int, hit: float) -> Path:
    config = {"model": {"size": size}, "run": {"seed": seed}}
    record = {
        "stage": "pretrain",
        "fingerprint": f"pretrain-{size}-{seed}",
        "config": config,
        "results": {"train_hit_rate": hit},
    }
    return stage(root / size / f"seed-{seed}" / "pretrain", record)


def retrieve(model: Path, hr: float, ndcg: float, mrr: float, done: bool = True) -> Path:
    results = {"hr@10": hr, "ndcg@10": ndcg, "mrr": mrr, "users": 50, "k": 10}
    scored = json.loads((model / "stage.json").read_text())["fingerprint"]
    record = {
        "stage": "retrieve",
        # As the pipeline records it: relative to where it ran, not to where the report runs.
        "inputs": {"model": f"runs/elsewhere/{model.name}", "data": "data/x/ctr_test"},
        "model_fingerprint": scored,
        "results": results,
    }
    return stage(model.parent / "retrieve-ctr_test", record, done)


def test_seeds_are_averaged_per_size_and_a_missing_retrieval_shows_as_a_dash(
    tmp_path: Path,
) -> None:
    a = pretrain(tmp_path, "L1H32A2", 0, 0.5)
    b = pretrain(tmp_path, "L1H32A2", 1, 0.7)
    retrieve(a, 0.2, 0.1, 0.05)
    retrieve(b, 0.4, 0.3, 0.15)
    c = pretrain(tmp_path, "L1H16A2", 0, 0.3)
    retrieve(c, 0.9, 0.9, 0.9, done=False)  # unfinished: not read
    cells = pretraining.aggregate(pretraining.collect(tmp_path))
    assert [(x["size"], x["eval"], x["seeds"]) for x in cells] == [
        ("L1H16A2", "–", [0]),
        ("L1H32A2", "ctr_test", [0, 1]),
    ]
    big = cells[1]
    assert big["train_hit_rate"] == pytest.approx(0.6) and big["hr"] == pytest.approx(0.3)
    assert big["ndcg"] == pytest.approx(0.2) and big["mrr"] == pytest.approx(0.1)
    assert big["hr_std"] == pytest.approx(0.1414, abs=1e-4) and big["valid_hit_rate"] is None
    text = pretraining.table(cells)
    assert "| L1H32A2 | 2 | 0.6000 ± 0.1414 | – | ctr_test | 50 | 0.3000 ± 0.1414 |" in text
    assert "| L1H16A2 | 1 | 0.3000 | – | – | – | – | – | – |" in text
    assert "HR@10 | NDCG@10 | MRR |" in text


def test_the_report_shows_the_table_beside_the_finetuning_results(tmp_path: Path) -> None:
    finetune_stage(tmp_path)
    retrieve(pretrain(tmp_path, "L1H16A2", 0, 0.25), 0.125, 0.0625, 0.03125)
    write(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Pretraining" in report
    assert "| L1H16A2 | 1 | 0.2500 | – | ctr_test | 50 | 0.1250 | 0.0625 | 0.0312 |" in report
    (cell,) = json.loads((tmp_path / "report.json").read_text())["pretraining"]
    assert cell["hr"] == 0.125 and cell["k"] == 10


def test_no_pretraining_no_section(tmp_path: Path) -> None:
    finetune_stage(tmp_path)
    write(tmp_path)
    assert "## Pretraining" not in (tmp_path / "report.md").read_text()
