"""TorchX component: finetune the CTR model and report AUC, logloss and gAUC every epoch.

    torchx run -s local_cwd components/finetune.py:finetune --init runs/tiny/freeze-st \
        --config configs/tiny.yaml --out runs/tiny/finetune-st_sf \
        data.train=data/tiny/ctr_train data.valid=data/tiny/ctr_test
"""

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def finetune(
    *overrides: str,
    init: str = "runs/freeze",
    **job: object,
) -> AppDef:
    """Finetune the CTR model from a transfer or freeze stage.

    Args:
        overrides: config overrides section.key=value, e.g. data.valid=data/x/ctr_test
        init: finished transfer or freeze stage directory
    """
    return stage_app("finetune", **locals())
