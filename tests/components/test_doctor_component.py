"""The doctor TorchX component builds the right job and runs through `torchx run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torchx.runner import get_runner
from torchx.specs.builders import materialize_appdef
from torchx.specs.finder import get_component

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


COMPONENT = f"{REPO}/components/doctor.py:doctor"


def test_arguments_describe_one_doctor_per_host() -> None:
    app = materialize_appdef(
        get_component(COMPONENT).fn, ["--nnodes", "3", "--timeout", "60", "--env", "A=1"]
    )
    (role,) = app.roles
    assert role.num_replicas == 3
    assert [role.entrypoint, *role.args] == [
        "python",
        "-m",
        "recsys.cli",
        "doctor",
        "--timeout",
        "60",
    ]
    assert role.env["A"] == "1"


def test_dryrun_on_local_cwd() -> None:
    with get_runner() as runner:
        info = runner.dryrun_component(COMPONENT, [], scheduler="local_cwd")
    (replica,) = info.request.role_params["doctor"]
    assert replica.args == ["python", "-m", "recsys.cli", "doctor", "--timeout", "300"]


def test_named_resource_is_used() -> None:
    sys.path.insert(0, str(REPO / "components"))
    try:
        from doctor import doctor
    finally:
        sys.path.pop(0)
    app = doctor(h="aws_p4d.24xlarge")
    assert app.roles[0].resource.gpu == 8
    with pytest.raises(ValueError, match="nnodes must be >= 1"):
        doctor(nnodes=0)


@pytest.mark.dist
def test_torchx_run_local_cwd_succeeds() -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [
            str(BIN / "torchx"),
            "run",
            "-s",
            "local_cwd",
            "--wait",
            "--log",
            "components/doctor.py:doctor",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "doctor/0 all checks passed" in output
    assert "Job finished: SUCCEEDED" in output
