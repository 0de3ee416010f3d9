"""Stage ``lum_pretrain``: LUM's user model learns next-condition-item prediction (LUM step 1).

    python -m recsys.stages.lum_pretrain --config configs/ml100k/lum.yaml \
        --out runs/lum/lum_pretrain data.train=data/ml100k/seq

Trains ``recsys.models.lum.LUM`` on a ``seq`` dataset whose metadata declares condition
features (``liked`` for MovieLens): each event is a condition token and an item token, and
the output at every condition token predicts its item with InfoNCE over in-batch (and
``lum.negatives`` shared sampled) negatives at ``lum.temperature``; ``lum.pack`` packs users
into rows of that many tokens. Evaluates loss and hit rate on ``data.valid`` when given,
checkpoints and resumes like ``pretrain``. Writes ``weights/``, ``stage.json`` and ``DONE``.
"""

from __future__ import annotations

from recsys.distributed.env import distributed
from recsys.models import build as models
from recsys.stages import build
from recsys.stages.common import arguments, parser, run_stage, start
from recsys.stages.training import Training

NAME = "lum_pretrain"


def main(argv: list[str] | None = None) -> dict:
    args, config = arguments(parser(NAME, __doc__.splitlines()[0]), argv)
    inputs = {"train": config.data.train, "valid": config.data.valid}
    with distributed() as env:
        meta = build.training_meta(config.data, "seq")
        stage = start(NAME, args, config, inputs)
        model = models.lum_model(config.model, config.lum, meta)
        run = Training(stage, model, config, env, task="pretrain", conditions=True)
        run.train()
        return run.finish(
            {
                "conditions": {name: meta.vocab[name] for name in meta.conditions},
                "tables": [t.name for t in model.sparse.config.tables],
            }
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
