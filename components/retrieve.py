"""TorchX component: each user's top K items over the whole catalogue from a pretrain stage;
full-catalogue HR@K, NDCG@K and MRR on a ctr dataset's held-out items.

    torchx run -s local_cwd components/retrieve.py:retrieve --model runs/tiny/pretrain \
        --data data/tiny/ctr_test --out runs/tiny/retrieve --k 10
"""

from recsys.stages.appdef import AppDef, stage_app, stage_component


@stage_component
def retrieve(
    *overrides: str,
    model: str = "runs/pretrain",
    data: str = "",
    k: int = 10,
    exclude_seen: bool = True,
    **job: object,
) -> AppDef:
    """Top K items per user over the whole catalogue, and their full-catalogue metrics.

    Args:
        overrides: config overrides section.key=value, e.g. data.batch_size=1024
        model: finished pretrain stage directory
        data: seq dataset (answers after each sequence) or ctr dataset (label-1 rows, evaluated)
        k: items per user
        exclude_seen: leave each history's items out of its answers
        config: YAML stage config (data.batch_size, plan)
        out: the stage's directory (recommendations/, metrics.json, stage.json, DONE)
    """
    options = {"model": model, "data": data, "k": k, "no_exclude_seen": not exclude_seen}
    return stage_app("retrieve", overrides, job, **options)
