"""Stage ``pretrain``: the generative model learns to predict the next item (GPSD step 1).

    python -m recsys.stages.pretrain --config configs/ml100k/demo.yaml --out runs/demo/pretrain \
        data.train=data/ml100k/seq

Trains on a ``seq`` dataset (``data.train``) with sampled softmax, evaluates loss and next-item
hit rate on ``data.valid`` after every epoch when given, checkpoints as ``run`` says and resumes
from the last checkpoint after a crash. Writes ``weights/`` (tables and tower under stable
names, for ``transfer``), ``stage.json`` and ``DONE``.
"""

from __future__ import annotations

from recsys.distributed.env import distributed
from recsys.models import build as models
from recsys.stages import build
from recsys.stages.common import arguments, parser, run_stage, start
from recsys.stages.training import Training

NAME = "pretrain"


def main(argv: list[str] | None = None) -> dict:
    args, config = arguments(parser(NAME, __doc__.splitlines()[0]), argv)
    inputs = {"train": config.data.train, "valid": config.data.valid}
    with distributed() as env:
        meta = build.training_meta(config.data, "seq")
        stage = start(NAME, args, config, inputs)
        model = models.generative_model(config.model, meta)
        run = Training(stage, model, config, env, task="pretrain")
        run.train()
        return run.finish({"tables": [t.name for t in model.sparse.config.tables]})


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
