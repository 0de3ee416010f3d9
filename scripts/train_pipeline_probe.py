"""What TorchRec's pipelined training loop needs of a model, checked on 2 gloo ranks.

    python scripts/train_pipeline_probe.py

``TrainPipelineSparseDist`` overlaps the input distribution of batch i+1 with the dense
compute of batch i by finding, in an fx trace of the model's ``forward(batch)``, each sharded
collection called on an attribute of the batch. This probe builds the smallest model of that
shape (a row-wise sharded ``EmbeddingCollection`` called on ``batch.kjt``; the pooling behind
``torch.fx.wrap``; the head a module without sharded children, which the tracer keeps as a
leaf) and trains it 6 steps with the plain loop and with the pipeline. Seen with torchrec
1.9.2 and torch 2.13 on CPU: the pipeline pipelines the sharded collection, and both loops
give the same losses and bitwise the same weights. The project's models do not have that
shape yet: their sparse part permutes one KJT into per-collection inputs and their forward
branches on data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from recsys.distributed.launch import run_on_ranks


def pooled_mean(out):
    """Each row's mean embedding (a call the fx trace records, not traces into)."""
    jt = out["f"]
    return torch.segment_reduce(jt.values(), "mean", lengths=jt.lengths())


torch.fx.wrap("pooled_mean")


@dataclass
class Batch(Pipelineable):
    """A batch the pipeline can move and keep alive on side streams."""

    kjt: KeyedJaggedTensor
    y: torch.Tensor

    def to(self, device, non_blocking=False):
        return Batch(
            self.kjt.to(device, non_blocking=non_blocking),
            self.y.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream):
        self.kjt.record_stream(stream)
        self.y.record_stream(stream)

    def pin_memory(self):
        return Batch(self.kjt.pin_memory(), self.y.pin_memory())


class Head(nn.Module):
    """No sharded children: the pipeline's tracer keeps it as a leaf."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, x, y):
        logit = self.lin(x).squeeze(-1)
        return nn.functional.binary_cross_entropy_with_logits(logit, y), logit


class Model(nn.Module):
    """forward(batch): the sharded collection on a batch attribute, the rest fx leaves."""

    def __init__(self, device):
        super().__init__()
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["f"])
            ],
            device=device,
        )
        self.head = Head()

    def forward(self, batch):
        out = self.ec(batch.kjt)
        loss, logit = self.head(pooled_mean(out), batch.y)
        return loss, (loss.detach(), logit.detach())


def batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        lengths = torch.randint(1, 5, (16,), generator=g)
        vals = torch.randint(0, 100, (int(lengths.sum()),), generator=g)
        yield Batch(
            KeyedJaggedTensor.from_lengths_sync(["f"], vals, lengths),
            torch.randint(0, 2, (16,), generator=g).float(),
        )


def train(mode: str) -> tuple[list[float], torch.Tensor]:
    """6 steps on this rank, ``plain`` or ``pipelined``; the losses and the head's weight."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from recsys.distributed.env import distributed
    from recsys.distributed.planning import planned
    from recsys.distributed.wrap import shard
    from recsys.train.optim import OptimConfig, attach_sparse_optimizer

    with distributed("cpu") as env:
        torch.manual_seed(0)
        m = Model(torch.device("meta"))
        attach_sparse_optimizer(m, OptimConfig(sparse_lr=0.1))
        plan = planned(m, world_size=env.world_size, sharding_types={"t": ["row_wise"]})
        dmp = shard(m, plan, env)
        opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "head" in n], lr=0.1)
        data = list(batches(6, 1 + env.rank))
        losses = []
        if mode == "plain":
            for b in data:
                opt.zero_grad()
                loss, out = dmp(b)
                loss.backward()
                opt.step()
                losses.append(float(out[0]))
        else:
            pipe = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"), execute_all_batches=True)
            it = iter(data)
            while True:
                try:
                    out = pipe.progress(it)
                except StopIteration:
                    break
                losses.append(float(out[0]))
            print(
                "pipelined modules:",
                [type(x).__name__ for x in getattr(pipe, "_pipelined_modules", [])],
                file=sys.stderr,
            )
        w = dmp.module.head.lin.weight.detach().clone()
        return losses, w


if __name__ == "__main__":
    a = run_on_ranks(train, "plain", world_size=2)
    b = run_on_ranks(train, "pipelined", world_size=2)
    print("plain loop losses:    ", a[0][0])
    print("pipelined losses:     ", b[0][0])
    print("weights equal:", torch.equal(a[0][1], b[0][1]))
