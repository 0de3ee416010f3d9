"""The number formats a run computes in: bf16 autocast of the forward pass (``run.bf16``)
and TF32 matrix products on CUDA.

``run.bf16``: ``on``, ``off``, or ``auto`` (the default): on CUDA, and on CPU only with
``run.cpu_bf16`` (the older spelling, kept for the configs that use it: bf16 pays on CPUs
with bf16 matrix units, AMX, and costs elsewhere; ``recsys doctor`` tells). On CUDA, fp32
matrix products run on TF32 tensor cores (``torch.set_float32_matmul_precision("high")``),
as torchtitan and most training code do: the fp32 parts under autocast (the losses, the
norms) and whole runs with ``run.bf16=off``.
"""

from __future__ import annotations

import torch

CHOICES = ("auto", "on", "off")
"""Values of ``run.bf16``."""


def bf16(choice: str, cpu_bf16: bool, device: torch.device) -> bool:
    """Whether the forward pass runs under bf16 autocast."""
    if choice not in CHOICES:
        raise ValueError(f"run.bf16 must be {', '.join(CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    return device.type == "cuda" or cpu_bf16


def use_tf32(device: torch.device) -> None:
    """fp32 matrix products on TF32 tensor cores, on CUDA (a process-wide setting)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
