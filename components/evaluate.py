"""TorchX component: score a ctr dataset with a finetuned model; predictions and metrics.

    torchx run -s local_cwd components/evaluate.py:evaluate --model runs/tiny/finetune-st_sf \
        --data data/tiny/ctr_test --out runs/tiny/evaluate-st_sf
"""

# TorchX reads the signature to build `--help` and parse arguments: it needs typing's
# Optional/Dict spelled out and real (not postponed) annotations.
from typing import Dict, Optional

import torchx.specs as specs

from recsys.stages.appdef import options, stage_app


def evaluate(
    *overrides: str,
    model: str = "runs/finetune",
    data: str = "",
    config: Optional[str] = None,
    out: str = "runs/evaluate",
    force: bool = False,
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    image: str = "",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """Score a ctr dataset with a finetuned model: predictions Parquet and metrics.

    Args:
        overrides: config overrides section.key=value, e.g. data.batch_size=1024
        model: finished finetune stage directory
        data: ctr dataset to score
        config: YAML stage config (data.batch_size, plan)
        out: the stage's directory (predictions/, metrics.json, stage.json, DONE)
        force: run again over a finished stage
        j: NNODESxNPROC, hosts × processes per host (e.g. 1x2, 4x8)
        h: TorchX named resource of one host (e.g. aws_p4d.24xlarge); overrides cpu/gpu/memMB
        cpu: CPUs per host
        gpu: GPUs per host
        memMB: memory per host in MB
        image: container image holding the project (kubernetes); empty: the working tree
        env: extra environment variables, e.g. OMP_NUM_THREADS=4
        max_retries: restarts after a failure, each resuming from the last checkpoint:
            torchrun restarts all workers in place; schedulers that retry whole jobs
            (Slurm requeue, Volcano) do so on top
    """
    return stage_app(
        "evaluate",
        [*options(model=model, data=data, config=config, out=out, force=force), *overrides],
        j=j,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        image=image,
        env=env,
        max_retries=max_retries,
    )
