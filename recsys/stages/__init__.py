"""The stages of GPSD and LUM, each a module run as ``python -m recsys.stages.<name>``."""

STAGES = (
    "pretrain",
    "transfer",
    "freeze",
    "finetune",
    "evaluate",
    "retrieve",
    "predict",
    "lum_pretrain",
    "lum_query",
    "lum_finetune",
)
"""Every stage, in the order a study runs them."""
