"""Stage ``freeze``: fix the transferred embedding tables for finetuning (GPSD's "SF").

    python -m recsys.stages.freeze --sparse --init runs/demo/transfer-st \
        --config configs/ml100k/demo.yaml --out runs/demo/freeze-st data.train=data/ml100k/ctr_train

Rebuilds the CTR model of a finished ``transfer`` stage with the chosen tables frozen
(``--sparse``: every table; ``--tables item,category``: those), so that they get no gradient
and no optimizer state in finetuning, stores them as ``freeze.dtype`` says (fp32; fp16 for
half the memory; int8 row-wise, quantized here from the transferred fp32 rows, each rank
reading only its block), loads every weight, and records a digest per frozen table (the same for
any world size and sharding plan). ``finetune`` checks the digests at its
end. Writes ``weights/``, ``stage.json`` (strategy ``ST&SF`` / ``FT&SF``, frozen tables, their
dtype, digests) and ``DONE``.
"""

from __future__ import annotations

from recsys.checkpoint.weights import (
    load_quantized,
    load_weights,
    named_weights,
    save_weights,
    table_digests,
)
from recsys.distributed.env import distributed
from recsys.models import build as models
from recsys.stages import build
from recsys.stages.common import StageError, arguments, parser, read_stage, run_stage, start

NAME = "freeze"


def main(argv: list[str] | None = None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="finished transfer stage")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sparse", action="store_true", help="freeze every embedding table")
    which.add_argument("--tables", help="comma-separated tables to freeze")
    args, config = arguments(p, argv)
    with distributed() as env:
        source = read_stage(args.init, "--init", of=("transfer",))
        meta = build.dataset_meta(config.data.train, "ctr", "data.train")
        tables = ["item", *models.side_features(meta)]
        frozen = sorted(tables if args.sparse else args.tables.split(","))
        unknown = sorted(set(frozen) - set(tables))
        if unknown:
            raise StageError(f"--tables: no table {unknown}; the CTR model has {sorted(tables)}")
        inputs = {"train": config.data.train, "init": args.init}
        stage = start(NAME, args, config, inputs, {"tables": args.tables or "all"})
        dtype = config.freeze.dtype
        model = models.ctr_model(config.model, meta, tuple(frozen), frozen_dtype=dtype)
        model = build.place(model, config.plan, env)
        weights = f"{args.init}/weights"
        quantized = load_quantized(model, weights)  # int8 tables: fp32 rows quantized
        names = [n for n in named_weights(model) if n.split("/scale_bias")[0] not in quantized]
        load_weights(model, weights, names)
        digests = table_digests(model, frozen)
        save_weights(model, stage.weights)
        return stage.finish(
            {
                "strategy": f"{source['strategy']}&SF",
                "transferred": source["transferred"],
                "frozen": frozen,
                "frozen_dtype": dtype,
                "digests": digests,
            }
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
