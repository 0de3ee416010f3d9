"""Stage ``lum_finetune``: a ranker trained with the user model's answers as features (LUM
step 3).

    python -m recsys.stages.lum_finetune --config configs/ml100k/lum.yaml \
        --out runs/lum/lum_finetune-din-match data.train=data/ml100k/ctr_train \
        data.valid=data/ml100k/ctr_test lum.features=runs/lum/lum_query model.arch=din

Trains the CTR model ``model.arch`` (GPSD's Transformer ranker, DeepFM or DIN) from scratch
with BCE, every sample joined with its user's ``lum_query`` outputs (``lum.features``):
directly (``lum.direct``: the N·d outputs), by interest matching (``lum.matching``: each
output's cosine similarity with the candidate's item embedding), or both, fed to the
ranker's head beside its own representation. Without ``lum.features`` it is the ranker alone
(the DLRM baseline). Reports train and validation AUC, logloss, NE, calibration and gAUC per
epoch like ``finetune``. Writes ``weights/``, ``stage.json`` and ``DONE``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recsys.data.files import open_dataset
from recsys.distributed.env import distributed
from recsys.models import build as models
from recsys.models.lum_features import UserFeatures, WithFeatures
from recsys.stages import build
from recsys.stages.common import StageError, arguments, parser, read_stage, run_stage, start
from recsys.stages.training import Training

NAME = "lum_finetune"


def variant(features: str | None, direct: bool, matching: bool) -> str:
    """The row's name in reports: ``DLRM`` alone, ``+LUM`` (direct), ``+LUM match``
    (matching only), ``+LUM+match`` (both)."""
    if not features:
        return "DLRM"
    return {(True, False): "+LUM", (False, True): "+LUM match", (True, True): "+LUM+match"}[
        (direct, matching)
    ]


def train_users(path: str) -> np.ndarray:
    """The distinct users of a ``ctr`` dataset."""
    dataset = open_dataset(path)
    ids = [
        dataset.open_file(p).read(columns=["user_id"]).column(0).to_numpy() for p in dataset.parts
    ]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def main(argv: list[str] | None = None) -> dict:
    args, config = arguments(parser(NAME, __doc__.splitlines()[0]), argv)
    lum = config.lum
    inputs = {"train": config.data.train, "valid": config.data.valid, "features": lum.features}
    with distributed() as env:
        meta = build.training_meta(config.data, "ctr")
        features = None
        if lum.features and not (lum.direct or lum.matching):
            raise StageError("lum.features is set but lum.direct and lum.matching are both false")
        if lum.features and Path(config.data.train).name.endswith("_dense"):
            raise StageError(
                f"data.train={config.data.train} samples every position of a sequence; LUM's "
                "features come from the whole pretraining sequence, which holds those "
                "positions' targets (docs/lum.md): train on the one-target-per-user set"
            )
        if lum.features:
            if read_stage(lum.features, "lum.features")["stage"] != "lum_query":
                raise StageError(f"lum.features={lum.features} is not a lum_query stage")
            features = UserFeatures.load(f"{lum.features}/features", lum.direct, lum.matching)
            if len(features.items) != meta.vocab["item"]:
                raise StageError(
                    f"lum.features={lum.features} embeds {len(features.items)} items, "
                    f"data.train has {meta.vocab['item']}: ids would mean other items"
                )
        stage = start(NAME, args, config, inputs)
        model = models.ctr_model(config.model, meta, extra=features.width if features else 0)
        missing = (
            features.missing(torch.from_numpy(train_users(config.data.train))) if features else 0
        )
        wrap = (lambda plain: WithFeatures(plain, features)) if features else None
        run = Training(stage, model, config, env, "ctr", wrap=wrap)
        run.train()
        return run.finish(
            {
                "strategy": variant(lum.features, lum.direct, lum.matching),
                "features": features.width if features else 0,
                "users_without_features": missing,
            }
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
