"""TorchX component: score a ctr dataset with a finetuned model; predictions and metrics.

    torchx run -s local_cwd components/evaluate.py:evaluate --model runs/tiny/finetune-st_sf \
        --data data/tiny/ctr_test --out runs/tiny/evaluate-st_sf
"""

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def evaluate(
    *overrides: str,
    model: str = "runs/finetune",
    data: str = "",
    **job: object,
) -> AppDef:
    """Score a ctr dataset with a finetuned model: predictions Parquet and metrics.

    Args:
        overrides: config overrides section.key=value, e.g. data.batch_size=1024
        model: finished finetune stage directory
        data: ctr dataset to score
        config: YAML stage config (data.batch_size, plan)
        out: the stage's directory (predictions/, metrics.json, stage.json, DONE)
    """
    return stage_app("evaluate", **locals())
