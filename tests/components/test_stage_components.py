"""The stage components as TorchX builds them for each scheduler (dry runs, nothing submitted)."""

from __future__ import annotations

import pytest
from torchx.runner import get_runner

from recsys.stages.appdef import STAGES

SCHEDULERS = {
    "local_cwd": {},
    "slurm": {"partition": "debug"},
    "kubernetes": {"queue": "default", "namespace": "default"},
}


@pytest.fixture(scope="module")
def runner():
    with get_runner() as r:
        yield r


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_runs_torchrun_on_the_job_shape(runner, stage: str, scheduler: str) -> None:
    info = runner.dryrun_component(
        f"components/{stage}.py:{stage}",
        ["-j", "2x4", "--image", "recsys:test", "--out", f"runs/x/{stage}", "run.epochs=3"],
        scheduler,
        cfg=SCHEDULERS[scheduler],
    )
    (role,) = info._app.roles
    command = " ".join([role.entrypoint, *role.args])
    assert f"-m recsys.stages.{stage}" in command
    assert "--nnodes 2" in command and "--nproc_per_node 4" in command
    assert f"--out runs/x/{stage}" in command and command.endswith("run.epochs=3")
    assert role.num_replicas == 2
    request = str(info.request)
    if scheduler == "kubernetes":
        assert "recsys:test" in request  # the image runs on the cluster
    assert f"recsys.stages.{stage}" in request


def test_freeze_defaults_to_every_table_and_takes_a_list() -> None:
    from components.freeze import freeze

    assert "--sparse" in freeze(init="runs/t").roles[0].args[-1]
    args = freeze(init="runs/t", tables="item").roles[0].args[-1]
    assert "--tables item" in args and "--sparse" not in args


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--j", "axb"], "error: --j 'axb': expected NNODESxNPROC_PER_NODE, e.g. 2x8"),
        (["--j", "0x2"], "error: --j '0x2': nodes and processes per node must be >= 1"),
        (["--h", "nonexistent"], "error: --h 'nonexistent': not a named resource of TorchX"),
    ],
)
def test_a_job_shape_torchx_cannot_take_is_one_line(option: list[str], said: str) -> None:
    """``torchx run`` shows a traceback for a component's errors; these exit with one line."""
    from components.pretrain import pretrain

    flag, value = option
    with pytest.raises(SystemExit) as stop:
        pretrain(**{flag.lstrip("-"): value}, out="runs/x")
    assert str(stop.value.code).startswith(said)
