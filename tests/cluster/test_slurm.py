"""Stages on a real Slurm cluster (scripts/slurm-local.sh: two nodes of one CPU here).

The pretrain component through ``torchx run -s slurm``, its logs through ``torchx log``, the
whole GPSD chain on the ``slurm`` profile, ``torchx cancel``, and jobs that can never start.
Every wait is bounded (``recsys.pipelines.slurm.wait(timeout_s=...)`` cancels what overstays).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from torchx.specs import AppState

from recsys.pipelines import slurm
from recsys.pipelines.gpsd import PipelineError, Study, run
from recsys.pipelines.profiles import load_profile

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TORCHX = str(Path(sys.executable).parent / "torchx")


def torchx(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The ``torchx`` command of this environment, run from the repository root."""
    done = subprocess.run(
        [TORCHX, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"torchx {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def submit(*args: str) -> str:
    """``torchx run -s slurm ARGS``; the job handle it prints."""
    out = torchx("run", "-s", "slurm", *args).stdout
    match = re.search(r"slurm://\S+/\d+", out)
    assert match, out
    return match.group(0)


def sacct(handle: str, fields: str) -> list[list[str]]:
    rows = subprocess.run(
        ["sacct", "-X", "-n", "--parsable2", "-j", slurm.job_id(handle), "-o", fields],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    return [r.split("|") for r in rows.splitlines()]


def wait_until(handle: str, wanted: AppState, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while slurm.state(handle) != wanted:
        assert time.monotonic() < deadline, f"{handle} not {wanted.name} after {timeout_s} s"
        time.sleep(0.5)


def test_pretrain_component_runs_on_two_nodes_and_logs_through_torchx_log(
    slurm_cluster, tiny, in_repo
) -> None:
    out = tiny["root"] / "pretrain"
    handle = submit(
        "components/pretrain.py:pretrain", "-j", "2x1", "--cpu", "1", "--memMB", "2048",
        "--config", str(tiny["config"]), "--out", str(out), f"data.train={tiny['data'] / 'seq'}",
    )  # fmt: skip
    assert slurm.wait(handle, timeout_s=180) == AppState.SUCCEEDED
    record = json.loads((out / "stage.json").read_text())
    assert record["world_size"] == 2 and (out / "DONE").exists()
    # One replica per node: TorchX's heterogeneous job has a component per replica.
    assert sorted(node for _, node in sacct(handle, "JobID,NodeList")) == ["node1", "node2"]
    assert "SUCCEEDED" in torchx("status", handle).stdout
    rank0 = torchx("log", f"{handle}/pretrain/0").stdout
    assert "checkpoint saved" in rank0 and rank0.startswith("pretrain/0 ")
    rank1 = torchx("log", f"{handle}/pretrain/1").stdout
    assert "checkpoint saved" in rank1 and all(
        line.startswith("pretrain/1 ") for line in rank1.splitlines()
    )


def test_gpsd_pipeline_on_the_slurm_profile(slurm_cluster, tiny, in_repo) -> None:
    study = Study(
        experiment=str(tiny["root"] / "exp"),
        data=str(tiny["data"]),
        config=str(tiny["config"]),
        strategies=("ST&SF",),
    )
    console = io.StringIO()
    steps = run(study, "slurm", console=console)
    names = [s.out.name for s in steps]
    assert names == ["pretrain", "retrieve-ctr_test", "transfer-st", "freeze-st", "finetune-st_sf"]
    for step in steps:
        record = json.loads((step.out / "stage.json").read_text())
        assert record["world_size"] == 2 and (step.out / "DONE").exists(), step.out
        log = (step.out.parent.parent / "logs" / f"L1H16A2-{step.out.name}.log").read_text()
        assert "[0]:" in log, f"{step.out.name}: the job's stderr was not followed"
    finetune = json.loads((steps[-1].out / "stage.json").read_text())
    assert finetune["frozen"] == ["category", "item"]
    assert 0.0 < finetune["results"]["valid_auc"] < 1.0
    assert "checkpoint saved" in console.getvalue()
    assert all(s.skipped for s in run(study, "slurm", console=io.StringIO()))


def test_jobs_get_the_profiles_venv_and_repository(slurm_cluster, in_repo) -> None:
    from torchx.runner import get_runner

    env = load_profile("slurm").venv_env(path="/usr/bin:/bin")
    with get_runner() as runner, slurm.submit_environment(env):
        handle = runner.run_component(
            "utils.sh", ["printenv", "PATH", "VIRTUAL_ENV", "PYTHONPATH"], "slurm"
        )
    assert slurm.wait(handle, timeout_s=60) == AppState.SUCCEEDED
    printed = torchx("log", "--streams", "stdout", f"{handle}/sh/0").stdout.split()
    venv = in_repo / ".venv"
    assert printed[1::2] == [f"{venv}/bin:/usr/bin:/bin", str(venv), str(in_repo)]


def test_torchx_cancel_ends_the_job_cancelled(slurm_cluster, in_repo) -> None:
    handle = submit("utils.sh", "sleep", "120")
    wait_until(handle, AppState.RUNNING, timeout_s=60)
    torchx("cancel", handle)
    wait_until(handle, AppState.CANCELLED, timeout_s=30)
    # sacct says "CANCELLED by 0", which TorchX 0.7.0's `torchx status` cannot translate.
    assert sacct(handle, "State")[0][0].startswith("CANCELLED by")
    assert slurm.wait(handle, timeout_s=10) == AppState.CANCELLED
    status = subprocess.run(
        [sys.executable, "-m", "recsys.pipelines.slurm", "status", handle],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert status.stdout.strip() == "CANCELLED"


def test_a_job_no_node_can_hold_is_cancelled_with_what_it_asked(slurm_cluster, in_repo) -> None:
    from torchx.runner import get_runner

    with get_runner() as runner:  # past the pipeline's pre-check: Slurm pends it forever
        handle = runner.run_component("utils.sh", ["--cpu", "4", "true"], "slurm", {"time": "1"})
    with pytest.raises(slurm.SlurmError) as err:
        slurm.wait(handle, timeout_s=60, partition="debug")
    message = str(err.value)
    assert "can never start (PartitionConfig)" in message
    assert "4 CPUs" in message and "the largest node (node1) has 1 CPUs" in message
    wait_until(handle, AppState.CANCELLED, timeout_s=30)


def test_a_job_pending_past_its_bound_is_cancelled(slurm_cluster, in_repo) -> None:
    from torchx.runner import get_runner

    with get_runner() as runner:  # three one-node replicas on two nodes: pends on Resources
        handle = runner.run_component(
            "utils.sh", ["--num_replicas", "3", "true"], "slurm", {"time": "1"}
        )
    with pytest.raises(slurm.SlurmError, match=r"pended \d+ s \(> 3 s; Slurm's reason: .*Res"):
        slurm.wait(handle, max_pending_s=3, timeout_s=60)
    wait_until(handle, AppState.CANCELLED, timeout_s=30)


def test_pipeline_refuses_a_resource_no_node_has(slurm_cluster, tiny, in_repo) -> None:
    profile = replace(load_profile("slurm"), cpu=4)
    study = Study(
        experiment=str(tiny["root"] / "too-big"),
        data=str(tiny["data"]),
        config=str(tiny["config"]),
        strategies=("ST",),
    )
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True)
    with pytest.raises(
        PipelineError, match=r"stage pretrain \(L1H16A2-pretrain\) not submitted"
    ) as e:
        run(study, profile, console=io.StringIO())
    assert "asks for 4 CPUs" in str(e.value) and "partition 'debug'" in str(e.value)
    after = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True)
    assert after.stdout == before.stdout  # nothing was submitted
