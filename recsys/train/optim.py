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
        # Each message starts with the key it names; a stage config puts ``optim.`` before it.
        if self.sparse not in SPARSE_OPTIMIZERS:
            raise ValueError(
                f"sparse: the sparse optimizer must be one of "
                f"{', '.join(sorted(SPARSE_OPTIMIZERS))}, got {self.sparse!r}"
            )
        _require(_positive(self.lr), "lr", "a finite number > 0", self.lr)
        _require(_positive(self.sparse_lr), "sparse_lr", "a finite number > 0", self.sparse_lr)
        for beta in self.betas:  # AdamW's running averages decay by β each step
            _require(0 <= beta < 1, "betas", "two numbers in [0, 1)", list(self.betas))
        decay = self.weight_decay
        _require(math.isfinite(decay) and decay >= 0, "weight_decay", "finite and >= 0", decay)
        _require(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        _require(self.total_steps >= 1, "total_steps", ">= 1", self.total_steps)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                "min_lr_ratio: the schedule ends at min_lr_ratio × lr; min_lr_ratio must lie "
                f"in [0, 1], got {self.min_lr_ratio!r}"
            )
        # A negative norm reverses the dense update's direction and 0 freezes it: off is None.
        clip = self.clip_norm
        _require(
            clip is None or _positive(clip),
            "clip_norm",
            "a finite number > 0, or null for no clipping",
            clip,
        )


def _positive(value: float) -> bool:
    """A finite number > 0 (NaN and infinities are neither)."""
    return math.isfinite(value) and value > 0


def _require(ok: bool, key: str, rule: str, value: object) -> None:
    """``key: must be RULE, got VALUE`` as a ValueError unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}: must be {rule}, got {value!r}")


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
