"""A NaN loss is never averaged away: it stops every rank before anything of its step is
saved, or, when asked, its step makes no update and is counted; metrics show NaN inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recsys.checkpoint.manager import export
from recsys.distributed.launch import RankFailedError, run_on_ranks
from recsys.stages import pretrain
from recsys.stages.common import run_stage
from recsys.train.metrics import CTRMetrics, PretrainMetrics
from recsys.train.trainer import NonFiniteValue, RunConfig, Trainer

TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, synth_split) -> Path:
    out = tmp_path_factory.mktemp("nonfinite") / "data"
    config = {"items": 60, "categories": 3, "min_events": 6, "max_events": 20, "seed": 2}
    return synth_split(out, row_group_rows=16, users=120, **config)


def checkpoints(stage: Path) -> list[str]:
    return sorted(p.name for p in (stage / "checkpoint").iterdir())


def test_a_nan_loss_stops_the_stage_before_its_step_is_saved(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("RECSYS_FAULTS", "nonfinite:step=3")
    out = tmp_path / "p"
    args = ["--out", str(out), *TINY, f"data.train={data / 'seq'}", "run.checkpoint_every=1"]
    assert run_stage(pretrain.main, args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert lines == [
        "error (rank 0): step 3: the loss is nan on rank 0 (run.nonfinite=stop): stopped "
        f"without saving this step, the latest checkpoint is {out}/checkpoint/step-00000002; "
        "run.nonfinite=skip skips such steps instead"
    ]
    assert checkpoints(out) == ["step-00000001", "step-00000002"]
    assert not (out / "DONE").exists() and not (out / "stage.json").exists()
    # The fault fired once: run again, the stage resumes from step 2 and finishes.
    assert pretrain.main(args)["steps"] == 8


def test_skip_leaves_the_weights_of_a_nan_step_untouched_and_counts_it(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_FAULTS", "nonfinite:step=4")
    out = tmp_path / "p"
    every = ["run.checkpoint_every=1", "run.keep=10", "run.nonfinite=skip"]
    record = pretrain.main(["--out", str(out), *TINY, f"data.train={data / 'seq'}", *every])
    assert record["steps"] == 8 and record["results"]["train_nonfinite_steps"] == 1
    assert json.loads((out / "stage.json").read_text())["results"]["train_nonfinite_steps"] == 1
    before, skipped, after = (
        torch.load(export(out / f"checkpoint/step-{s:08d}", tmp_path / f"{s}.pt"))["model"]
        for s in (3, 4, 5)
    )
    assert "sparse.sequence.embeddings.item.weight" in before
    for name, value in before.items():  # tables (updated inside backward) and dense part
        assert torch.equal(value, skipped[name]), name
    assert not torch.equal(before["sparse.sequence.embeddings.item.weight"],
                           after["sparse.sequence.embeddings.item.weight"])  # fmt: skip


def test_skip_of_a_nan_gradient_norm_leaves_the_dense_part_untouched(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = Trainer._grad_norm

    def nan_at_step_4(self: Trainer) -> torch.Tensor:
        norm = measured(self)
        return torch.tensor(math.nan) if self.step + 1 == 4 else norm

    monkeypatch.setattr(Trainer, "_grad_norm", nan_at_step_4)
    out = tmp_path / "p"
    every = ["run.checkpoint_every=1", "run.keep=10", "run.nonfinite=skip"]
    record = pretrain.main(["--out", str(out), *TINY, f"data.train={data / 'seq'}", *every])
    assert record["results"]["train_nonfinite_steps"] == 1
    before, skipped = (
        torch.load(export(out / f"checkpoint/step-{s:08d}", tmp_path / f"{s}.pt"))["model"]
        for s in (3, 4)
    )
    for name, value in before.items():  # the loss was finite: backward updated the tables
        assert torch.equal(value, skipped[name]) == (".embeddings." not in name), name


def stop_on_rank(data: str, out: str) -> str:
    """A pretrain stage on this rank whose fault is rank 1's; the error it stopped with."""
    from recsys.train.trainer import NonFinite

    try:
        pretrain.main(["--out", out, *TINY, f"data.train={data}/seq", "data.batch_size=8"])
    except NonFinite as err:
        return str(err)
    return "finished"


@pytest.mark.dist
@pytest.mark.slow
def test_every_rank_stops_naming_the_rank_that_saw_the_nan(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_FAULTS", "nonfinite:step=2:rank=1")
    try:
        errors = run_on_ranks(stop_on_rank, str(data), str(tmp_path / "p"), world_size=2)
    except RankFailedError as err:  # a rank that hung or failed otherwise
        pytest.fail(str(err))
    # Rank 0's gradients are NaN too (averaged with rank 1's): the loss names the source.
    assert all(e.startswith("step 2: the loss is nan on rank 1 (") for e in errors), errors


def test_the_ranks_agree_on_the_loss_first_then_the_lowest_rank() -> None:
    seen = [
        NonFiniteValue("gradient norm", math.nan, 0),
        NonFiniteValue("loss", math.inf, 3),
        NonFiniteValue("loss", -math.inf, 2),
        NonFiniteValue("loss", math.inf, 1),
    ]
    agreed = NonFiniteValue.decode(max(v.code(4) for v in seen), 4)
    assert str(agreed) == "the loss is -inf on rank 2"
    assert NonFiniteValue.decode(0, 4) is None
    with pytest.raises(ValueError, match="nonfinite: must be stop or skip, got 'ignore'"):
        RunConfig(nonfinite="ignore")


def test_a_nan_logit_or_loss_makes_the_metrics_nan() -> None:
    ctr = CTRMetrics()
    ctr.update(torch.tensor([0.5, float("nan"), -1.0, 2.0]), torch.tensor([1, 0, 0, 1]),
               torch.tensor([1, 1, 2, 2]))  # fmt: skip
    results = ctr.compute()
    assert all(math.isnan(results[k]) for k in ("auc", "logloss", "gauc"))
    assert results["nonfinite_logits"] == 1 and results["samples"] == 4
    ctr.reset()
    ctr.update(torch.tensor([float("inf"), 0.0]), torch.tensor([1, 0]), torch.tensor([1, 1]))
    assert math.isnan(ctr.compute()["auc"])  # sigmoid(inf) = 1 would look like a score
    pretrain_metrics = PretrainMetrics()
    for loss in (1.0, float("nan")):
        pretrain_metrics.update(torch.tensor(loss), torch.tensor(1), torch.tensor(2))
    assert math.isnan(pretrain_metrics.compute()["loss"])
