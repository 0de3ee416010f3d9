"""What a logging step reports about speed and memory: samples and tokens per second, the
tower's achieved TFLOP/s and its model FLOPs utilisation (MFU) on GPUs whose peak is known,
and the peak memory of the rank.

FLOPs are counted for the Transformer tower only, the way torchtitan and the scaling-law
papers count them: 6 per weight per token for forward and backward, plus attention's two
products (3 × 4 · T · d per token and layer, T the mean sequence length). The embedding
tables' lookups and the head are left out, so MFU is the tower's.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 494.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 378.0},
    "H100 NVL": {"bf16": 835.0, "fp32": 418.0},
    "H100": {"bf16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}
"""Dense peak TFLOP/s by device name fragment, the first that matches (vendors' data sheets,
no sparsity; SXM parts where the name says no more): bf16, and fp32 matmuls on TF32 tensor
cores (``torch.backends.cuda.matmul.allow_tf32``)."""


def tower_flops(config, tokens: int, length: float) -> float:
    """FLOPs of one forward + backward of the tower (``TowerConfig``) over ``tokens`` tokens
    in sequences of ``length`` tokens on average."""
    d = config.hidden
    weights = config.layers * (4 * d * d + 3 * d * config.ffn)
    return 6 * weights * tokens + 3 * 4 * config.layers * length * d * tokens


def peak_tflops(device: torch.device, bf16: bool) -> float | None:
    """The device's dense peak in the type its matmuls run in (None: not known, e.g. a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None if peaks is None else peaks["bf16" if bf16 else "fp32"]


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this rank has held: the CUDA allocator's peak on a GPU, the process's
    peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e9


def batch_tokens(batch) -> int:
    """The items a batch feeds the tower: the lengths of its item features (history,
    candidate or sequence), read on the host before the batch moves to the device."""
    features = batch.features
    return sum(
        n
        for key, n in zip(features.keys(), features.length_per_key(), strict=True)
        if key.endswith("item")
    )


class Meter:
    """Speed figures of a window of steps of ``model``: samples and tokens per second of the
    whole job (this rank's times the number of ranks: every rank takes the same steps on
    batches of the same size), TFLOP/s, MFU and peak memory of this rank."""

    def __init__(
        self, model: nn.Module, device: torch.device, bf16: bool, world_size: int = 1
    ) -> None:
        from recsys.models.tower import towers

        found = towers(model)
        self.tower = found[0].config if found else None
        self.device, self.world_size = device, world_size
        self.peak = peak_tflops(device, bf16)

    def figures(self, samples: int, tokens: int, seconds: float) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        ranks = self.world_size
        out = {"samples_per_s": ranks * samples / seconds, "tokens_per_s": ranks * tokens / seconds}
        if self.tower is not None and samples:
            achieved = tower_flops(self.tower, tokens, tokens / samples) / seconds / 1e12
            out["tower_tflops"] = achieved
            if self.peak:
                out["tower_mfu"] = achieved / self.peak
        out["peak_memory_gb"] = peak_memory_gb(self.device)
        return out
