"""Optimizers and the learning-rate schedule.

This module owns how parameters are optimised: embedding tables with a fused optimizer
applied in backward (row-wise Adagrad or Adam, TorchRec's fused kernels; frozen tables get
none), dense parameters with AdamW (β 0.9/0.98, weight decay 0.1, GPSD's public code) under
a linear warm-up then cosine decay to 10% of the peak, and gradient clipping of the dense
part. The fused optimizer must be attached to the meta-device model before
``DistributedModelParallel`` shards it; the dense optimizer is built after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

SPARSE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation of one training run."""

    lr: float = 1e-3
    """Peak learning rate of the dense parameters."""
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    """Linear warm-up from 0 to ``lr``."""
    total_steps: int = 1_000
    """Cosine decay ends here, at ``min_lr_ratio × lr``."""
    min_lr_ratio: float = 0.1
    clip_norm: float | None = 1.0
    """Dense gradients are clipped to this global norm (None: no clipping)."""
    sparse: str = "rowwise_adagrad"
    """Fused optimizer of the trainable tables: rowwise_adagrad or adam."""
    sparse_lr: float = 0.01

    def __post_init__(self) -> None:
        if self.sparse not in SPARSE_OPTIMIZERS:
            raise ValueError(
                f"sparse optimizer must be one of {sorted(SPARSE_OPTIMIZERS)}, got {self.sparse!r}"
            )
        if self.lr <= 0 or self.sparse_lr <= 0:
            raise ValueError("learning rates must be positive")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and total_steps >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


def lr_factor(step: int, config: OptimConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def attach_sparse_optimizer(model: nn.Module, config: OptimConfig) -> None:
    """Fuse the table optimizer into backward for every trainable table (call before
    sharding). Frozen tables get none, so they hold no optimizer state."""
    tables = [p for n, p in model.named_parameters() if n.startswith("sparse.") and p.requires_grad]
    kwargs = {"lr": config.sparse_lr}
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[config.sparse], tables, kwargs)


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that are not embedding tables, by name."""
    return {
        n: p for n, p in model.named_parameters() if ".sparse." not in f".{n}" and p.requires_grad
    }


def dense_optimizer(
    model: nn.Module, config: OptimConfig
) -> tuple[KeyedOptimizerWrapper, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the dense parameters (keyed by name, so checkpoints reshard) and its
    warm-up + cosine schedule."""
    optimizer = KeyedOptimizerWrapper(
        dense_parameters(model),
        lambda params: torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        ),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    return optimizer, schedule


def clip(model: nn.Module, config: OptimConfig) -> torch.Tensor | None:
    """Clip the dense gradients to ``clip_norm``; the norm before clipping."""
    if config.clip_norm is None:
        return None
    grads = [p for p in dense_parameters(model).values() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(grads, config.clip_norm)
