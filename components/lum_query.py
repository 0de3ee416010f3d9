"""TorchX component: LUM step 2, the group query of every user (``lum_query``).

    torchx run -s local_cwd components/lum_query.py:lum_query --init runs/tiny/lum_pretrain \
        --out runs/tiny/lum_query data.train=data/tiny/seq
    torchx run -s local_cwd components/lum_query.py:lum_query --help
"""

# TorchX reads the signature to build `--help` and parse arguments: it needs typing's
# Optional/Dict spelled out and real (not postponed) annotations.
from typing import Dict, Optional

import torchx.specs as specs

from recsys.stages.appdef import options, stage_app


def lum_query(
    *overrides: str,
    init: str = "runs/lum_pretrain",
    config: Optional[str] = None,
    out: str = "runs/lum_query",
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
    """Ask the user model about every user of a seq dataset under N conditions; write features.

    Args:
        overrides: config overrides section.key=value, e.g. lum.temperature=0.1
        init: finished lum_pretrain stage directory
        config: YAML stage config
        out: the stage's directory (features/, stage.json, DONE)
        force: run again over a finished stage
        j: NNODESxNPROC, hosts × processes per host (e.g. 1x2, 4x8)
        h: TorchX named resource of one host (e.g. aws_p4d.24xlarge); overrides cpu/gpu/memMB
        cpu: CPUs per host
        gpu: GPUs per host
        memMB: memory per host in MB
        image: container image holding the project (kubernetes); empty: the working tree
        env: extra environment variables, e.g. OMP_NUM_THREADS=4
        max_retries: restarts after a failure (the query starts over: it keeps no
            checkpoint); torchrun restarts all workers in place; schedulers that retry
            whole jobs (Slurm requeue, Volcano) do so on top
    """
    return stage_app(
        "lum_query",
        [*options(init=init, config=config, out=out, force=force), *overrides],
        j=j,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        image=image,
        env=env,
        max_retries=max_retries,
    )
