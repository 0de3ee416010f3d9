"""The Makefile's set-up is idempotent and its CUDA variant uses the CUDA builds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO), *args], capture_output=True, text=True)


def test_second_setup_installs_nothing() -> None:
    # The suite runs after `make setup` (ACCEL and VENV reach this make through MAKEFLAGS).
    proc = make("setup")
    assert proc.returncode == 0, proc.stderr
    assert "Nothing to be done for 'setup'" in proc.stdout
    assert "pip install" not in proc.stdout


def test_cuda_variant_installs_cuda_builds(tmp_path: Path) -> None:
    proc = make("--dry-run", "setup", "ACCEL=cuda", f"VENV={tmp_path / 'venv'}")
    assert proc.returncode == 0, proc.stderr
    assert "requirements.py deps --extras cuda,dev" in proc.stdout
    assert "--find-links" not in proc.stdout and "whl/cpu" not in proc.stdout
    assert "pip install --quiet --no-deps -r" in proc.stdout  # torchrec without fbgemm-gpu


def test_cpu_variant_installs_cpu_builds(tmp_path: Path) -> None:
    proc = make("--dry-run", "setup", f"VENV={tmp_path / 'venv'}")
    assert proc.returncode == 0, proc.stderr
    assert "requirements.py deps --extras cpu,dev" in proc.stdout
    # The CPU torch comes from local wheels for this Python or from PyTorch's CPU index.
    assert "--find-links" in proc.stdout or "whl/cpu" in proc.stdout
    no_wheels = make(
        "--dry-run", "setup", f"VENV={tmp_path / 'venv'}", f"TORCH_WHEELS={tmp_path / 'none'}"
    )
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in no_wheels.stdout


def test_switching_accelerator_in_one_venv_is_refused(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".installed-cpu").touch()
    proc = make("setup", "ACCEL=cuda", f"VENV={venv}")
    assert proc.returncode != 0
    assert f"{venv} holds the cpu build; for ACCEL=cuda remove it" in proc.stderr


def test_unknown_accelerator_is_refused() -> None:
    proc = make("--dry-run", "setup", "ACCEL=rocm")
    assert proc.returncode != 0
    assert "ACCEL must be cpu or cuda, not 'rocm'" in proc.stderr


def test_demo_runs_every_strategy_on_movielens_from_the_recbole_wheel() -> None:
    proc = make("--dry-run", "demo", "DEMO_DATA=/nonexistent/ml100k")
    assert proc.returncode == 0, proc.stderr
    assert "pip download --quiet --no-deps recbole==1.2.1" in proc.stdout
    assert "recsys data movielens --input data/wheels/recbole-1.2.1-py3-none-any.whl" in proc.stdout
    assert "recsys pipeline run --data /nonexistent/ml100k" in proc.stdout
    assert "--strategies all --baselines deepfm,din" in proc.stdout


def test_demo_ends_by_scoring_raw_requests_with_the_exported_st_sf_model() -> None:
    proc = make("--dry-run", "demo", "DEMO_DIR=/tmp/demo-x", "DEMO_DATA=/nonexistent/ml100k")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    run = next(i for i, line in enumerate(lines) if "recsys pipeline run" in line)
    rest = " ".join(lines[run:])
    assert "recsys export --model /tmp/demo-x/L4H64A4/finetune-st_sf" in rest
    assert "--out /tmp/demo-x/export-st_sf --dtype int8" in rest
    assert "recsys data requests /nonexistent/ml100k/ctr_test --limit 4 --no-labels" in rest
    assert rest.index("recsys export") < rest.index("/tmp/demo-x/export-st_sf/score.py")
