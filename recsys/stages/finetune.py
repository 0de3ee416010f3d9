"""Stage ``finetune``: train the CTR model from a transfer or freeze stage (GPSD steps 3–4).

    python -m recsys.stages.finetune --init runs/demo/freeze-st --config configs/ml100k/demo.yaml \
        --out runs/demo/finetune-st_sf data.train=data/ml100k/ctr_train \
        data.valid=data/ml100k/ctr_test

Loads every weight of the ``--init`` stage (unless resuming from this stage's own checkpoint),
trains with BCE on ``data.train``, reports train and validation AUC, logloss and gAUC and their
gap after every epoch, and at the end checks that every frozen table's digest equals the one
the freeze stage recorded: a changed frozen table stops the stage with its name. Writes
``weights/``, ``stage.json`` (strategy, per-epoch metrics) and ``DONE``.
"""

from __future__ import annotations

import json

import torch

from recsys.checkpoint.weights import load_weights, named_weights, save_weights, table_digests
from recsys.distributed.env import distributed
from recsys.stages import build
from recsys.stages.common import (
    StageDir,
    StageError,
    arguments,
    fingerprint,
    parser,
    read_stage,
    run_stage,
)

NAME = "finetune"


def epoch_history(run_dir) -> list[dict]:
    """Each epoch's last record in the run's metrics.jsonl (a resumed run may repeat one)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    epochs: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "epoch":
            epochs[int(record["epoch"])] = record
    return [epochs[k] for k in sorted(epochs)]


def main(argv: list[str] | None = None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="finished transfer or freeze stage")
    args, config = arguments(p, argv)
    inputs = {"train": config.data.train, "valid": config.data.valid, "init": args.init}
    with distributed() as env:
        source = read_stage(args.init, "--init")
        if source["stage"] not in ("transfer", "freeze"):
            raise StageError(f"--init {args.init} is a {source['stage']} stage")
        meta = build.dataset_meta(config.data.train, "ctr", "data.train")
        if config.data.valid:
            build.valid_meta(config.data.valid, "ctr", meta, config.data.train)
        print_ = fingerprint(NAME, {}, config, inputs)
        stage = StageDir(args.out, NAME, args.force)
        stage.begin(inputs)
        frozen = tuple(source["frozen"])
        torch.manual_seed(config.run.seed)
        model = build.ctr_model(config.model, meta, frozen)
        seed = config.run.seed
        train = build.loader(config.data.train, config.data, config.model, seed, train=True)
        valid = (
            build.loader(config.data.valid, config.data, config.model, seed, train=False)
            if config.data.valid
            else None
        )
        sharded, trainer = build.trainer(
            model, train, valid, config, env, str(stage.path), task="ctr"
        )
        if not (config.run.resume and trainer.checkpoints.latest()):  # not a resumed run
            load_weights(sharded, f"{args.init}/weights", named_weights(sharded))
        results = trainer.train()
        digests = table_digests(sharded, frozen)
        changed = sorted(t for t in frozen if digests[t] != source["digests"].get(t))
        if changed:
            raise StageError(
                f"frozen tables {changed} changed during finetuning (digests "
                f"{ {t: digests[t] for t in changed} }, recorded by {args.init}: "
                f"{ {t: source['digests'].get(t) for t in changed} })"
            )
        save_weights(sharded, stage.weights)
        return stage.finish(
            {
                "fingerprint": print_,
                "inputs": inputs,
                "config": config.to_dict(),
                "strategy": source["strategy"],
                "transferred": source["transferred"],
                "frozen": list(frozen),
                "digests": digests,
                "steps": trainer.step,
                "sharding": build.sharding(sharded),
                "results": results,
                "epochs": epoch_history(stage.path) if env.is_main else [],
            }
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
