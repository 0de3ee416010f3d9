"""The allocator setting of CPU training processes: memory a step frees is reused by the
next one instead of being handed back to the kernel and faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Page faults (4 KiB each) per training step of the L4H64A4 tower under bf16 autocast, batch
# 256 of 51 positions, in a fresh process.
SCRIPT = """
import resource, sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "1":
    from recsys.train.host import reuse_freed_memory
    assert reuse_freed_memory()
from recsys.models.tower import Tower, TowerConfig
tower = Tower(TowerConfig.from_name("L4H64A4", max_len=51))
x = torch.randn(256, 51, 64, requires_grad=True)
valid = torch.ones(256, 51, dtype=torch.bool)
at = torch.full((256,), 50)
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tower(x, valid, at=at)
    out.float().square().mean().backward()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
before = faults()
for _ in range(4):
    step()
print((faults() - before) / 4)
"""


def faults_per_step(reuse: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(int(reuse))], check=True, capture_output=True, text=True
    )
    return float(out.stdout.split()[-1])


TUNED = bool(os.environ.get("LD_PRELOAD")) or any(
    name == "GLIBC_TUNABLES" or name.startswith("MALLOC_") for name in os.environ
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(TUNED, reason="another allocator, or glibc's tuned, in this environment")
def test_steps_reuse_freed_memory() -> None:
    # glibc's defaults hand the activations' pages back, and each step faults 5,000-24,000
    # in (glibc's thresholds adapt as the process runs); kept, 0-800 here.
    assert faults_per_step(True) < 2_000 < faults_per_step(False)
