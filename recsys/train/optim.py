"""Optimizers and the learning-rate schedule.

This module owns how parameters are optimised: embedding tables with a fused optimizer
applied in backward (row-wise Adagrad or Adam, TorchRec's fused kernels; frozen tables get
none), dense parameters with AdamW (β 0.9/0.98, weight decay 0.1, GPSD's public code) under
a linear warm-up then cosine decay to 10% of the peak, and gradient clipping of the dense
part. The fused optimizer must be attached to the meta-device model before
``DistributedModelParallel`` shards it; the dense optimizer is built after.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.checks import positive, require

SPARSE_OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation of one training run (a stage config's ``optim`` section)."""

    lr: float = 1e-3
    """Peak learning rate of the dense parameters."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW's decay rates of its running averages of the gradient and of its square."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay of the dense parameters."""
    warmup_steps: int | None = None
    """Linear warm-up from 0 to ``lr`` (None: 10% of the run's steps, at most 100)."""
    total_steps: int | None = None
    """Cosine decay ends here, at ``min_lr_ratio × lr`` (None: at the run's last step)."""
    min_lr_ratio: float = 0.1
    """Where the cosine decay ends, as a fraction of ``lr``."""
    clip_norm: float | None = 1.0
    """Dense gradients are clipped to this global norm (None: no clipping)."""
    sparse: str = "rowwise_adagrad"
    """Fused optimizer of the trainable tables: rowwise_adagrad or adam."""
    sparse_lr: float = 0.01
    """Learning rate of the tables' fused optimizer."""

    def __post_init__(self) -> None:
        # Each message starts with the key it names; a stage config puts ``optim.`` before it.
        if self.sparse not in SPARSE_OPTIMIZERS:
            raise ValueError(
                f"sparse: the sparse optimizer must be one of "
                f"{', '.join(sorted(SPARSE_OPTIMIZERS))}, got {self.sparse!r}"
            )
        require(positive(self.lr), "lr", "a finite number > 0", self.lr)
        require(positive(self.sparse_lr), "sparse_lr", "a finite number > 0", self.sparse_lr)
        for beta in self.betas:  # AdamW's running averages decay by β each step
            require(0 <= beta < 1, "betas", "two numbers in [0, 1)", list(self.betas))
        decay = self.weight_decay
        require(math.isfinite(decay) and decay >= 0, "weight_decay", "finite and >= 0", decay)
        warmup, total = self.warmup_steps, self.total_steps
        require(warmup is None or warmup >= 0, "warmup_steps", ">= 0", warmup)
        require(total is None or total >= 1, "total_steps", ">= 1", total)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                "min_lr_ratio: the schedule ends at min_lr_ratio × lr; min_lr_ratio must lie "
                f"in [0, 1], got {self.min_lr_ratio!r}"
            )
        # A negative norm reverses the dense update's direction and 0 freezes it: off is None.
        clip = self.clip_norm
        require(
            clip is None or positive(clip),
            "clip_norm",
            "a finite number > 0, or null for no clipping",
            clip,
        )

    def fitted(self, run_steps: int) -> OptimConfig:
        """This config with the schedule's lengths it leaves unset (None) derived from the
        run's ``run_steps``: cosine decay over every step, warm-up over the first 10% (at
        most 100 steps)."""
        warmup = min(100, run_steps // 10) if self.warmup_steps is None else self.warmup_steps
        total = run_steps if self.total_steps is None else self.total_steps
        return dataclasses.replace(self, warmup_steps=warmup, total_steps=total)


def lr_factor(step: int, config: OptimConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based); the schedule's lengths
    must be set (:meth:`OptimConfig.fitted`)."""
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
    warm-up + cosine schedule (``config`` with its lengths set: :meth:`OptimConfig.fitted`)."""
    if config.warmup_steps is None or config.total_steps is None:
        raise ValueError("the schedule's lengths are unset: give OptimConfig.fitted(run_steps)")
    optimizer = KeyedOptimizerWrapper(
        dense_parameters(model),
        lambda params: torch.optim.AdamW(
            params,
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
            fused=_fused(params),
        ),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    return optimizer, schedule


def _fused(params: list[torch.Tensor]) -> bool | None:
    """AdamW's fused kernel (one launch for the whole update) when every parameter is on
    CUDA; None elsewhere: torch's default (the foreach kernels)."""
    return True if params and all(p.is_cuda for p in params) else None


def clip(model: nn.Module, config: OptimConfig) -> torch.Tensor | None:
    """Clip the dense gradients to ``clip_norm``; the norm before clipping."""
    if config.clip_norm is None:
        return None
    grads = [p for p in dense_parameters(model).values() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(grads, config.clip_norm)
