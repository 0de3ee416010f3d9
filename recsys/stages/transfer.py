"""Stage ``transfer``: the CTR model, started from chosen pretrained parameters (GPSD step 2).

    python -m recsys.stages.transfer --strategy ST --pretrained runs/demo/pretrain \
        --config configs/ml100k/demo.yaml --out runs/demo/transfer-st \
        data.train=data/ml100k/ctr_train

Builds the CTR model for ``data.train`` (a ``ctr`` dataset: its vocabularies size the tables)
on this job's world size and plan, and loads into it, through DCP (so pretraining may have
used another world size and plan):

- ``NT``: nothing (every parameter starts from its initialisation);
- ``ST``: the embedding tables, by name (sparse transfer);
- ``FT``: the tables and the Transformer tower (full transfer).

The segment embedding and the MLP head exist only in the CTR model and always start fresh.
A table or tower weight missing on either side, or of another shape, stops the stage with
each one named. Writes ``weights/`` (the whole CTR model), ``stage.json`` (what was
transferred) and ``DONE``.
"""

from __future__ import annotations

from recsys.checkpoint.weights import load_weights, named_weights, save_weights
from recsys.distributed.env import distributed
from recsys.models import build as models
from recsys.stages import build
from recsys.stages.common import StageError, arguments, parser, read_stage, run_stage, start

NAME = "transfer"
STRATEGIES = ("NT", "ST", "FT")


def transferred(strategy: str, names: list[str]) -> list[str]:
    """The weight names a strategy takes from pretraining, among a CTR model's ``names``."""
    if strategy == "NT":
        return []
    tables = [n for n in names if n.startswith("table/")]
    if strategy == "ST":
        return tables
    if strategy == "FT":
        return tables + [n for n in names if n.startswith("dense/tower.")]
    raise StageError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def main(argv: list[str] | None = None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--strategy", required=True, type=str.upper, choices=STRATEGIES)
    p.add_argument("--pretrained", help="finished pretrain stage (not needed for NT)")
    args, config = arguments(p, argv)
    if args.strategy != "NT" and not args.pretrained:
        p.error(f"--strategy {args.strategy} needs --pretrained DIR")
    pretrained = args.pretrained if args.strategy != "NT" else None
    inputs = {"train": config.data.train, "pretrained": pretrained}
    with distributed() as env:
        meta = build.dataset_meta(config.data.train, "ctr", "data.train")
        if pretrained:
            read_stage(pretrained, "--pretrained", of=("pretrain",))
        stage = start(NAME, args, config, inputs, {"strategy": args.strategy})
        model = build.place(models.ctr_model(config.model, meta), config.plan, env)
        names = transferred(args.strategy, sorted(named_weights(model)))
        if pretrained:
            load_weights(model, f"{pretrained}/weights", names)
        save_weights(model, stage.weights)
        return stage.finish(
            {
                "strategy": args.strategy,
                "transferred": names,
                "frozen": [],
                "digests": {},
            }
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
