"""What the stages would submit to Kubernetes, checked offline (no API server here).

``torchx run --dryrun -s kubernetes`` prints a Volcano Job per component: its envelope must
validate against our schema of ``batch.volcano.sh/v1alpha1`` Job (volcano_job.schema.json,
written from Volcano's API types), each pod template against the Kubernetes API schema
(kubernetes-validate, offline), and the pods must ask for A100 hosts, run torchrun on the
job's shape and carry the job's environment. The pipeline's own kubernetes jobs (the
``kubernetes`` profile of torchx.yaml) are checked the same way.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from recsys.pipelines.gpsd import Study, appdef, component_args, plan
from recsys.pipelines.profiles import ProfileError, load_profile, load_profiles
from recsys.stages.appdef import STAGES

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((Path(__file__).parent / "volcano_job.schema.json").read_text())
K8S_VERSION = "1.29"  # the Kubernetes API the pod templates must fit
TORCHX = str(Path(sys.executable).parent / "torchx")


def dryrun(stage: str, *args: str) -> dict:
    """The Volcano Job ``torchx run --dryrun -s kubernetes`` prints for a stage component."""
    done = subprocess.run(
        [TORCHX, "run", "--workspace", "", "--dryrun", "-s", "kubernetes",
         "-cfg", "queue=gpu,namespace=recsys", f"components/{stage}.py:{stage}", *args],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout.split("=== SCHEDULER REQUEST ===", 1)[1])


def validate(job: dict) -> None:
    """The envelope against our Volcano schema, every pod template against Kubernetes'."""
    jsonschema.validate(job, SCHEMA)
    for task in job["spec"]["tasks"]:
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": task["name"]},
            "template": task["template"],
        }
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def container(task: dict) -> dict:
    (only,) = task["template"]["spec"]["containers"]
    return only


A100_ARGS = (
    *("-j", "2x8", "--h", "aws_p4d.24xlarge", "--image", "recsys:cuda"),
    *("--env", "NCCL_DEBUG=WARN,OMP_NUM_THREADS=8", "--out", "runs/k8s/x", "run.epochs=2"),
)


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(STAGES, pool.map(lambda s: dryrun(s, *A100_ARGS), STAGES), strict=True))


@pytest.mark.parametrize("stage", STAGES)
def test_each_component_is_a_valid_volcano_job_on_a100_hosts(jobs: dict, stage: str) -> None:
    job = jobs[stage]
    validate(job)
    assert job["spec"]["queue"] == "gpu" and job["spec"]["schedulerName"] == "volcano"
    # TorchX drops characters Kubernetes names refuse ('_' of lum_query) from task names.
    role = stage.replace("_", "")
    assert [t["name"] for t in job["spec"]["tasks"]] == [f"{role}-0", f"{role}-1"]
    for task in job["spec"]["tasks"]:
        spec = task["template"]["spec"]
        assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
        box = container(task)
        assert box["image"] == "recsys:cuda"
        limits = box["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8" and limits["cpu"] == "96000m"
        assert int(limits["memory"].rstrip("M")) >= 1100 * 1024  # 1152 GiB host, minus slack
        assert box["command"][:2] == ["bash", "-c"]
        command = box["command"][2]
        assert command.startswith("python -m recsys.distributed.torchrun ")
        assert f"-m recsys.stages.{stage} " in command
        assert "--nnodes 2 --nproc_per_node 8" in command and "--max_restarts 0" in command
        assert command.endswith("--out runs/k8s/x run.epochs=2")
        env = {e["name"]: e.get("value") for e in box["env"]}
        assert env["NCCL_DEBUG"] == "WARN" and env["OMP_NUM_THREADS"] == "8"
        assert env["RECSYS_LOG_LEVEL"] == "INFO"
    # Replica 1 finds replica 0 through Volcano's hosts variable (the svc plugin).
    rendezvous = container(job["spec"]["tasks"][1])["command"][2]
    assert re.search(
        rf"--rdzv_endpoint \$\{{VC_{role.upper()}_0_HOSTS:=localhost\}}:29500", rendezvous
    )
    assert "svc" in job["spec"]["plugins"]


def test_explicit_gpu_limits_without_a_named_resource() -> None:
    job = dryrun("finetune", "-j", "1x4", "--gpu", "4", "--cpu", "40", "--memMB", "200000",
                 "--image", "recsys:cuda")  # fmt: skip
    validate(job)
    (task,) = job["spec"]["tasks"]
    limits = container(task)["resources"]["limits"]
    assert limits == {"cpu": "40000m", "memory": "200000M", "nvidia.com/gpu": "4"}
    assert "--nnodes 1 --nproc_per_node 4" in container(task)["command"][2]


@pytest.mark.filterwarnings("ignore::UserWarning:torchx.schedulers.kubernetes_scheduler")
def test_the_pipelines_kubernetes_jobs_validate() -> None:
    from torchx.runner import get_runner

    profile = load_profile("kubernetes", REPO / "torchx.yaml")
    steps = plan(Study(experiment="runs/k8s", data="data/d", strategies=("NT", "ST&SF")))
    with get_runner() as runner:
        for step in steps:
            step.overrides = [*profile.stage_args, *step.overrides]
            app = appdef(step, component_args(step, profile, force=False))
            info = runner.dryrun(app, "kubernetes", cfg=dict(profile.scheduler_args))
            job = yaml.safe_load(str(info))
            validate(job)
            assert len(job["spec"]["tasks"]) == profile.nnodes
            box = container(job["spec"]["tasks"][0])
            assert box["image"] == profile.image
            command = box["command"][2]
            assert f"--nnodes {profile.nnodes} --nproc_per_node {profile.nproc_per_node}" in command
            assert "data.workers=4" in command and f"--out {step.out}" in command
            assert {"name": "NCCL_DEBUG", "value": "WARN"} in box["env"]


def test_the_schemas_reject_what_kubernetes_and_volcano_would() -> None:
    job = dryrun("pretrain", "--image", "recsys:cuda")
    validate(job)
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["task"] = misspelt["spec"].pop("tasks")
    with pytest.raises(jsonschema.ValidationError, match="'tasks' is a required property"):
        jsonschema.validate(misspelt, SCHEMA)
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["tasks"][0]["replicas"] = "1"
    with pytest.raises(jsonschema.ValidationError, match="'1' is not of type 'integer'"):
        jsonschema.validate(wrong_type, SCHEMA)
    bad_pod = copy.deepcopy(job)
    container(bad_pod["spec"]["tasks"][0])["resources"]["limits"] = ["nvidia.com/gpu"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad_pod)


def test_a_kubernetes_profile_without_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "torchx.yaml"
    path.write_text(
        "profiles:\n  k8s:\n    scheduler: kubernetes\n    scheduler_args: {queue: q}\n"
    )
    with pytest.raises(ProfileError, match=r"profile 'k8s': the kubernetes scheduler runs a "
                       r"container image: set 'image'"):  # fmt: skip
        load_profiles(path)
    assert load_profile("kubernetes", REPO / "torchx.yaml").image  # the repository's has one
