"""The Slurm cluster of ``scripts/slurm-local.sh`` for the ``cluster`` tests, and tiny data.

The session fixture reuses a running cluster or brings one up (installing Debian's packages
when missing) and takes down at the end only what it started. Where the cluster cannot be
started the tests fail with the script's output; they skip only where they cannot even try:
not root (installing and starting daemons needs it) or apt cannot reach its registry (the
script exits 2).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
UP_TIMEOUT_S = 300  # a cold start installs packages (~20 s here; slow mirrors take longer)


def _script(command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), command], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    """Seconds the cluster took to come up (0.0 when it was running already)."""
    if _script("status", 60).returncode == 0:
        yield 0.0
        return
    if os.geteuid() != 0:
        pytest.skip("the cluster tests start Slurm daemons and install packages: run as root")
    started = time.monotonic()
    up = _script("up", UP_TIMEOUT_S)
    if up.returncode == 2:
        pytest.skip(f"Slurm packages cannot be installed (apt unreachable): {up.stderr.strip()}")
    if up.returncode != 0:
        logs = Path(os.environ.get("RECSYS_SLURM_STATE", "/var/lib/recsys-slurm")) / "log"
        pytest.fail(
            f"scripts/slurm-local.sh up failed ({up.returncode}); logs in {logs}:\n"
            f"{up.stdout}\n{up.stderr}",
            pytrace=False,
        )
    try:
        yield time.monotonic() - started
    finally:
        _script("down", 120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic logs of a few hundred users and a config of a one-layer model."""
    from recsys.data.protocol import write_split
    from recsys.data.synth import SynthConfig, make

    root = tmp_path_factory.mktemp("slurm")
    result, source = make(
        SynthConfig(users=240, items=80, categories=4, min_events=6, max_events=30, seed=5)
    )
    write_split(root / "data", result, source, row_group_rows=20)
    config = root / "tiny.yaml"
    config.write_text(
        "model: {size: L1H16A2, max_len: 16, negatives: 16}\n"
        "data: {batch_size: 16}\nrun: {epochs: 1}\noptim: {lr: 0.003}\n"
    )
    return {"root": root, "data": root / "data", "config": config}


@pytest.fixture(scope="module")
def in_repo():
    """Jobs are submitted from the repository root (components/, torchx.yaml, .torchxconfig);
    the Slurm log files TorchX leaves there for the jobs of a module are removed after it."""
    before = set(REPO.glob("slurm-*"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        yield REPO
    for path in set(REPO.glob("slurm-*")) - before:
        path.unlink()
