"""TorchX component: LUM step 2, the group query of every user (``lum_query``).

    torchx run -s local_cwd components/lum_query.py:lum_query --init runs/tiny/lum_pretrain \
        --out runs/tiny/lum_query data.train=data/tiny/seq
    torchx run -s local_cwd components/lum_query.py:lum_query --help
"""

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def lum_query(
    *overrides: str,
    init: str = "runs/lum_pretrain",
    **job: object,
) -> AppDef:
    """Ask the user model about every user of a seq dataset under N conditions; write features.

    Args:
        overrides: config overrides section.key=value, e.g. lum.temperature=0.1
        init: finished lum_pretrain stage directory
        out: the stage's directory (features/, stage.json, DONE)
        max_retries: restarts after a failure (the query starts over: it keeps no
            checkpoint); torchrun restarts all workers in place; schedulers that retry
            whole jobs (Slurm requeue, Volcano) do so on top
    """
    return stage_app("lum_query", **locals())
