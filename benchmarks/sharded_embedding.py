"""Throughput of a sharded TorchRec EmbeddingCollection step against plain torch, same run.

One step = lookup of a batch of id sequences, a loss over the looked-up vectors, backward, and
the optimizer update (row-wise Adagrad fused into backward for TorchRec; ``torch.optim.Adagrad``
on a sparse ``nn.Embedding`` for the baseline). Three set-ups share the global batch:

- baseline: one process, ``nn.Embedding(sparse=True)``, all cores;
- torchrec 1 rank: ``DistributedModelParallel`` on a world of one (kernel cost, no comms);
- torchrec 2 ranks: 2 gloo processes, the table row-wise sharded (kernel + all-to-all).

    python benchmarks/sharded_embedding.py
    python benchmarks/sharded_embedding.py --rows 1000000 --dim 128 --batch 1024 --steps 30

Prints samples/s for each and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch
from common import print_rates, seconds_per_step, slowest_rank
from torch import nn


@dataclass(frozen=True)
class Setting:
    rows: int
    dim: int
    batch: int
    """Global batch: sequences per step across all ranks."""
    seq_len: int
    steps: int
    warmup: int


def _ids(setting: Setting, batch: int, step: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step * 1000 + rank)
    return torch.randint(0, setting.rows, (batch * setting.seq_len,), generator=generator)


def baseline(setting: Setting) -> float:
    """Seconds per step of a plain sparse nn.Embedding with Adagrad."""
    torch.set_num_threads(os.cpu_count() or 1)
    table = nn.Embedding(setting.rows, setting.dim, sparse=True)
    optimizer = torch.optim.Adagrad(table.parameters(), lr=0.01)

    def step(i: int) -> None:
        optimizer.zero_grad()
        table(_ids(setting, setting.batch, i, 0)).square().sum().backward()
        optimizer.step()

    return seconds_per_step(step, setting.warmup, setting.steps)


class _Lookup(nn.Module):
    def __init__(self, sparse: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse

    def forward(self, features) -> torch.Tensor:
        return self.sparse(features)["history"].values()


def torchrec_worker(setting: Setting) -> float:
    """Seconds per step on this rank of a row-wise sharded EmbeddingCollection."""
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from recsys.distributed.env import distributed
    from recsys.distributed.planning import manual_plan
    from recsys.distributed.wrap import shard

    with distributed("cpu") as env:
        config = EmbeddingConfig(
            name="item",
            embedding_dim=setting.dim,
            num_embeddings=setting.rows,
            feature_names=["history"],
        )
        model = _Lookup(EmbeddingCollection(tables=[config], device=torch.device("meta")))
        apply_optimizer_in_backward(RowWiseAdagrad, model.parameters(), {"lr": 0.01})
        plan = manual_plan(model, {"item": "row_wise"}, world_size=env.world_size)
        sharded = shard(model, plan, env)
        local_batch = setting.batch // env.world_size
        lengths = torch.full((local_batch,), setting.seq_len)

        def step(i: int) -> None:
            features = KeyedJaggedTensor.from_lengths_sync(
                keys=["history"], values=_ids(setting, local_batch, i, env.rank), lengths=lengths
            )
            sharded(features).square().sum().backward()

        return slowest_rank(seconds_per_step(step, setting.warmup, setting.steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=512, help="global sequences per step")
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    setting = Setting(args.rows, args.dim, args.batch, args.seq_len, args.steps, args.warmup)

    from recsys.distributed.launch import run_on_ranks

    cores = os.cpu_count() or 1
    kernel = "torchrec EC, fused row-wise Adagrad"
    results = {
        f"baseline: nn.Embedding(sparse) + Adagrad, 1 process x {cores} threads": baseline(setting),
        f"{kernel}, 1 rank x {cores} threads": run_on_ranks(
            torchrec_worker, setting, world_size=1, quiet=True
        )[0],
        f"{kernel}, 2 gloo ranks x {max(1, cores // 2)} threads": run_on_ranks(
            torchrec_worker, setting, world_size=2, quiet=True
        )[0],
    }
    print(
        f"table {setting.rows:,} x {setting.dim}, global batch {setting.batch} sequences x "
        f"{setting.seq_len} ids, {setting.steps} timed steps after {setting.warmup} warm-up"
    )
    print_rates({name: setting.batch / seconds for name, seconds in results.items()}, "samples")


if __name__ == "__main__":
    main()
