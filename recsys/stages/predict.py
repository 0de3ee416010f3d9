"""Stage ``predict``: score raw-key requests with a finetuned model, on any world size.

    python -m recsys.stages.predict --model runs/demo/finetune-st_sf \
        --requests requests.parquet --out runs/demo/predict-st_sf

Rebuilds the model of a finished ``finetune`` stage from its recorded ``model`` section and
its vocabularies (``vocab/``; the training data need not be there), loads its weights on
this job's world size and plan, zeroes each table's reserved rows (unknown, padding: an
unseen key scores as a zero embedding), and scores every request of ``--requests`` (a
Parquet file or a directory of them; the columns and the status of a bad request:
docs/serving.md, *Requests and predict*). Chunk c (one row group) is scored by rank
c % world size and written to ``pending/`` when done; a restarted run, on any world size,
skips the chunks there (``run.resume=false`` starts over). At the end each rank writes
``predictions/part-<rank>.parquet`` (row, user_id, candidate, score, status, label when
given), every request in exactly one part, then ``stage.json`` (counts per status, unknown
ids, and with labels AUC, logloss, NE, calibration and gAUC) and ``DONE``. ``--config`` may
set ``data.batch_size``, ``plan`` and ``run.resume``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import torch
from torch import nn

from recsys.checkpoint.weights import load_weights, named_weights
from recsys.data import vocab
from recsys.data.batch import Batch, Layout
from recsys.data.requests import (
    STATUSES,
    Chunk,
    Encoded,
    Requests,
    encode,
    model_meta,
    open_requests,
    placeholder,
    read_chunk,
)
from recsys.distributed.env import distributed, summed_over_ranks
from recsys.distributed.shards import zero_rows
from recsys.models import build as models
from recsys.stages import build
from recsys.stages.common import (
    StageDir,
    StageError,
    arguments,
    barrier,
    parser,
    read_stage,
    run_stage,
    start,
)
from recsys.stages.config import ModelSection, StageConfig
from recsys.stages.predictions import Pending, chunk_predictions, write_part
from recsys.train.metrics import CTRMetrics
from recsys.train.ranks import until_every_rank_is_done

NAME = "predict"


class Piece(NamedTuple):
    """A batch of a chunk's scorable requests (``count`` of them; none in a placeholder)."""

    chunk: Chunk | None
    table: pa.Table | None
    encoded: Encoded | None
    batch: Batch
    count: int
    last: bool
    """The chunk's last batch: its predictions are written after it."""


def pieces(
    chunks: list[Chunk],
    requests: Requests,
    vocabularies: dict[str, vocab.Vocabulary],
    layout: Layout,
    config: StageConfig,
) -> Iterator[Piece]:
    """This rank's batches, after a placeholder (every rank has a batch to repeat while the
    others finish, even one with no chunk to score); a chunk without a scorable request is
    one placeholder batch."""
    spare = placeholder(vocabularies, layout)
    yield Piece(None, None, None, spare, 0, False)
    max_len, size = config.model.max_len, config.data.batch_size
    for chunk in chunks:
        table = read_chunk(chunk, requests)
        encoded = encode(table, chunk, vocabularies, layout, max_len)
        batches = encoded.batches(layout, max_len, size) or [(spare, 0)]
        for i, (batch, count) in enumerate(batches):
            yield Piece(chunk, table, encoded, batch, count, i == len(batches) - 1)


@torch.no_grad()
def score(model: nn.Module, work: Iterator[Piece], pending: Pending, device: torch.device) -> None:
    """Score every piece (each forward is collective) and write each chunk when done."""
    model.eval()
    logits: list[torch.Tensor] = []
    for piece, scored in until_every_rank_is_done(work):
        out = model(piece.batch.features.to(device))
        if not scored or piece.chunk is None:
            continue
        logits.append(out.logits.float().cpu().flatten()[: piece.count])
        if piece.last:
            table, counts = chunk_predictions(piece.chunk, piece.table, piece.encoded,
                                              torch.cat(logits))  # fmt: skip
            pending.write(piece.chunk, table, counts)
            logits = []


def results(counts: Counter, metrics: CTRMetrics, requests: Requests) -> dict[str, float | None]:
    """Counts summed over the ranks, then the metrics when the requests have labels."""
    names = [*STATUSES, "unknown_candidate", "unknown_history_ids", "nonfinite_scores"]
    total = summed_over_ranks(torch.tensor([counts.get(n, 0) for n in names]))
    summed = dict(zip(names, (int(v) for v in total.tolist()), strict=True))
    if summed["nonfinite_scores"]:
        raise StageError(
            f"{summed['nonfinite_scores']} of {summed['ok']} scored requests got a NaN or "
            "infinite score (their rows are in pending/); nothing recorded"
        )
    out: dict[str, float | None] = {"requests": sum(summed[s] for s in STATUSES)}
    out["scored"] = summed["ok"]
    out.update({s: summed[s] for s in STATUSES[1:]})
    out["unknown_candidate"] = summed["unknown_candidate"]
    out["unknown_history_ids"] = summed["unknown_history_ids"]
    if requests.labelled:
        computed = metrics.compute()  # collective
        if computed["samples"]:
            # Non-finite scores stopped the stage above: a NaN left is a metric the labels
            # leave undefined (one class only), recorded as null, the predictions being sound.
            out.update({k: v if math.isfinite(v) else None for k, v in computed.items()})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="finished finetune stage")
    p.add_argument("--requests", required=True, help="Parquet file or directory of requests")
    args, config = arguments(p, argv)
    with distributed() as env:
        source = read_stage(args.model, "--model", of=("finetune",))
        vocabularies = vocab.from_stage(args.model)
        if "item" not in vocabularies:
            raise StageError(
                f"--model {args.model} carries no vocabularies ({vocab.DIRECTORY}/): raw keys "
                "cannot be mapped to its ids; finetune it again from data with vocabularies"
            )
        requests = open_requests(args.requests, vocabularies)  # its errors come before work
        model_section = ModelSection(**source["config"]["model"])
        config = dataclasses.replace(config, model=model_section)
        StageDir(args.out, NAME).refuse({"requests": args.requests})
        options = {"requests": str(Path(args.requests).resolve()), "digest": requests.digest()}
        stage = start(NAME, args, config, {"model": args.model}, options)
        pending = Pending(stage.path, stage.about["fingerprint"])
        pending.check(config.run.resume)
        if env.is_main:
            pending.prepare(config.run.resume)
        barrier()
        meta = model_meta(vocabularies)
        model = models.recorded_ctr_model(model_section, meta, source)
        sharded = build.place(model, config.plan, env)
        load_weights(sharded, f"{args.model}/weights", named_weights(sharded))
        reserved = {n: [v.unknown, v.padding] for n, v in vocabularies.items() if v.reserved}
        zero_rows(sharded, reserved)
        mine = [c for c in requests.chunks if c.index % env.world_size == env.rank]
        todo = [c for c in mine if not pending.done(c)]
        layout = Layout.of(meta)
        score(sharded, pieces(todo, requests, vocabularies, layout, config), pending, env.device)
        counts, metrics = write_part(pending, mine, requests, env.rank)
        record = stage.finish(
            {
                "strategy": source["strategy"],
                "requests": args.requests,
                "chunks": len(requests.chunks),
                "resumed_chunks": int(summed_over_ranks(torch.tensor([len(mine) - len(todo)]))),
                "results": results(counts, metrics, requests),
            }
        )
        if env.is_main:
            pending.remove()  # after DONE: until then, the chunks are what a restart resumes
        return record


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
