"""Stage ``retrieve``: each user's top K next items over the whole catalogue (a pretrain stage).

    python -m recsys.stages.retrieve --model runs/demo/L4H64A4/pretrain \
        --data data/ml100k/ctr_test --out runs/demo/L4H64A4/retrieve --k 10

Rebuilds the generative model of a finished ``pretrain`` stage on this job's world size and
plan and, for each user of ``--data``, takes the tower's output at the last history event
(``GenerativeModel.user_vectors``) and scores it against every known item where the item
table lives (``recsys.distributed.topk``: exact, merged over the ranks; the reserved unknown
and padding rows never compete). The model reads the last ``model.max_len`` events of a
history; with ``--exclude-seen`` (the default) every item of the whole history is left out.

- a ``seq`` dataset: one answer per sequence (what comes after it);
- a ``ctr`` dataset: its label-1 rows, whose candidate is the user's held-out next item, are
  the users; each target is ranked among all known items and HR@K, NDCG@K and MRR recorded.

Writes ``recommendations/part-<rank>.parquet`` (user_id, items, scores, best first; with a
``ctr`` dataset also target_item and target_rank, null when the target is no known item),
in raw ids from the model stage's ``vocab/`` (dense ids without one), ``metrics.json``,
``stage.json`` and ``DONE``. A row with an empty history is skipped and counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import pyarrow.parquet as pq
import torch
from torchrec import KeyedJaggedTensor
from torchrec.distributed.model_parallel import get_unwrapped_module

from recsys.checkpoint.weights import load_weights, named_weights
from recsys.data import vocab
from recsys.data.files import open_dataset
from recsys.distributed import topk
from recsys.distributed.env import distributed
from recsys.models import build as models
from recsys.models.sparse import padded
from recsys.stages import build
from recsys.stages.common import (
    StageError,
    arguments,
    barrier,
    parser,
    read_stage,
    run_stage,
    start,
)
from recsys.stages.config import StageConfig, from_dict
from recsys.stages.recommendations import Answers
from recsys.train.ranks import until_every_rank_is_done

NAME = "retrieve"


def histories(batch, kind: str, sides: list[str]) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """The pretraining model's input (keys ``item`` and the side features) and each row's
    target (-1: none): a ``ctr`` row's history and its candidate on label-1 rows."""
    features = batch.features
    if kind == "seq":
        return features, torch.full((len(batch),), -1, dtype=torch.long)
    keys = ["item", *sides]
    history = features.permute([features.keys().index(f"history_{k}") for k in keys])
    seq = KeyedJaggedTensor(keys=keys, values=history.values(), lengths=history.lengths())
    candidate = features["candidate_item"].values().long()
    return seq, torch.where(batch.labels > 0.5, candidate, -1)


def recent(features: KeyedJaggedTensor, n: int) -> KeyedJaggedTensor:
    """Every list of ``features`` cut to its last ``n`` values (what the model reads)."""
    lengths = features.lengths().long()
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    position = torch.arange(len(starts), device=lengths.device) - starts
    keep = position >= torch.repeat_interleave(lengths - n, lengths)
    return KeyedJaggedTensor(
        keys=features.keys(), values=features.values()[keep], lengths=lengths.clamp(max=n)
    )


WHOLE_ROWS = ["row_wise", "table_wise"]
"""Placements of the item table the top K can be computed on: each row whole on one rank."""


def whole_rows(config: StageConfig) -> StageConfig:
    """``config`` with the item table's placement limited to :data:`WHOLE_ROWS` when it does
    not name one (TorchRec's planner, free to choose, may split a table by columns)."""
    plan = config.plan
    if plan.file or "item" in plan.sharding_types:
        return config
    types = {**plan.sharding_types, "item": list(WHOLE_ROWS)}
    return dataclasses.replace(config, plan=dataclasses.replace(plan, sharding_types=types))


def main(argv: list[str] | None = None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="finished pretrain stage")
    p.add_argument("--data", required=True, help="seq dataset, or ctr dataset (evaluated)")
    p.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    p.add_argument(
        "--exclude-seen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave the history's items out (default: yes)",
    )
    args, config = arguments(p, argv)
    if args.k < 1:
        raise StageError(f"--k must be >= 1, got {args.k}")
    with distributed() as env:
        source = read_stage(args.model, "--model", of=("pretrain",))
        meta = open_dataset(args.data).meta
        if meta.kind not in ("seq", "ctr"):
            raise StageError(f"--data {args.data} is a {meta.kind!r} dataset, not seq or ctr")
        trained = from_dict(source["config"])
        build.same_as_trained(args.data, meta, trained.data.train, "seq")
        config = whole_rows(config)
        options = {"k": args.k, "exclude_seen": args.exclude_seen}
        stage = start(NAME, args, config, {"model": args.model, "data": args.data}, options)
        out = stage.path / "recommendations"
        if env.is_main and out.exists():  # an interrupted run's parts, maybe more ranks
            shutil.rmtree(out)
        barrier()
        model = models.generative_model(trained.model, meta)
        sharded = build.place(model, config.plan, env)
        load_weights(sharded, f"{args.model}/weights", named_weights(sharded))
        try:
            block = topk.catalogue(named_weights(sharded)["table/item"], model.config.drawn)
        except topk.ShardingNotSupported as err:
            raise StageError(f"{err}, e.g. plan.sharding_types={{item: [row_wise]}}") from None
        generative = get_unwrapped_module(sharded)
        generative.eval()
        loader = build.loader(
            args.data, config.data, trained.model, config.run.seed, train=False, whole=True
        )
        answers = Answers(args.k, evaluated=meta.kind == "ctr")
        sides = list(model.config.side_features)
        with torch.no_grad():
            for batch, scored in until_every_rank_is_done(iter(loader)):
                features, targets = histories(batch, meta.kind, sides)
                read = recent(features, trained.model.max_len)
                vectors = generative.user_vectors(read.to(env.device))
                lengths = features["item"].lengths()
                asked = targets >= 0 if meta.kind == "ctr" else torch.ones_like(lengths > 0)
                keep = asked & (lengths > 0) & scored
                seen = None
                if args.exclude_seen:
                    ids, valid = padded(features["item"])
                    seen = ids.long().masked_fill(~valid, -1)[keep].to(env.device)
                found = topk.retrieve(
                    vectors[keep.to(env.device)],
                    block,
                    args.k,
                    seen,
                    targets[keep].to(env.device),
                    scoring=model.config.scoring,
                    temperature=model.config.temperature,
                )
                empty = int((asked & (lengths == 0)).sum()) if scored else 0
                answers.add(batch.user_ids[keep], targets[keep], found, empty)
        results = answers.results()
        if results["users"] == 0:
            raise StageError(f"--data {args.data}: no user to answer; nothing recorded")
        vocabularies = vocab.from_stage(args.model)
        pq.write_table(answers.table(vocabularies), _part(out, env.rank))
        if env.is_main:
            (stage.path / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        # The pretraining scored, by fingerprint: the report matches them wherever it runs.
        return stage.finish({"model_fingerprint": source["fingerprint"], "results": results})


def _part(out, rank: int):
    out.mkdir(exist_ok=True)
    return out / f"part-{rank:05d}.parquet"


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
