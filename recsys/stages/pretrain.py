"""Stage ``pretrain``: the generative model learns to predict the next item (GPSD step 1).

    python -m recsys.stages.pretrain --config configs/ml100k/demo.yaml --out runs/demo/pretrain \
        data.train=data/ml100k/seq

Trains on a ``seq`` dataset (``data.train``) with sampled softmax, evaluates loss and next-item
hit rate on ``data.valid`` after every epoch when given, checkpoints as ``run`` says and resumes
from the last checkpoint after a crash. Writes ``weights/`` (tables and tower under stable
names, for ``transfer``), ``stage.json`` and ``DONE``.
"""

from __future__ import annotations

import torch

from recsys.checkpoint.weights import save_weights
from recsys.distributed.env import distributed
from recsys.stages import build
from recsys.stages.common import StageDir, arguments, fingerprint, parser, run_stage

NAME = "pretrain"


def main(argv: list[str] | None = None) -> dict:
    args, config = arguments(parser(NAME, __doc__.splitlines()[0]), argv)
    inputs = {"train": config.data.train, "valid": config.data.valid}
    with distributed() as env:
        meta = build.dataset_meta(config.data.train, "seq", "data.train")
        if config.data.valid:
            build.valid_meta(config.data.valid, "seq", meta, config.data.train)
        print_ = fingerprint(NAME, {}, config, inputs)
        stage = StageDir(args.out, NAME, args.force)
        stage.begin(inputs)
        torch.manual_seed(config.run.seed)  # the dense part starts the same on every run
        model = build.generative_model(config.model, meta)
        seed = config.run.seed
        train = build.loader(config.data.train, config.data, config.model, seed, train=True)
        valid = (
            build.loader(config.data.valid, config.data, config.model, seed, train=False)
            if config.data.valid
            else None
        )
        sharded, trainer = build.trainer(
            model, train, valid, config, env, str(stage.path), task="pretrain"
        )
        results = trainer.train()
        save_weights(sharded, stage.weights)
        return stage.finish(
            {
                "fingerprint": print_,
                "inputs": inputs,
                "config": config.to_dict(),
                "tables": [t.name for t in model.sparse.config.tables],
                "steps": trainer.step,
                "sharding": build.sharding(sharded),
                "results": results,
            }
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
