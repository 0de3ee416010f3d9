"""TorchX component: build the CTR model from pretrained parameters (NT, ST or FT).

    torchx run -s local_cwd components/transfer.py:transfer --strategy ST \
        --pretrained runs/tiny/pretrain --config configs/tiny.yaml --out runs/tiny/transfer-st \
        data.train=data/tiny/ctr_train
"""

from typing import Optional  # TorchX reads typing's Optional, not `str | None`

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def transfer(
    *overrides: str,
    strategy: str = "ST",
    pretrained: Optional[str] = None,
    **job: object,
) -> AppDef:
    """Build the CTR model and load the chosen pretrained parameters into it.

    Args:
        overrides: config overrides section.key=value, e.g. data.train=data/x/ctr_train
        strategy: NT (nothing), ST (embedding tables) or FT (tables and tower)
        pretrained: finished pretrain stage directory (not needed for NT)
        out: the stage's directory (weights/, stage.json, DONE)
    """
    return stage_app("transfer", **locals())
