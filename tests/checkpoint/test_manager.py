"""DCP checkpoints: saved on 2 ranks row-wise, loaded bitwise on 1 rank table-wise; exported
to one file; a broken newest checkpoint falls back to the previous one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec import KeyedJaggedTensor

from recsys.checkpoint.manager import CheckpointError, CheckpointManager, export
from recsys.distributed.env import distributed
from recsys.distributed.launch import RankFailedError, run_on_ranks
from recsys.distributed.planning import manual_plan
from recsys.distributed.shards import local_shards
from recsys.distributed.wrap import shard
from recsys.models.ctr import CTRConfig, CTRModel
from recsys.models.tower import TowerConfig
from recsys.train.optim import OptimConfig, attach_sparse_optimizer, dense_optimizer

pytestmark = pytest.mark.dist

CONFIG = CTRConfig(TowerConfig.from_name("L1H16A2", max_len=16), 40, {"category": 6})
OPTIM = OptimConfig(warmup_steps=1, total_steps=10, sparse_lr=0.1)


def build(sharding: str, env):
    torch.manual_seed(0)
    model = CTRModel(CONFIG, sparse_device=torch.device("meta"))
    attach_sparse_optimizer(model, OPTIM)
    plan = manual_plan(model, {"item": sharding, "category": sharding}, world_size=env.world_size)
    sharded = shard(model, plan, env)
    dense, schedule = dense_optimizer(sharded, OPTIM)
    return sharded, dense, schedule


def batch(seed: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (4,), generator=g)
    n = int(lengths.sum())
    ones = torch.ones(4, dtype=torch.long)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["history_item", "candidate_item", "history_category", "candidate_category"],
        values=torch.cat(
            [
                torch.randint(0, 40, (n + 4,), generator=g),
                torch.randint(0, 6, (n + 4,), generator=g),
            ]
        ),
        lengths=torch.cat([lengths, ones, lengths, ones]),
    ), torch.randint(0, 2, (4,), generator=g).float()


def state(sharded, dense) -> dict:
    return {"model": sharded, "fused": sharded.fused_optimizer, "dense": dense}


def train_and_save(directory: str) -> list[str]:
    with distributed("cpu") as env:
        sharded, dense, schedule = build("row_wise", env)
        manager = CheckpointManager(directory, keep=2)
        for step in range(1, 4):
            out = sharded(*batch(10 * step + env.rank))
            dense.zero_grad()
            out.loss.backward()
            dense.step()
            schedule.step()
            manager.save(step, state(sharded, dense))
        return [p.name for p in manager.complete()]


def load_elsewhere(directory: str) -> dict:
    """1 rank, table-wise: load the latest checkpoint, return what it holds."""
    with distributed("cpu") as env:
        sharded, dense, _ = build("table_wise", env)
        dense.init_state()  # AdamW's state is lazy: make room for the saved one
        loaded = CheckpointManager(directory).load(state(sharded, dense))
        tables = {s.table: s.tensor.clone() for s in local_shards(sharded)}
        params = {n: p.detach().clone() for n, p in sharded.named_parameters() if "sparse" not in n}
        fused = {
            k: {
                n: (v.local_shards()[0].tensor.clone() if hasattr(v, "local_shards") else v)
                for n, v in s.items()
            }
            for k, s in sharded.fused_optimizer.state_dict()["state"].items()
        }
        adam = {
            k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
            for k, s in dense.state_dict()["state"].items()
        }
        return {
            "path": loaded.name,
            "tables": tables,
            "params": params,
            "fused": fused,
            "adam": adam,
        }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("run") / "checkpoint"
    kept = run_on_ranks(train_and_save, str(directory), world_size=2)
    assert kept[0] == ["step-00000002", "step-00000003"]  # keep=2 pruned step 1
    return directory


def test_two_rank_row_wise_loads_bitwise_on_one_rank_table_wise(
    saved: Path, tmp_path: Path
) -> None:
    (loaded,) = run_on_ranks(load_elsewhere, str(saved), world_size=1)
    assert loaded["path"] == "step-00000003"
    plain = torch.load(export(saved / "step-00000003", tmp_path / "plain.pt"))
    model = plain["model"]
    assert torch.equal(loaded["tables"]["item"], model["sparse.sequence.embeddings.item.weight"])
    assert torch.equal(
        loaded["tables"]["category"], model["sparse.sequence.embeddings.category.weight"]
    )
    for name, value in loaded["params"].items():
        assert torch.equal(value, model[name]), name
    # Optimizer states came back too: the tables' row-wise Adagrad and the dense AdamW.
    saved_fused = plain["fused"]["state"]
    assert loaded["fused"] and all(loaded["fused"].values())  # states exist and came back
    for key, entries in loaded["fused"].items():
        for name, value in entries.items():
            assert torch.equal(value.flatten(), saved_fused[key][name].flatten()), name
    assert loaded["adam"] and all(
        torch.equal(v, plain["dense"]["state"][k][n])
        for k, entries in loaded["adam"].items()
        for n, v in entries.items()
    )


def test_broken_newest_checkpoint_falls_back(saved: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "checkpoint"
    shutil.copytree(saved, copy)
    newest = copy / "step-00000003"
    data_file = next(p for p in sorted(newest.iterdir()) if p.suffix == ".distcp")
    data_file.write_bytes(data_file.read_bytes()[:40])  # truncated
    (loaded,) = run_on_ranks(load_elsewhere, str(copy), world_size=1)
    assert loaded["path"] == "step-00000002"
    # The unreadable newer checkpoint is set aside: no longer "latest", never pruned for.
    assert (copy / ".step-00000003.broken").is_dir() and not newest.exists()
    newest = copy / ".step-00000003.broken"
    data_file = newest / data_file.name
    with pytest.raises(
        RankFailedError,
        match=rf"CheckpointError: {data_file}: truncated \(40 "
        r"bytes, the checkpoint's metadata needs \d+\)",
    ):
        run_on_ranks(run_explicit, newest, world_size=1, quiet=True)


def run_explicit(path: Path) -> None:
    with distributed("cpu") as env:
        sharded, dense, _ = build("row_wise", env)
        dense.init_state()
        CheckpointManager(path.parent).load(state(sharded, dense), path)


def test_incomplete_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "step-00000001").mkdir()
    with pytest.raises(CheckpointError, match=r"step-00000001: not a complete checkpoint"):
        CheckpointManager(tmp_path).load({}, tmp_path / "step-00000001")
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from"):
        CheckpointManager(tmp_path / "nothing").load({})


def test_the_checkpoint_command_lists_and_exports_full_tables(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from recsys.cli import main

    # The run's checkpoint directory stands for its latest checkpoint.
    assert main(["checkpoint", "ls", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(saved / "step-00000003"))
    # A row-wise table saved by 2 ranks is listed whole: 40 rows × 16.
    assert "model.sparse.sequence.embeddings.item.weight" in out and "40×16  float32" in out
    assert main(["checkpoint", "export", str(saved), str(tmp_path / "one.pt")]) == 0
    plain = torch.load(tmp_path / "one.pt", weights_only=False)
    assert plain["model"]["sparse.sequence.embeddings.item.weight"].shape == (40, 16)
    assert main(["checkpoint", "ls", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such file or directory" in capsys.readouterr().err
