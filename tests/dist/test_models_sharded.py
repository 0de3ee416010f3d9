"""The GPSD models sharded on 2 gloo ranks equal unsharded references with the same weights:
forward outputs, dense gradients (DDP-averaged), sparse updates (fused SGD in backward), and
a frozen table stays bitwise unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torchrec import KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.distributed.env import distributed
from recsys.distributed.launch import run_on_ranks
from recsys.distributed.planning import SHARDING_TYPES, manual_plan
from recsys.distributed.shards import load_full_tables, local_shards
from recsys.distributed.wrap import shard
from recsys.models.baselines import DIN, BaselineConfig, DeepFM
from recsys.models.ctr import CTRConfig, CTRModel
from recsys.models.generative import GenerativeConfig, GenerativeModel
from recsys.models.sparse import SparseArch, SparseConfig, TableSpec
from recsys.models.tower import TowerConfig

pytestmark = pytest.mark.dist

ITEMS, CATEGORIES, LR = 40, 6, 0.5
TOWER = TowerConfig.from_name("L1H16A2", max_len=16)


def ctr_batch(seed: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8, (4,), generator=g)
    n = int(lengths.sum())
    ones = torch.ones(4, dtype=torch.long)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["history_item", "candidate_item", "history_category", "candidate_category"],
        values=torch.cat([torch.randint(0, ITEMS, (n + 4,), generator=g),
                          torch.randint(0, CATEGORIES, (n + 4,), generator=g)]),
        lengths=torch.cat([lengths, ones, lengths, ones]),
    )
    return features, torch.randint(0, 2, (4,), generator=g).float()


def seq_batch(seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (3,), generator=g)
    n = int(lengths.sum())
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item", "category"],
        values=torch.cat([torch.randint(0, ITEMS, (n,), generator=g),
                          torch.randint(0, CATEGORIES, (n,), generator=g)]),
        lengths=torch.cat([lengths, lengths]))


def _shard(model: torch.nn.Module, reference: torch.nn.Module, sharding_type: str, env
           ) -> DistributedModelParallel:
    trainable = [p for p in model.sparse.parameters() if p.requires_grad]
    apply_optimizer_in_backward(torch.optim.SGD, trainable, {"lr": LR})
    plan = manual_plan(model, {"item": sharding_type, "category": sharding_type},
                       world_size=env.world_size)
    sharded = shard(model, plan, env)
    tables = {name: w.detach().clone() for name, w in _full_tables(reference).items()}
    load_full_tables(sharded, tables)
    return sharded


def _full_tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name.split(".")[-2]: p for name, p in model.sparse.named_parameters()}


def _dense(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.named_parameters() if not k.startswith("sparse.")}


def ctr_check(sharding_type: str, env) -> dict:
    torch.manual_seed(0)
    config = CTRConfig(TOWER, ITEMS, {"category": CATEGORIES}, frozen=("category",))
    reference = CTRModel(config)
    model = CTRModel(config, sparse_device=torch.device("meta"))
    model.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("sparse.")},
        strict=False)
    sharded = _shard(model, reference, sharding_type, env)
    before = {name: w.detach().clone() for name, w in _full_tables(reference).items()}

    features, labels = ctr_batch(100 + env.rank)
    out = sharded(features, labels)
    expected = reference(features, labels)
    forward_error = (out.logits - expected.logits).abs().max().item()

    out.loss.backward()
    expected.loss.backward()
    grad_error = 0.0
    dense = _dense(sharded.module)
    for name, p in _dense(reference).items():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        grad_error = max(grad_error, (dense[name].grad - grad / env.world_size).abs().max().item())
    item_grad = _full_tables(reference)["item"].grad.clone()
    dist.all_reduce(item_grad)
    updated = before["item"] - LR * item_grad / env.world_size
    update_error, frozen_changed, rows_updated = 0.0, False, 0
    for shard in local_shards(sharded):
        old = before[shard.table][shard.rows, shard.cols]
        if shard.table == "category":
            frozen_changed |= not torch.equal(shard.tensor, old)
        else:
            update_error = max(update_error, (shard.tensor - updated[shard.rows, shard.cols])
                               .abs().max().item())
            rows_updated += int((shard.tensor != old).any(1).sum())
    return {"forward_error": forward_error, "grad_error": grad_error,
            "update_error": update_error, "rows_updated": rows_updated,
            "frozen_changed": frozen_changed,
            "tower_grads": all(p.grad is not None for p in sharded.module.tower.parameters())}


def generative_check(sharding_type: str, env) -> dict:
    """Inputs, targets and negatives share the item table: its update sums all three."""
    torch.manual_seed(0)
    config = GenerativeConfig(TOWER, ITEMS, {"category": CATEGORIES}, negatives=8)
    reference = GenerativeModel(config)
    model = GenerativeModel(config, sparse_device=torch.device("meta"))
    model.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("sparse.")},
        strict=False)
    sharded = _shard(model, reference, sharding_type, env)
    before = _full_tables(reference)["item"].detach().clone()
    features = seq_batch(200 + env.rank)
    torch.manual_seed(7 + env.rank)  # the same negatives for both
    out = sharded(features)
    torch.manual_seed(7 + env.rank)
    expected = reference(features)
    out.loss.backward()
    expected.loss.backward()
    grad = _full_tables(reference)["item"].grad.clone()
    dist.all_reduce(grad)
    updated = before - LR * grad / env.world_size
    update_error = max([0.0] + [(s.tensor - updated[s.rows, s.cols]).abs().max().item()
                                for s in local_shards(sharded) if s.table == "item"])
    return {"loss_error": abs(out.loss.item() - expected.loss.item()),
            "hits_equal": int(out.hits) == int(expected.hits),
            "update_error": update_error,
            "tower_grads": all(p.grad is not None for p in sharded.module.tower.parameters())}


def baseline_check(env) -> dict:
    """DeepFM and DIN, and a pooled (EmbeddingBagCollection) table, sharded row-wise."""
    errors = {}
    for name, cls in (("deepfm", DeepFM), ("din", DIN)):
        torch.manual_seed(0)
        config = BaselineConfig(ITEMS, {"category": CATEGORIES}, dim=8, hidden=(16,))
        reference = cls(config)
        model = cls(config, sparse_device=torch.device("meta"))
        model.load_state_dict(
            {k: v for k, v in reference.state_dict().items() if not k.startswith("sparse.")},
            strict=False)
        sharded = _shard(model, reference, "row_wise", env)
        features, labels = ctr_batch(300 + env.rank)
        errors[name] = (sharded(features, labels).logits
                        - reference(features, labels).logits).abs().max().item()
    torch.manual_seed(0)
    pooled = SparseConfig((TableSpec("user", 20, 8, ("user",), pooling="sum"),))
    reference, model = Pooled(pooled), Pooled(pooled, torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, list(model.sparse.parameters()), {"lr": LR})
    plan = manual_plan(model, {"user": "row_wise"}, world_size=env.world_size)
    sharded = shard(model, plan, env)
    load_full_tables(sharded, {"user": reference.sparse.pooled.embedding_bags["user"].weight
                               .detach().clone()})
    users = KeyedJaggedTensor.from_lengths_sync(
        keys=["user"], values=torch.tensor([1, 5, 5, 19, 0]), lengths=torch.tensor([2, 1, 2]))
    errors["pooled"] = (sharded(users) - reference(users)).abs().max().item()
    return errors


class Pooled(torch.nn.Module):
    def __init__(self, config: SparseConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.sparse = SparseArch(config, device)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.sparse(features)[1]["user"]


def optimizer_state_check(env) -> dict:
    """With row-wise Adagrad fused into backward, only trainable tables get its state."""
    model = CTRModel(CTRConfig(TOWER, ITEMS, {"category": CATEGORIES}, frozen=("category",)),
                     sparse_device=torch.device("meta"))
    trainable = [p for p in model.sparse.parameters() if p.requires_grad]
    apply_optimizer_in_backward(RowWiseAdagrad, trainable, {"lr": 0.1})
    plan = manual_plan(model, {"item": "row_wise", "category": "row_wise"},
                       world_size=env.world_size)
    sharded = shard(model, plan, env)
    state = sharded.fused_optimizer.state_dict()["state"]
    return {name.split(".")[-2]: sorted(entries) for name, entries in state.items()}


def all_checks() -> dict:
    with distributed("cpu") as env:
        results = {kind: ctr_check(kind, env) for kind in SHARDING_TYPES}
        results["generative"] = {kind: generative_check(kind, env) for kind in SHARDING_TYPES}
        results["baselines"] = baseline_check(env)
        results["optimizer_state"] = optimizer_state_check(env)
        return results


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_on_ranks(all_checks, world_size=2)


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_ctr_model_sharded_equals_reference(results: list[dict], sharding_type: str) -> None:
    for rank in results:
        r = rank[sharding_type]
        assert r["forward_error"] < 1e-5, r
        assert r["grad_error"] < 1e-5, r
        assert r["tower_grads"], r
        assert r["update_error"] < 1e-5, r
    # Table-wise, one rank may hold only the frozen table: count updated rows over the job.
    assert sum(rank[sharding_type]["rows_updated"] for rank in results) > 0


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_frozen_table_stays_bitwise_equal(results: list[dict], sharding_type: str) -> None:
    assert not any(rank[sharding_type]["frozen_changed"] for rank in results)


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_generative_model_sharded_equals_reference(results: list[dict],
                                                   sharding_type: str) -> None:
    for rank in results:
        r = rank["generative"][sharding_type]
        assert r["loss_error"] < 1e-5 and r["hits_equal"] and r["tower_grads"], r
        assert r["update_error"] < 1e-5, r


def test_baselines_and_pooled_tables_sharded_equal_reference(results: list[dict]) -> None:
    for rank in results:
        assert all(error < 1e-5 for error in rank["baselines"].values()), rank["baselines"]


def test_frozen_table_has_no_optimizer_state(results: list[dict]) -> None:
    for rank in results:
        assert rank["optimizer_state"] == {"item": ["item.momentum1"], "category": []}
