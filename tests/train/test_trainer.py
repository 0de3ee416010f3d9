"""A run stopped half-way and resumed from its checkpoint ends exactly like an uninterrupted
run, on 2 ranks sharded by TorchRec's planner: weights, optimizer states and metrics,
bitwise."""

from __future__ import annotations

import collections
import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from recsys.checkpoint.manager import export
from recsys.data.protocol import write_split
from recsys.data.stream import ParquetStream, StreamConfig
from recsys.data.synth import SynthConfig, make
from recsys.distributed.env import distributed
from recsys.distributed.launch import run_on_ranks
from recsys.distributed.planning import planned
from recsys.distributed.wrap import shard
from recsys.models.ctr import CTRConfig, CTRModel
from recsys.models.tower import TowerConfig
from recsys.train import trainer as trainer_module
from recsys.train.optim import OptimConfig, attach_sparse_optimizer, dense_optimizer
from recsys.train.trainer import RunConfig, Trainer

pytestmark = pytest.mark.dist

OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, total_steps=8, sparse_lr=0.05)


def run(
    data: str,
    run_dir: str,
    max_steps: int,
    epochs: int,
    checkpoint_every: int = 0,
    log_every: int = 1,
    count: bool = False,
) -> dict:
    with distributed("cpu") as env:
        torch.manual_seed(0)
        model = CTRModel(
            CTRConfig(TowerConfig.from_name("L1H16A2", max_len=64), 60, {"category": 6}),
            sparse_device=torch.device("meta"),
        )
        attach_sparse_optimizer(model, OPTIM)
        # The plan from TorchRec's planner, with the item table kept row-wise.
        plan = planned(model, world_size=env.world_size, sharding_types={"item": ["row_wise"]})
        sharded = shard(model, plan, env)
        dense, schedule = dense_optimizer(sharded, OPTIM)
        stream = ParquetStream(f"{data}/ctr_train", StreamConfig(batch_size=16, max_len=40))
        valid = ParquetStream(f"{data}/ctr_test", StreamConfig(batch_size=32, shuffle=False))
        trainer = Trainer(
            sharded,
            dense,
            schedule,
            StatefulDataLoader(stream, batch_size=None),
            RunConfig(
                epochs=epochs,
                max_steps=max_steps,
                checkpoint_every=checkpoint_every,
                log_every=log_every,
            ),
            OPTIM,
            valid_loader=StatefulDataLoader(valid, batch_size=None),
            run_dir=run_dir,
        )
        if not count:
            return {"results": trainer.train(), "step": trainer.step}
        with waits_counted(trainer) as waits:
            results = trainer.train()
        return {"results": results, "step": trainer.step, "waits": waits}


