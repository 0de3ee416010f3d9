"""The GPSD chain end to end: TorchX jobs of 2 processes on local_cwd, tiny synthetic data.

One pipeline run (NT, FT and ST&SF sharing one pretraining) is shared by the tests below;
each reads the weights the stages wrote and checks what the strategy promises.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from recsys.checkpoint.manager import export
from recsys.data.protocol import write_split
from recsys.data.synth import SynthConfig, make
from recsys.pipelines.gpsd import PipelineError, Study, run

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def weights(stage: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """A stage's weights/ as full tensors by stable name."""
    out = export(stage / "weights", tmp / f"{stage.parent.name}-{stage.name}.pt")
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> dict:
    root = tmp_path_factory.mktemp("gpsd")
    result, source = make(
        SynthConfig(users=240, items=80, categories=4, min_events=6, max_events=30, seed=5)
    )
    write_split(root / "data", result, source, row_group_rows=20)
    config = root / "tiny.yaml"
    config.write_text(
        "model: {size: L1H16A2, max_len: 16, negatives: 16}\n"
        "data: {batch_size: 16}\nrun: {epochs: 1}\noptim: {lr: 0.003}\n"
    )
    monkeypatch_module.chdir(REPO)  # components/ and torchx.yaml are found from the root
    study = Study(
        experiment=str(root / "exp"),
        data=str(root / "data"),
        config=str(config),
        strategies=("NT", "FT", "ST&SF"),
    )
    steps = run(study, "local_cwd", console=io.StringIO())
    return {"root": root, "study": study, "steps": steps, "exp": root / "exp" / "L1H16A2"}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_every_stage_ran_on_two_ranks(chain: dict) -> None:
    names = [s.out.name for s in chain["steps"]]
    assert names == [
        "pretrain",
        "retrieve-ctr_test",
        "transfer-nt",
        "transfer-ft",
        "transfer-st",
        "freeze-st",
        "finetune-nt",
        "finetune-ft",
        "finetune-st_sf",
    ]
    for step in chain["steps"]:
        record = json.loads((step.out / "stage.json").read_text())
        assert record["world_size"] == 2 and (step.out / "DONE").exists()
    retrieved = json.loads((chain["exp"] / "retrieve-ctr_test" / "stage.json").read_text())
    assert retrieved["inputs"]["model"] == str(chain["exp"] / "pretrain")
    assert retrieved["results"]["k"] == 10 and 0 <= retrieved["results"]["hr@10"] <= 1
    finetune = json.loads((chain["exp"] / "finetune-st_sf" / "stage.json").read_text())
    assert finetune["strategy"] == "ST&SF" and finetune["frozen"] == ["category", "item"]
    assert 0.0 < finetune["results"]["valid_auc"] < 1.0 and finetune["epochs"]


def test_st_sf_tables_are_the_pretrained_ones_bit_for_bit(chain: dict, tmp_path: Path) -> None:
    pretrained = weights(chain["exp"] / "pretrain", tmp_path)
    finetuned = weights(chain["exp"] / "finetune-st_sf", tmp_path)
    for table in ("table/item", "table/category"):
        assert torch.equal(finetuned[table], pretrained[table]), table
    # ... while the dense part did train.
    head = weights(chain["exp"] / "freeze-st", tmp_path)["dense/head.0.weight"]
    assert not torch.equal(finetuned["dense/head.0.weight"], head)


def test_ft_starts_from_the_pretrained_tower_and_nt_from_scratch(
    chain: dict, tmp_path: Path
) -> None:
    pretrained = weights(chain["exp"] / "pretrain", tmp_path)
    ft = weights(chain["exp"] / "transfer-ft", tmp_path)
    nt = weights(chain["exp"] / "transfer-nt", tmp_path)
    tower = [k for k in pretrained if k.startswith("dense/tower.")]
    assert tower
    for key in [*tower, "table/item", "table/category"]:
        assert torch.equal(ft[key], pretrained[key]), key
        assert not torch.equal(nt[key], pretrained[key]), key
    # FT's tables trained on afterwards (not frozen).
    finetuned = weights(chain["exp"] / "finetune-ft", tmp_path)
    assert not torch.equal(finetuned["table/item"], pretrained["table/item"])


def test_a_rerun_skips_every_stage(chain: dict) -> None:
    steps = run(chain["study"], "local_cwd", console=io.StringIO())
    assert all(s.skipped for s in steps)


def test_a_failing_stage_stops_the_pipeline_with_its_name(chain: dict) -> None:
    """A stage that fails once running (a row group whose pages are damaged: its footer, which
    the pipeline's checks read before submitting, is intact)."""
    data = chain["root"] / "damaged-data"
    shutil.copytree(chain["root"] / "data", data)
    (part,) = sorted((data / "seq").glob("*.parquet"))[:1]
    raw = bytearray(part.read_bytes())
    start = pq.ParquetFile(part).metadata.row_group(0).column(0).data_page_offset
    raw[start : start + 40] = b"\xff" * 40
    part.write_bytes(bytes(raw))
    study = Study(
        experiment=str(chain["root"] / "broken"),
        data=str(data),
        config=chain["study"].config,
        strategies=("ST",),
    )
    with pytest.raises(PipelineError, match=r"stage pretrain \(L1H16A2-pretrain\) failed") as err:
        run(study, "local_cwd", console=io.StringIO())
    assert f"{part}, row group 0" in str(err.value) and "cannot be read" in str(err.value)
    assert "Traceback" not in str(err.value)


