"""TorchX component: LUM step 3, a ranker fed the user model's answers (``lum_finetune``).

    torchx run -s local_cwd components/lum_finetune.py:lum_finetune --out runs/tiny/lum-din \
        data.train=data/tiny/ctr_train data.valid=data/tiny/ctr_test model.arch=din \
        lum.features=runs/tiny/lum_query
    torchx run -s local_cwd components/lum_finetune.py:lum_finetune --help
"""

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def lum_finetune(*overrides: str, **job: object) -> AppDef:
    """Train a ranker with LUM features (lum.features; none: the ranker alone) and report AUC.

    Args:
        overrides: config overrides section.key=value, e.g. lum.temperature=0.1
    """
    return stage_app("lum_finetune", **locals())
