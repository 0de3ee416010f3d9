"""torchx.yaml and components/ are found beside the package, from any directory.

A checkout (or ``make setup``'s editable install) uses its own; an installed package the
copies ``pip install`` put in ``<environment>/share/recsys``; ``RECSYS_HOME`` names another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from torchx.runner import get_runner

from recsys.errors import UserError
from recsys.pipelines import files
from recsys.pipelines.gpsd import Study, appdef, component_args, plan
from recsys.pipelines.profiles import load_profile

REPO = Path(__file__).resolve().parents[2]
WHERE = "from recsys.pipelines import files; print(files.home())"


def python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def test_a_checkout_finds_its_own_from_another_directory(tmp_path: Path) -> None:
    (tmp_path / "torchx.yaml").write_text("profiles: {}\n")  # another project's: not read
    done = python(WHERE, tmp_path)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO


def test_recsys_home_overrides_and_must_hold_both(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "components").mkdir(parents=True)
    (home / "torchx.yaml").write_text("profiles: {}\n")
    done = python(WHERE, tmp_path, RECSYS_HOME=str(home))
    assert Path(done.stdout.strip()) == home
    (home / "torchx.yaml").unlink()
    done = python(WHERE, tmp_path, RECSYS_HOME=str(home))
    assert f"RECSYS_HOME={home}: expected a directory with torchx.yaml and components/" in (
        done.stderr
    )


def test_an_installed_package_finds_the_copies_in_share(tmp_path: Path) -> None:
    """The layout of a wheel's install: the package in site-packages, nothing beside it, the
    data-files of pyproject.toml under the environment's share/recsys."""
    environment = tmp_path / "env"
    venv.create(environment, with_pip=False)
    shared = environment / "share" / "recsys"
    shutil.copytree(REPO / "components", shared / "components")
    shutil.copy(REPO / "torchx.yaml", shared)
    site = tmp_path / "site"
    shutil.copytree(REPO / "recsys", site / "recsys")
    done = subprocess.run(
        [str(environment / "bin" / "python"), "-c", WHERE], cwd=tmp_path, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(site)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == shared


def test_nothing_found_says_what_to_set(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(files.HOME, raising=False)
    monkeypatch.setattr(files, "_candidates", lambda: [tmp_path])
    with pytest.raises(UserError, match="set RECSYS_HOME to a checkout of the project"):
        files.home()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_stage_of_a_pipeline_builds_its_job_from_another_directory(
    monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    profile = load_profile("local_cwd")
    assert Path(profile.repo) == REPO
    steps = plan(Study(experiment="runs/x", data="data/d", strategies=("NT", "ST&SF")))
    with get_runner() as runner:
        for step in steps:
            app = appdef(step, component_args(step, profile, force=False))
            info = runner.dryrun(app, "local_cwd", cfg={})
            assert f"recsys.stages.{step.stage}" in str(info.request)


def test_the_pipeline_command_reads_the_projects_profiles_from_another_directory(
    tmp_path: Path,
) -> None:
    """It gets past the profiles to the data check: nothing is submitted."""
    (tmp_path / "empty").mkdir()
    recsys = Path(sys.executable).parent / "recsys"
    done = subprocess.run(
        [str(recsys), "pipeline", "run", "--data", "empty", "--experiment", "exp",
         "--sizes", "L1H16A2", "--strategies", "NT"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode != 0
    assert "empty/ctr_train: no such file" in done.stderr and "no job was submitted" in done.stderr
    assert "torchx.yaml" not in done.stderr
