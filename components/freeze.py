"""TorchX component: freeze the transferred embedding tables (SF) and record their digests.

    torchx run -s local_cwd components/freeze.py:freeze --init runs/tiny/transfer-st \
        --config configs/tiny.yaml --out runs/tiny/freeze-st data.train=data/tiny/ctr_train
"""

from typing import Optional  # TorchX reads typing's Optional, not `str | None`

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def freeze(
    *overrides: str,
    init: str = "runs/transfer",
    tables: Optional[str] = None,
    **job: object,
) -> AppDef:
    """Freeze embedding tables of a transfer stage for finetuning.

    Args:
        overrides: config overrides section.key=value, e.g. data.train=data/x/ctr_train
        init: finished transfer stage directory
        tables: comma-separated tables to freeze; empty: every table (--sparse)
        out: the stage's directory (weights/, stage.json, DONE)
    """
    # --sparse (every table) when no list of tables is given, right after --init
    return stage_app("freeze", **{"init": init, "sparse": not tables, **locals()})
