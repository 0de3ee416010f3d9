"""TorchX component: LUM step 1, next-condition-item pretraining (``lum_pretrain``).

    torchx run -s local_cwd components/lum_pretrain.py:lum_pretrain --config configs/tiny.yaml \
        --out runs/tiny/lum_pretrain data.train=data/tiny/seq lum.pack=100
    torchx run -s local_cwd components/lum_pretrain.py:lum_pretrain --help
"""

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def lum_pretrain(*overrides: str, **job: object) -> AppDef:
    """Pretrain LUM's user model (condition/item tokens, InfoNCE) on a seq dataset with conditions.

    Args:
        overrides: config overrides section.key=value, e.g. lum.temperature=0.1
    """
    return stage_app("lum_pretrain", **locals())
