"""Stages run in this process (a world of one): resume, refusals and errors that name things."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recsys.checkpoint.manager import CheckpointError, export
from recsys.data.protocol import write_split
from recsys.data.synth import SynthConfig, make
from recsys.stages import finetune, freeze, pretrain, transfer
from recsys.stages.common import StageError

TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stages") / "data"
    result, source = make(
        SynthConfig(users=120, items=60, categories=3, min_events=6, max_events=20, seed=2)
    )
    write_split(out, result, source, row_group_rows=16)
    return out


def table(stage: Path, name: str, tmp: Path) -> torch.Tensor:
    return torch.load(export(stage / "weights", tmp / f"{stage.name}.pt"))[name]


def test_an_interrupted_stage_resumes_to_the_uninterrupted_result(
    data: Path, tmp_path: Path
) -> None:
    common = [*TINY, f"data.train={data / 'seq'}", "optim.total_steps=50", "optim.warmup_steps=2"]
    pretrain.main(["--out", str(tmp_path / "whole"), *common, "run.max_steps=8"])
    # The same run stopped after 4 steps (its checkpoint is the last thing it wrote) ...
    cut = tmp_path / "cut"
    pretrain.main(["--out", str(cut), *common, "run.max_steps=4"])
    for leftover in ("DONE", "stage.json"):
        (cut / leftover).unlink()
    # ... and started again: it continues from step 4.
    record = pretrain.main(["--out", str(cut), *common, "run.max_steps=8"])
    assert record["steps"] == 8
    for name in ("table/item", "dense/tower.blocks.0.ffn.w1.weight"):
        assert torch.equal(
            table(cut, name, tmp_path / "a"), table(tmp_path / "whole", name, tmp_path / "b")
        )


def test_a_finished_stage_is_not_overwritten_without_force(data: Path, tmp_path: Path) -> None:
    args = ["--out", str(tmp_path / "p"), *TINY, f"data.train={data / 'seq'}", "run.max_steps=1"]
    pretrain.main(args)
    with pytest.raises(StageError, match="has finished already \\(DONE\\); pass --force"):
        pretrain.main(args)
    assert pretrain.main([*args, "--force"])["steps"] == 1


@pytest.fixture(scope="module")
def pretrained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "pretrain"
    pretrain.main(["--out", str(out), *TINY, f"data.train={data / 'seq'}", "run.max_steps=2"])
    return out


def test_transfer_names_every_weight_whose_shape_differs_in_one_line(
    data: Path, pretrained: Path, tmp_path: Path
) -> None:
    args = ["--strategy", "FT", "--pretrained", str(pretrained), "--out", str(tmp_path / "t")]
    ctr = f"data.train={data / 'ctr_train'}"
    with pytest.raises(CheckpointError) as err:
        transfer.main([*args, *TINY, ctr, "model.size=L1H32A2"])
    message = str(err.value)
    assert "table/item: saved with shape [62, 16], the model has [62, 32]" in message
    assert "dense/tower.blocks.0.attention.qkv.weight" in message and "\n" not in message
    assert "another model section (size, arch, max_len)" in message


def test_finetune_fails_loudly_when_a_frozen_table_changed(
    data: Path, pretrained: Path, tmp_path: Path
) -> None:
    ctr = [*TINY, f"data.train={data / 'ctr_train'}", "run.max_steps=2"]
    st, frozen = tmp_path / "st", tmp_path / "frozen"
    transfer.main(["--strategy", "ST", "--pretrained", str(pretrained), "--out", str(st), *ctr])
    freeze.main(["--sparse", "--init", str(st), "--out", str(frozen), *ctr])
    # Untouched, finetuning keeps the digests.
    record = finetune.main(["--init", str(frozen), "--out", str(tmp_path / "ok"), *ctr])
    assert record["digests"] == json.loads((frozen / "stage.json").read_text())["digests"]
    # A record whose digest does not match the table stands for a table that changed.
    stage = json.loads((frozen / "stage.json").read_text())
    stage["digests"]["category"] = "0" * 16
    (frozen / "stage.json").write_text(json.dumps(stage))
    with pytest.raises(StageError, match=r"frozen tables \['category'\] changed"):
        finetune.main(["--init", str(frozen), "--out", str(tmp_path / "bad"), *ctr])


@pytest.mark.parametrize("arch", ["deepfm", "din"])
def test_baselines_take_pretrained_tables_and_keep_them_frozen(
    arch: str, data: Path, pretrained: Path, tmp_path: Path
) -> None:
    ctr = [*TINY, f"data.train={data / 'ctr_train'}", "run.max_steps=2", f"model.arch={arch}"]
    st, frozen, tuned = tmp_path / "st", tmp_path / "frozen", tmp_path / "tuned"
    transfer.main(["--strategy", "ST", "--pretrained", str(pretrained), "--out", str(st), *ctr])
    freeze.main(["--sparse", "--init", str(st), "--out", str(frozen), *ctr])
    record = finetune.main(["--init", str(frozen), "--out", str(tuned), *ctr])
    assert record["strategy"] == "ST&SF" and record["config"]["model"]["arch"] == arch
    for name in ("table/item", "table/category"):
        assert torch.equal(
            table(tuned, name, tmp_path / "a"), table(pretrained, name, tmp_path / "b")
        )


def test_the_pipeline_plans_baselines_beside_the_ranker(tmp_path: Path) -> None:
    from recsys.pipelines.gpsd import Study, plan

    study = Study(
        experiment=str(tmp_path),
        data="d",
        strategies=("NT", "ST&SF"),
        baselines=("din",),
        sizes=("L1H16A2",),
    )
    names = [s.out.name for s in plan(study)]
    assert names == [
        "pretrain",
        "retrieve-ctr_test",
        "transfer-nt",
        "transfer-st",
        "freeze-st",
        "finetune-nt",
        "finetune-st_sf",
        "transfer-din-nt",
        "transfer-din-st",
        "freeze-din-st",
        "finetune-din-nt",
        "finetune-din-st_sf",
    ]
    din = [s for s in plan(study) if "din" in s.out.name]
    assert all("model.arch=din" in s.overrides for s in din)


def test_a_corrupt_row_group_stops_the_stage_unless_skipping_is_asked_for(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    import pyarrow.parquet as pq

    from recsys.stages.common import run_stage

    seq = tmp_path / "seq"
    shutil.copytree(data / "seq", seq)
    shutil.copytree(data / "vocab", tmp_path / "vocab")
    part = next(seq.glob("*.parquet"))
    meta = pq.ParquetFile(part).metadata
    rows = meta.row_group(2).num_rows
    start = meta.row_group(2).column(1).data_page_offset
    raw = bytearray(part.read_bytes())
    raw[start : start + 40] = b"\xff" * 40  # the footer stays intact, the pages do not
    part.write_bytes(bytes(raw))
    args = ["--out", str(tmp_path / "p"), *TINY, f"data.train={seq}", "run.epochs=1"]
    assert run_stage(pretrain.main, args) == 2
    assert f"{part.name}, row group 2: cannot be read" in capsys.readouterr().err
    record = pretrain.main(
        [*args[:1], str(tmp_path / "q"), *args[2:], "data.skip_bad_row_groups=true"]
    )
    assert record["results"]["train_skipped_rows"] == rows
