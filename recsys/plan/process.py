"""What a rank holds besides its tables: the runtime, the dense model's training state and a
batch's activations.

TorchRec's planner places tables and counts their input and output buffers; it keeps a share
of each rank's memory back for everything else but never says how much that is. This module
owns that estimate, so that a plan's per-rank total can be compared with what a rank really
holds (``benchmarks/table_scale.py`` does, on CPU ranks):

- **runtime** (:data:`RUNTIME_BYTES`): the interpreter, torch, TorchRec and FBGEMM, the data
  loader and the allocator's arenas, measured on CPU ranks;
- **dense state**: the weights outside the tables, their gradients and AdamW's two moments
  (:data:`DENSE_COPIES` fp32 copies);
- **activations**: what autograd keeps for backward, counted by running the model's tower
  (and pretraining's sampled-softmax loss) on two samples on the CPU and summing the bytes of
  the tensors it saves (weights excluded), times the batch, times :data:`ACTIVATION_PEAK`
  (:data:`LOSS_PEAK` for the loss) for the gradients that exist only during backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MIB = 1024**2

RUNTIME_BYTES = 507 * MIB
"""A CPU rank's memory besides its model and batch: ~441 MiB before the first step (after
imports, the process group, the loader and a 0.1M-row table's 13 MiB) plus ~66 MiB that
training adds whatever the batch (allocator arenas, loader buffers); measured with
``benchmarks/table_scale.py`` at batches 64 and 512 (torch 2.9, torchrec 1.9.2, Intel Xeon
host, docs/plan.md)."""

ACTIVATION_PEAK = 1.5
"""A step's peak activation memory over the bytes autograd saves in forward: the gradients of
the activations exist beside them during backward. Measured: 1.08 MiB per CTR sample of
peak growth (batches 64 → 512) over 0.72 MiB saved per sample, L4H64A4, 51 positions."""

LOSS_PEAK = 2.0
"""The same for pretraining's sampled-softmax loss: backward holds the gradient of its
[T, K] scores beside them. Measured: ~5.9 MiB per sequence of peak growth besides the tower's
over 2.9 MiB saved, L4H64A4, 50 positions, 4,096 negatives, batch 64."""

DENSE_COPIES = 4
"""fp32 copies of each dense weight in training: the weight, its gradient, AdamW's two
moments."""


@dataclass(frozen=True)
class ProcessMemory:
    """One rank's memory besides its tables, in bytes."""

    runtime: int
    dense: int
    activations: int

    @property
    def total(self) -> int:
        return self.runtime + self.dense + self.activations

    def to_json(self) -> dict[str, int]:
        return {
            "runtime_bytes": self.runtime,
            "dense_bytes": self.dense,
            "activation_bytes": self.activations,
            "process_bytes": self.total,
        }


def saved_bytes(run: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` computes, leaving out
    the storages in ``exclude`` (``untyped_storage()._cdata`` of the weights)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in exclude:
            seen[storage._cdata] = max(seen.get(storage._cdata, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def per_sample(count: Callable[[int], int]) -> int:
    """What one more sample adds: ``count(2) - count(1)`` (a forward also saves tensors that
    do not grow with the batch: masks, rotary tables)."""
    return max(0, count(2) - count(1))


def tower_bytes_per_sample(tower: nn.Module, positions: int, ctr: bool) -> int:
    """Bytes autograd saves per sample in ``tower``'s forward over ``positions`` tokens (a
    ranker asks for one output, at the candidate; pretraining for every position)."""
    weights = {t.untyped_storage()._cdata for t in [*tower.parameters(), *tower.buffers()]}

    def count(samples: int) -> int:
        x = torch.randn(samples, positions, tower.config.hidden, requires_grad=True)
        valid = torch.ones(samples, positions, dtype=torch.bool)
        at = torch.full((samples,), positions - 1) if ctr else None
        return saved_bytes(lambda: tower(x, valid, at=at), weights)

    return per_sample(count)


def loss_bytes_per_sample(positions: int, negatives: int, hidden: int) -> int:
    """Bytes pretraining's sampled-softmax loss saves per sequence (its [T, K] scores against
    the sequence's K shared negatives) and the negatives' embeddings."""
    from recsys.models.generative import sampled_softmax_loss

    def count(samples: int) -> int:
        shape = (samples, positions, hidden)
        out = torch.randn(shape, requires_grad=True)
        target = torch.randn(shape, requires_grad=True)
        drawn = torch.randn(samples, negatives, hidden, requires_grad=True)
        valid = torch.ones(samples, positions, dtype=torch.bool)
        run = lambda: sampled_softmax_loss(out, target, drawn, valid)  # noqa: E731
        # + the gradient backward makes for the negatives' embeddings
        return saved_bytes(run, set()) + drawn.nbytes

    return per_sample(count)


def process_memory(
    tower: nn.Module | None, dense: int, batch: int, history: int, negatives: int | None
) -> ProcessMemory:
    """The estimate for one rank training with ``batch`` samples of ``history`` events each
    through ``tower`` (on the CPU), with ``dense`` bytes of fp32 dense weights; ``negatives``:
    pretraining's negatives per sequence (None: a ranker, which appends the candidate and asks
    for one output). ``tower`` None: a baseline ranker (DeepFM, DIN), whose small MLP
    activations are not counted."""
    ctr = negatives is None
    if tower is None:
        return ProcessMemory(runtime=RUNTIME_BYTES, dense=dense * DENSE_COPIES, activations=0)
    with torch.device("cpu"):
        sample = tower_bytes_per_sample(tower, history + 1 if ctr else history, ctr)
        sample *= ACTIVATION_PEAK
        if not ctr:
            sample += loss_bytes_per_sample(history, negatives, tower.config.hidden) * LOSS_PEAK
    return ProcessMemory(
        runtime=RUNTIME_BYTES, dense=dense * DENSE_COPIES, activations=int(sample * batch)
    )
