"""Stage ``evaluate``: score a ``ctr`` dataset with a finetuned model, on any world size.

    python -m recsys.stages.evaluate --model runs/demo/finetune-st_sf --data data/ml100k/ctr_test \
        --out runs/demo/evaluate-st_sf

Rebuilds the model of a finished ``finetune`` stage (its recorded ``model`` section and frozen
tables), loads its weights on this job's world size and plan, scores every sample of
``--data`` once, and writes ``predictions/part-<rank>.parquet`` (user_id, candidate_item,
label, score = click probability), ``metrics.json`` (AUC, logloss, NE, calibration, gAUC, samples),
``stage.json`` and ``DONE``. ``--config`` may set ``data.batch_size`` and ``plan``. Scoring
no sample, or a NaN or infinite score, stops the stage with the count and the first such
sample instead: nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from recsys.checkpoint.weights import load_weights, named_weights
from recsys.distributed.env import distributed
from recsys.models import build as models
from recsys.stages import build
from recsys.stages.common import StageError, arguments, parser, read_stage, run_stage, start
from recsys.stages.config import ModelSection
from recsys.train.metrics import CTRMetrics
from recsys.train.ranks import until_every_rank_is_done

NAME = "evaluate"


@torch.no_grad()
def score(model, loader, device) -> tuple[dict[str, float], pa.Table]:
    """Metrics over every rank and this rank's predictions (a non-finite logit's score is
    NaN: its sigmoid would make an infinite one a valid probability)."""
    model.eval()
    metrics = CTRMetrics()
    columns: dict[str, list[torch.Tensor]] = {"user_id": [], "candidate_item": [], "label": []}
    scores = []
    for batch, scored in until_every_rank_is_done(iter(loader)):
        out = model(batch.features.to(device))
        if not scored:
            continue
        metrics.update(out.logits, batch.labels, batch.user_ids)
        columns["user_id"].append(batch.user_ids)
        columns["candidate_item"].append(batch.features["candidate_item"].values())
        columns["label"].append(batch.labels.to(torch.int64))
        logits = out.logits.float().cpu().flatten()
        scores.append(torch.sigmoid(logits).masked_fill(~torch.isfinite(logits), math.nan))
    arrays = {k: torch.cat(v).numpy() if v else [] for k, v in columns.items()}
    arrays["score"] = torch.cat(scores).numpy() if scores else []
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("candidate_item", pa.int64()),
            ("label", pa.int64()),
            ("score", pa.float32()),
        ]
    )
    return metrics.compute(), pa.table(arrays, schema=schema)


def refuse_unscored(metrics: dict[str, float], predictions: pa.Table, data: str, rows: int):
    """A StageError (on every rank: ``metrics`` are the same on all) when no sample was
    scored, or when a score is NaN (a non-finite logit): the count and this rank's first."""
    if metrics["samples"] == 0:
        raise StageError(
            f"--data {data}: no sample was scored (its dataset.json counts {rows} rows); "
            "nothing recorded"
        )
    count = int(metrics.get("nonfinite_logits", 0))
    if not count:
        return
    bad = pc.invert(pc.is_finite(predictions["score"]))
    first = predictions.filter(bad).slice(0, 1).to_pylist()
    where = (
        f"the first on this rank: user {first[0]['user_id']}, candidate item "
        f"{first[0]['candidate_item']}"
        if first
        else "none on this rank"
    )
    raise StageError(
        f"--data {data}: {count} of {int(metrics['samples'])} samples got a NaN or infinite "
        f"score ({where}); nothing recorded"
    )


def main(argv: list[str] | None = None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="finished finetune stage")
    p.add_argument("--data", required=True, help="ctr dataset to score")
    args, config = arguments(p, argv)
    with distributed() as env:
        source = read_stage(args.model, "--model", of=("finetune",))
        meta = build.dataset_meta(args.data, "ctr", "--data")
        model_section = ModelSection(**source["config"]["model"])
        config = dataclasses.replace(config, model=model_section)
        inputs = {"model": args.model, "data": args.data}
        build.same_as_trained(args.data, meta, source["config"]["data"]["train"], "ctr")
        stage = start(NAME, args, config, inputs)
        model = models.recorded_ctr_model(model_section, meta, source)
        sharded = build.place(model, config.plan, env)
        load_weights(sharded, f"{args.model}/weights", named_weights(sharded))
        data = dataclasses.replace(config.data, workers=0)
        loader = build.loader(args.data, data, model_section, config.run.seed, train=False)
        metrics, predictions = score(sharded, loader, env.device)
        refuse_unscored(metrics, predictions, args.data, meta.rows)
        out = stage.path / "predictions"
        out.mkdir(exist_ok=True)
        pq.write_table(predictions, out / f"part-{env.rank:05d}.parquet")
        if env.is_main:
            (stage.path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return stage.finish({"strategy": source["strategy"], "results": metrics})


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
