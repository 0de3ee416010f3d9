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

import torch

from recsys.checkpoint.weights import save_weights
from recsys.distributed.env import distributed
from recsys.stages import build
from recsys.stages.common import StageDir, arguments, fingerprint, parser, run_stage

NAME = "lum_pretrain"


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
        torch.manual_seed(config.run.seed)
        model = build.lum_model(config.model, config.lum, meta)
        seed = config.run.seed

        def loader(path: str, train: bool):
            return build.loader(path, config.data, config.model, seed, train=train, conditions=True)

        train = loader(config.data.train, True)
        valid = loader(config.data.valid, False) if config.data.valid else None
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
                "conditions": {name: meta.vocab[name] for name in meta.conditions},
                "tables": [t.name for t in model.sparse.config.tables],
                "steps": trainer.step,
                "sharding": build.sharding(sharded),
                "results": results,
            }
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
