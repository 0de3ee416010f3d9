"""TorchX component: score raw-key requests with a finetuned model; predictions per rank.

    torchx run -s local_cwd components/predict.py:predict --model runs/tiny/finetune-st_sf \
        --requests data/requests.parquet --out runs/tiny/predict-st_sf
"""

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def predict(
    *overrides: str,
    model: str = "runs/finetune",
    requests: str = "",
    **job: object,
) -> AppDef:
    """Score requests (raw user, history and candidate keys) with a finetuned model.

    Args:
        overrides: config overrides section.key=value, e.g. data.batch_size=1024
        model: finished finetune stage directory (its weights and vocab/)
        requests: Parquet file or directory of requests (docs/serving.md)
        config: YAML stage config (data.batch_size, plan, run.resume)
        out: the stage's directory (predictions/, stage.json, DONE)
    """
    return stage_app("predict", **locals())
