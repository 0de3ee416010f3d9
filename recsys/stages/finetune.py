"""Stage ``finetune``: train the CTR model from a transfer or freeze stage (GPSD steps 3–4).

    python -m recsys.stages.finetune --init runs/demo/freeze-st --config configs/ml100k/demo.yaml \
        --out runs/demo/finetune-st_sf data.train=data/ml100k/ctr_train \
        data.valid=data/ml100k/ctr_test

Loads every weight of the ``--init`` stage (unless resuming from this stage's own checkpoint),
trains with BCE on ``data.train``, reports train and validation AUC, logloss, NE, calibration
and gAUC and their gap after every epoch, and at the end checks that every frozen table's
digest equals the one the freeze stage recorded: a changed frozen table stops the stage with
its name. Writes
``weights/``, ``stage.json`` (strategy, per-epoch metrics) and ``DONE``.
"""

from __future__ import annotations

from recsys.checkpoint.weights import load_weights, named_weights, table_digests
from recsys.distributed.env import distributed
from recsys.models import build as models
from recsys.stages import build
from recsys.stages.common import StageError, arguments, parser, read_stage, run_stage, start
from recsys.stages.training import Training

NAME = "finetune"


def main(argv: list[str] | None = None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="finished transfer or freeze stage")
    args, config = arguments(p, argv)
    inputs = {"train": config.data.train, "valid": config.data.valid, "init": args.init}
    with distributed() as env:
        source = read_stage(args.init, "--init", of=("transfer", "freeze"))
        meta = build.training_meta(config.data, "ctr")
        stage = start(NAME, args, config, inputs)
        frozen = tuple(source["frozen"])
        model = models.recorded_ctr_model(config.model, meta, source)
        run = Training(stage, model, config, env, "ctr")
        sharded = run.sharded
        if not (config.run.resume and run.trainer.checkpoints.latest()):  # not a resumed run
            load_weights(sharded, f"{args.init}/weights", named_weights(sharded))
        run.train()
        digests = table_digests(sharded, frozen)
        changed = sorted(t for t in frozen if digests[t] != source["digests"].get(t))
        if changed:
            raise StageError(
                f"frozen tables {changed} changed during finetuning (digests "
                f"{ {t: digests[t] for t in changed} }, recorded by {args.init}: "
                f"{ {t: source['digests'].get(t) for t in changed} })"
            )
        return run.finish(
            {
                "strategy": source["strategy"],
                "transferred": source["transferred"],
                "frozen": list(frozen),
                "frozen_dtype": source.get("frozen_dtype", "fp32"),
                "digests": digests,
            }
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
