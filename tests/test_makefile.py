"""The Makefile's set-up is idempotent and its CUDA variant uses the CUDA builds."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO), *args], capture_output=True, text=True)


def test_installed_environment_is_up_to_date() -> None:
    # The suite runs after `make setup`: a second set-up has nothing to do.
    assert make("--question", ".venv/.installed-cpu").returncode == 0


def test_cuda_variant_installs_cuda_builds(tmp_path: Path) -> None:
    proc = make("--dry-run", "setup", "ACCEL=cuda", f"VENV={tmp_path / 'venv'}")
    assert proc.returncode == 0, proc.stderr
    assert "requirements.py deps --extras cuda,dev" in proc.stdout
    assert "--find-links" not in proc.stdout and "whl/cpu" not in proc.stdout
    assert "pip install --quiet --no-deps -r" in proc.stdout  # torchrec without fbgemm-gpu


def test_cpu_variant_installs_cpu_builds(tmp_path: Path) -> None:
    proc = make("--dry-run", "setup", f"VENV={tmp_path / 'venv'}")
    assert "requirements.py deps --extras cpu,dev" in proc.stdout


def test_unknown_accelerator_is_refused() -> None:
    proc = make("--dry-run", "setup", "ACCEL=rocm")
    assert proc.returncode != 0
    assert "ACCEL must be cpu or cuda, not 'rocm'" in proc.stderr
