"""The set-up's requirement split keeps torchrec apart and drops its CUDA-only fbgemm-gpu."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "requirements.py"


def run(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True
    ).stdout
    return out.split()


def test_no_deps_group_is_torchrec_alone() -> None:
    assert run("no-deps", "--extras", "cpu") == ["torchrec==1.9.2"]
    assert run("no-deps", "--extras", "cuda") == ["torchrec==1.9.2"]
    # torchrec comes with an extra, never with the project alone: without one, an error
    alone = subprocess.run([sys.executable, str(SCRIPT), "no-deps"], capture_output=True, text=True)
    assert alone.returncode == 2 and "--extras cpu" in alone.stderr


def test_deps_group_replaces_fbgemm_gpu_with_the_host_build() -> None:
    cpu = run("deps", "--extras", "cpu,dev")
    names = {line.split("=")[0].split(">")[0] for line in cpu}
    assert "fbgemm-gpu-cpu==1.8.0" in cpu
    assert "fbgemm-gpu" not in names and "torchrec" not in names
    assert {"torch", "pyarrow", "torchx", "torchmetrics", "tensordict", "pytest"} <= names
    assert not any(";" in line for line in cpu)  # markers are evaluated, not passed on
    cuda = run("deps", "--extras", "cuda")
    assert "fbgemm-gpu==1.8.0" in cuda
    assert "fbgemm-gpu-cpu==1.8.0" not in cuda and "pytest>=8" not in cuda
