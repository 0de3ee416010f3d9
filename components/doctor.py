"""TorchX component: check the recsys stack on every host of a job before training there.

Runs ``recsys doctor`` once per host: versions, accelerator, collective backends, and a real
2-process gloo job that shards a TorchRec EmbeddingCollection. The job fails on any host whose
stack cannot train, and its log says why and what to install.

    torchx run -s local_cwd components/doctor.py:doctor
    torchx run -s slurm -cfg partition=gpu components/doctor.py:doctor --nnodes 4
    torchx run -s local_cwd components/doctor.py:doctor --help

Run it from the repository root with the project's environment active (``. .venv/bin/activate``
after ``make setup``), so that ``python`` is the environment's interpreter.
"""

# TorchX reads the signature to build `--help` and parse arguments: it needs typing's
# Optional/Dict spelled out and real (not postponed) annotations.
from typing import Dict, Optional

import torchx.specs as specs


def doctor(
    nnodes: int = 1,
    image: str = "",
    h: Optional[str] = None,
    timeout: int = 300,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Check that every host of a job can train with recsys (``recsys doctor`` on each).

    Args:
        nnodes: number of hosts to check; one doctor runs on each
        image: container image holding the project (container schedulers only; local and
            Slurm schedulers run the working tree)
        h: TorchX named resource describing one host, e.g. aws_p4d.24xlarge
        timeout: seconds allowed for each host's 2-rank gloo job
        env: extra environment variables, e.g. OMP_NUM_THREADS=1
    """
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, got {nnodes}")
    resource = specs.resource(h=h) if h else specs.Resource(cpu=2, gpu=0, memMB=4096)
    return specs.AppDef(
        name="recsys-doctor",
        roles=[
            specs.Role(
                name="doctor",
                image=image,
                entrypoint="python",
                args=["-m", "recsys.cli", "doctor", "--timeout", str(timeout)],
                num_replicas=nnodes,
                resource=resource,
                env=dict(env or {}),
            )
        ],
    )