def test_missing_data_is_refused_before_any_job(chain: dict) -> None:
    study = Study(
        experiment=str(chain["root"] / "unsubmitted"),
        data=str(chain["root"] / "missing-data"),
        config=chain["study"].config,
        strategies=("ST",),
    )
    with pytest.raises(PipelineError, match="no such file or directory; no job was submitted"):
        run(study, "local_cwd", console=io.StringIO())
    assert not (chain["root"] / "unsubmitted" / "L1H16A2-pretrain").exists()


def test_evaluate_scores_every_test_sample_on_two_ranks(chain: dict) -> None:
    from torchx.runner import get_runner
    from torchx.specs import AppState

    out = chain["exp"] / "evaluate-st_sf"
    data = chain["root"] / "data" / "ctr_test"
    with get_runner() as runner:
        handle = runner.run_component(
            "components/evaluate.py:evaluate",
            [
                "--model",
                str(chain["exp"] / "finetune-st_sf"),
                "--data",
                str(data),
                "--out",
                str(out),
            ],
            "local_cwd",
        )
        assert runner.wait(handle, wait_interval=1).state == AppState.SUCCEEDED
    import pyarrow.parquet as pq

    predictions = pq.read_table(out / "predictions").to_pydict()
    test = pq.read_table(next(data.glob("*.parquet"))).to_pydict()
    assert len(list(data.glob("*.parquet"))) == 1
    assert sorted(
        zip(predictions["user_id"], predictions["candidate_item"], strict=True)
    ) == sorted(zip(test["user_id"], test["item_id"], strict=True))
    metrics = json.loads((out / "metrics.json").read_text())
    finetune = json.loads((chain["exp"] / "finetune-st_sf" / "stage.json").read_text())
    assert metrics["samples"] == len(test["label"])
    assert metrics["auc"] == pytest.approx(finetune["results"]["valid_auc"], abs=1e-6)
    for key in ("ne", "calibration"):
        assert metrics[key] == pytest.approx(finetune["results"][f"valid_{key}"], rel=1e-5)
    # NE and calibration as their definitions give them from the written predictions
    scores = [min(max(p, 1e-7), 1 - 1e-7) for p in predictions["score"]]
    labels, n = predictions["label"], len(predictions["label"])
    logloss = -sum(
        math.log(p) if y > 0.5 else math.log(1 - p) for p, y in zip(scores, labels, strict=True)
    )
    rate = sum(labels) / n
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert metrics["ne"] == pytest.approx(logloss / n / entropy, rel=1e-4)
    assert metrics["calibration"] == pytest.approx(sum(scores) / sum(labels), rel=1e-4)


def test_a_pipeline_interrupted_between_and_inside_stages_reruns_to_the_same_results(
    chain: dict, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    exp = tmp_path / "exp"
    command = [
        *(sys.executable, "-m", "recsys.cli", "pipeline", "run", "--strategies", "ST&SF"),
        *("--data", str(chain["root"] / "data"), "--experiment", str(exp)),
        *("--config", chain["study"].config, "run.checkpoint_every=1"),
    ]

    def pipeline(faults: str = "") -> subprocess.CompletedProcess:
        env = {**os.environ, "RECSYS_FAULTS": faults}
        return subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )

    stages = exp / "L1H16A2"
    # 1. The pipeline itself is killed between transfer and freeze (after pretrain, retrieve
    # and transfer).
    first = pipeline("stage:after=3")
    assert first.returncode == -9, first.stderr[-2000:]
    assert (stages / "transfer-st" / "DONE").exists() and not (stages / "freeze-st").exists()
    # 2. The rerun skips what is done; finetuning is killed mid-stage (rank 1, step 2).
    second = pipeline("kill:step=2:rank=1")
    assert second.returncode == 1
    assert "stage finetune (L1H16A2-finetune-st_sf) failed" in second.stderr
    assert (stages / "finetune-st_sf" / "checkpoint" / "step-00000001").is_dir()
    # 3. The last rerun resumes finetuning from its checkpoint and finishes.
    third = pipeline()
    assert third.returncode == 0, third.stderr[-2000:]
    assert "5 stages, 4 skipped" in third.stdout
    ours = json.loads((stages / "finetune-st_sf" / "stage.json").read_text())
    theirs = json.loads((chain["exp"] / "finetune-st_sf" / "stage.json").read_text())
    assert ours["results"] == theirs["results"] and ours["steps"] == theirs["steps"]
    mine = weights(stages / "finetune-st_sf", tmp_path)
    reference = weights(chain["exp"] / "finetune-st_sf", tmp_path / "ref")
    assert mine.keys() == reference.keys()
    for key in mine:
        assert torch.equal(mine[key], reference[key]), key
