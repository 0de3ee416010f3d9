"""A numerical check that sharded TorchRec embeddings work on this host.

This module owns one rank-side check, run on every rank of a job: build a small
``EmbeddingCollection`` on the meta device, shard it with ``DistributedModelParallel`` under a
manual plan (fused kernel, SGD applied in backward), give it the weights of an unsharded
reference, then compare the sharded forward with the reference's and the weights after one
backward step with a hand-computed SGD update. ``recsys doctor`` runs it on 2 gloo ranks; the
tests run it for every sharding type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from recsys.distributed.env import DistEnv, distributed
from recsys.distributed.planning import manual_plan
from recsys.distributed.shards import load_full_tables, local_shards
from recsys.distributed.wrap import shard

LEARNING_RATE = 0.5
TABLES = (
    # One table serving two features, as the item table serves history and candidate.
    # (A table may not be named "items": EmbeddingCollection keeps tables in a ModuleDict.)
    EmbeddingConfig(
        name="item", embedding_dim=8, num_embeddings=50, feature_names=["history", "candidate"]
    ),
    EmbeddingConfig(
        name="category", embedding_dim=8, num_embeddings=12, feature_names=["history_category"]
    ),
)


@dataclass
class CheckResult:
    """What one rank measured; all errors are max absolute differences."""

    rank: int
    world_size: int
    sharding_type: str
    forward_error: float
    """Sharded output against the unsharded reference on this rank's batch."""
    update_error: float
    """This rank's shards after one step against the reference SGD update."""
    rows_updated: int
    """Rows of this rank's shards that the step changed."""
    local_shards: int


class _Model(nn.Module):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.embeddings = EmbeddingCollection(tables=list(TABLES), device=device)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return {name: jt.values() for name, jt in self.embeddings(features).items()}


def _batch(seed: int) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(seed)
    keys, values, lengths = [], [], []
    for table in TABLES:
        for feature in table.feature_names:
            n = torch.randint(1, 5, (4,), generator=generator)
            keys.append(feature)
            lengths.append(n)
            values.append(
                torch.randint(0, table.num_embeddings, (int(n.sum()),), generator=generator)
            )
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
    )


def _loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # Squared values, so that the gradient depends on the weights and a wrong row shows.
    return sum(values.square().sum() for values in outputs.values())


def sharded_embedding_check(*sharding_types: str) -> list[dict]:
    """Run the check on this rank for each sharding type, inside one launched job.

    Returns one :class:`CheckResult` (as a dict) per sharding type, in order.
    """
    with distributed("cpu") as env:
        return [asdict(_check(env, kind)) for kind in sharding_types]


def _check(env: DistEnv, sharding_type: str) -> CheckResult:
    torch.manual_seed(0)  # same reference weights on every rank
    reference = _Model(torch.device("cpu"))

    model = _Model(torch.device("meta"))
    apply_optimizer_in_backward(
        torch.optim.SGD, model.embeddings.parameters(), {"lr": LEARNING_RATE}
    )
    plan = manual_plan(
        model,
        {t.name: sharding_type for t in TABLES},
        world_size=env.world_size,
        local_world_size=env.local_world_size,
        device_type="cpu",
    )
    sharded = shard(model, plan, env)
    full = {t.name: reference.embeddings.embeddings[t.name].weight.detach().clone() for t in TABLES}
    load_full_tables(sharded, full)

    batch = _batch(seed=1000 + env.rank)
    out = sharded(batch)
    expected = reference(batch)
    forward_error = max((out[k] - expected[k]).abs().max().item() for k in expected)

    _loss(out).backward()
    _loss(expected).backward()
    updated = {}
    for t in TABLES:
        grad = reference.embeddings.embeddings[t.name].weight.grad.clone()
        dist.all_reduce(grad)  # every rank's batch contributes to the shared table
        # TorchRec divides sparse gradients by the world size (its default gradient
        # division), so that they average over ranks as DDP's dense gradients do.
        updated[t.name] = full[t.name] - LEARNING_RATE * grad / env.world_size
    update_error, rows_updated = 0.0, 0
    shards = local_shards(sharded)
    for s in shards:
        expected, before = updated[s.table][s.rows, s.cols], full[s.table][s.rows, s.cols]
        update_error = max(update_error, (s.tensor - expected).abs().max().item())
        rows_updated += int((s.tensor != before).any(dim=1).sum())
    return CheckResult(
        env.rank,
        env.world_size,
        sharding_type,
        forward_error,
        update_error,
        rows_updated,
        len(shards),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m recsys.distributed.selfcheck [SHARDING_TYPE ...]``: run on 2 ranks, print JSON.

    Exit code 0 only when every rank's forward and update match the reference exactly.
    """
    import argparse
    import json

    from recsys.distributed.launch import run_on_ranks
    from recsys.distributed.planning import SHARDING_TYPES

    parser = argparse.ArgumentParser(prog="python -m recsys.distributed.selfcheck")
    parser.add_argument(
        "sharding_types",
        nargs="*",
        default=["row_wise"],
        choices=SHARDING_TYPES,
        metavar="SHARDING_TYPE",
    )
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args(argv)
    per_rank = run_on_ranks(
        sharded_embedding_check, *args.sharding_types, world_size=args.world_size, quiet=True
    )
    results = [result for rank_results in per_rank for result in rank_results]
    print(json.dumps(results))
    return 0 if all(passed(r) for r in results) else 1


def passed(result: dict) -> bool:
    """Whether one rank's result is exact and the step really changed some rows."""
    return (
        result["forward_error"] == 0.0
        and result["update_error"] < 1e-6
        and result["rows_updated"] > 0
    )


if __name__ == "__main__":
    raise SystemExit(main())
