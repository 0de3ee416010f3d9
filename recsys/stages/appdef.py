"""The TorchX ``AppDef`` of a stage: ``torchrun -m recsys.stages.<stage>`` on NNODES×NPROC.

This module owns what every component in ``components/`` shares, so that each component file
stays a typed signature with a docstring. It builds on ``torchx.components.dist.ddp``. When no
image is given (local_cwd and Slurm run the working tree) and TorchX itself runs from a
virtual environment, the job's Python is that environment's, so that
``.venv/bin/torchx run -s local_cwd ...`` works without activating anything. torchrun runs
as ``python -m recsys.distributed.torchrun`` (torchrun, with a failed job told in one line).
``max_retries`` also goes to torchrun as ``--max_restarts``: after a worker dies, torchrun
restarts all of the job's workers, which resume from the last checkpoint (local schedulers
ignore TorchX's own retries).
"""

from __future__ import annotations

import sys

import torchx.specs as specs
from torchx.components.dist import ddp

STAGES = (
    "pretrain",
    "transfer",
    "freeze",
    "finetune",
    "evaluate",
    "lum_pretrain",
    "lum_query",
    "lum_finetune",
)


def stage_app(
    stage: str,
    stage_args: list[str],
    *,
    j: str,
    h: str | None,
    cpu: int,
    gpu: int,
    memMB: int,
    image: str,
    env: dict[str, str] | None,
    max_retries: int,
) -> specs.AppDef:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    _check_job(j, h)
    app = ddp(
        *stage_args,
        m=f"recsys.stages.{stage}",
        image=image or "recsys",
        name=f"recsys-{stage}",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env={"RECSYS_LOG_LEVEL": "INFO", **(env or {})},
        max_retries=max_retries,
    )
    # torchrun restarts every worker of the job after one fails (they resume from the last
    # checkpoint): local schedulers ignore TorchX's max_retries, so torchrun is told too. It
    # runs through recsys.distributed.torchrun, which tells a failed job in one line.
    python = "python"
    if not image and sys.prefix != sys.base_prefix:
        python = sys.executable  # the venv's, so nothing needs activating
    launcher = f"{python} -m recsys.distributed.torchrun --max_restarts {max_retries}"
    for role in app.roles:  # ddp runs `bash -c "torchrun ..."`
        role.args = [
            f"{launcher}{a[len('torchrun') :]}" if a.startswith("torchrun ") else a
            for a in role.args
        ]
    return app


def _check_job(j: str, h: str | None) -> None:
    """The job's shape and host type, or one line and exit code 2: ``torchx run`` shows a
    traceback for any other error of a component."""
    from torchx.components.dist import parse_nnodes

    try:
        min_nodes, max_nodes, nproc, _ = parse_nnodes(j)
    except ValueError:
        raise SystemExit(f"error: --j {j!r}: expected NNODESxNPROC_PER_NODE, e.g. 2x8") from None
    if min(min_nodes, max_nodes, nproc) < 1:
        raise SystemExit(f"error: --j {j!r}: nodes and processes per node must be >= 1")
    if h is not None:
        try:
            specs.resource(h=h)
        except KeyError:
            raise SystemExit(
                f"error: --h {h!r}: not a named resource of TorchX (e.g. aws_p4d.24xlarge, "
                "or one registered by an entry point)"
            ) from None


def options(**values: object) -> list[str]:
    """``--name value`` for each option that is set (``True`` flags as ``--name``)."""
    out = []
    for name, value in values.items():
        if value is None or value is False or value == "":
            continue
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out
