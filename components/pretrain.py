"""TorchX component: GPSD pretraining (``recsys.stages.pretrain``) as a distributed job.

    torchx run -s local_cwd components/pretrain.py:pretrain --config configs/tiny.yaml \
        --out runs/tiny/pretrain data.train=data/tiny/seq
    torchx run -s local_cwd components/pretrain.py:pretrain --help
"""

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def pretrain(*overrides: str, **job: object) -> AppDef:
    """Pretrain the generative model (next-item prediction) on a seq dataset.

    Args:
        overrides: config overrides section.key=value, e.g. data.train=data/x/seq run.epochs=2
    """
    return stage_app("pretrain", **locals())
