"""torchx.yaml's profiles load and are checked against TorchX; typos are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.pipelines.profiles import ProfileError, load_profile, load_profiles

REPO = Path(__file__).resolve().parents[2]


def test_repository_profiles_load() -> None:
    profiles = load_profiles(REPO / "torchx.yaml")
    assert {"local_cwd", "slurm", "kubernetes"} <= set(profiles)
    assert profiles["local_cwd"].j == "1x2"
    k8s = profiles["kubernetes"]
    assert (k8s.scheduler, k8s.resource, k8s.j) == ("kubernetes", "aws_p4d.24xlarge", "2x8")
    assert k8s.scheduler_args["queue"] == "default"
    assert profiles["slurm"].scheduler_args["partition"] == "debug"
    assert k8s.stage_args == ("data.workers=4",)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "torchx.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "scheduler: slurm\nscheduler_args: {partiton: gpu}",
            r"profile 'p': slurm has no run options \['partiton'\]",
        ),
        (
            "scheduler: slurm\nscheduler_args: {time: 5}",
            r"profile 'p': scheduler_args: Run option: time, must be of type: str",
        ),
        ("scheduler: slurmm", r"unknown scheduler 'slurmm'"),
        ("scheduler: local_cwd\nresource: a100_box", r"unknown named resource 'a100_box'"),
        ("scheduler: local_cwd\nnproc_per_node: 0", r"nproc_per_node must be an integer >= 1"),
        ("scheduler: local_cwd\nenv: {OMP_NUM_THREADS: 1}", r"env must map names to strings"),
        ("scheduler: local_cwd\ngpus: 8", r"unknown keys \['gpus'\]"),
        ("nnodes: 2", r"'scheduler' is required"),
        (
            "scheduler: local_cwd\nstage_args: [data.wokers=4]",
            r"stage_args: data: unknown keys \['wokers'\]",
        ),
        ("scheduler: local_cwd\nstage_args: data.workers=4", r"stage_args must be a list"),
    ],
)
def test_bad_profile_is_named(tmp_path: Path, body: str, message: str) -> None:
    indented = "\n".join("    " + line for line in body.splitlines())
    path = write(tmp_path, f"profiles:\n  p:\n{indented}\n")
    with pytest.raises(ProfileError, match=message) as info:
        load_profiles(path)
    assert str(path) in str(info.value)


def test_missing_profile_lists_the_others() -> None:
    with pytest.raises(ProfileError, match=r"no profile 'aws'; profiles: \['kubernetes'"):
        load_profile("aws", REPO / "torchx.yaml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such file"):
        load_profiles(tmp_path / "torchx.yaml")