@contextlib.contextmanager
def waits_counted(trainer: Trainer):
    """Count the all-reduces and the copies of a value to the host (``item``, ``tolist``)
    the training loop itself makes (recsys.train.trainer; TorchRec's input distribution is
    the pipeline's concern), by where they happen: inside a training step or elsewhere."""
    waits: collections.Counter = collections.Counter()
    step = trainer._train_step
    inside = [False]

    def counted(function, name):
        def call(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename == trainer_module.__file__:
                waits[f"{name} in step" if inside[0] else name] += 1
            return function(*args, **kwargs)

        return call

    def train_step(batch):
        inside[0] = True
        try:
            return step(batch)
        finally:
            inside[0] = False

    with contextlib.ExitStack() as stack:
        patch = pytest.MonkeyPatch()
        stack.callback(patch.undo)
        patch.setattr(trainer, "_train_step", train_step)
        patch.setattr(
            torch.distributed, "all_reduce", counted(torch.distributed.all_reduce, "all_reduce")
        )
        patch.setattr(torch.Tensor, "item", counted(torch.Tensor.item, "item"))
        patch.setattr(torch.Tensor, "tolist", counted(torch.Tensor.tolist, "tolist"))
        yield waits


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("data") / "synth"
    result, source = make(SynthConfig(users=150, items=60, categories=6, seed=2))
    write_split(out, result, source, row_group_rows=20)
    return str(out)


def test_resumed_run_equals_uninterrupted_run(data: str, tmp_path: Path) -> None:
    # Logged (and agreed on by the ranks) every second step.
    whole = run_on_ranks(run, data, str(tmp_path / "whole"), 8, 2, 0, 2, world_size=2)
    # The same run, killed after step 3 (mid-epoch) before it could save step 3: its last
    # checkpoint is step 2 and its log already holds step 3. Resumed, it runs to the end.
    run_on_ranks(run, data, str(tmp_path / "split"), 3, 2, 2, 2, world_size=2)
    shutil.rmtree(tmp_path / "split/checkpoint/step-00000003")
    resumed = run_on_ranks(run, data, str(tmp_path / "split"), 8, 2, 0, 2, world_size=2)
    assert whole[0]["step"] == resumed[0]["step"] == 8
    assert resumed[0]["results"] == whole[0]["results"]  # AUC, logloss, gAUC, gap: equal
    a = torch.load(export(tmp_path / "whole/checkpoint/step-00000008", tmp_path / "a.pt"))
    b = torch.load(export(tmp_path / "split/checkpoint/step-00000008", tmp_path / "b.pt"))
    for part in ("model", "fused", "dense"):
        flat_a, flat_b = _flatten(a[part]), _flatten(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key, value in flat_a.items():
            assert torch.equal(value, flat_b[key]), f"{part}: {key}"
    log = [json.loads(line) for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    # Every second step logged once: the resumed run dropped the killed run's record of its
    # last step, 3.
    assert [r["step"] for r in log if r["split"] == "step"] == [2, 4, 6, 8]
    whole_log = [json.loads(x) for x in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in whole_log if r["split"] == "step"] == [
        r["loss"] for r in log if r["split"] == "step"
    ]
    epochs = [r for r in log if r["split"] == "epoch"]
    assert epochs and {"train_auc", "valid_auc", "valid_gauc", "gap_auc"} <= set(epochs[-1])


def _flatten(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}/{key}"))
    elif torch.is_tensor(tree):
        flat[prefix] = tree
    return flat


def test_steps_wait_for_nothing_between_logging_steps(data: str, tmp_path: Path) -> None:
    # 8 steps logged every 4th: the ranks agree before steps 1 and 5 and after step 8, and
    # bring the losses of steps 1-4 and 5-8 to the host in one copy each; no step waits.
    (out,) = run_on_ranks(run, data, str(tmp_path / "run"), 8, 1, 0, 4, True, world_size=1)
    assert out["step"] == 8
    waits = out["waits"]
    assert not [key for key in waits if key.endswith(" in step")], waits
    # The epoch's length and the 3 agreements (max_steps stops the run inside the epoch).
    assert waits["all_reduce"] == 1 + 3, waits
    assert waits["tolist"] == 2 + 3, waits  # the two windows' values, the 3 agreements
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "step"
    ]
    assert steps == [4, 8]


def test_resume_on_another_world_size(data: str, tmp_path: Path) -> None:
    # Saved by 2 ranks, resumed by 1: weights, optimizers and step carry over (DCP
    # reshards); the data cursors cannot, so the epoch restarts (and the log says so).
    run_on_ranks(run, data, str(tmp_path / "run"), 3, 2, world_size=2)
    (resumed,) = run_on_ranks(run, data, str(tmp_path / "run"), 5, 2, world_size=1)
    assert resumed["step"] == 5
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "step"
    ]
    assert steps == [1, 2, 3, 4, 5]


def test_max_steps_on_an_epoch_boundary_still_ends_the_epoch(data: str, tmp_path: Path) -> None:
    # Each epoch lasts as long as the shortest rank's share (known from the footers); stop
    # exactly at the end of the second epoch.
    streams = [
        ParquetStream(f"{data}/ctr_train", StreamConfig(batch_size=16), rank=r, world_size=2)
        for r in (0, 1)
    ]
    lengths = [min(s.batches_in_epoch(epoch) for s in streams) for epoch in (0, 1)]
    (out,) = run_on_ranks(run, data, str(tmp_path / "run"), sum(lengths), 3, world_size=2)[:1]
    assert out["step"] == sum(lengths)
    epochs = [
        json.loads(line)
        for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "epoch"
    ]
    assert [e["epoch"] for e in epochs] == [1, 2]  # the second epoch was evaluated too
    assert [e["step"] for e in epochs] == [lengths[0], sum(lengths)]
    # Validation scores every sample once, whatever the ranks' shares.
    valid_rows = sum(len(b) for b in ParquetStream(f"{data}/ctr_test", StreamConfig()))
    assert all(e["valid_samples"] == valid_rows for e in epochs)
    assert out["results"]["valid_auc"] == epochs[-1]["valid_auc"]
