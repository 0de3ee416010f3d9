"""Stage ``lum_query``: ask the user model about every user under N conditions (LUM step 2).

    python -m recsys.stages.lum_query --init runs/lum/lum_pretrain \
        --config configs/ml100k/lum.yaml --out runs/lum/lum_query data.train=data/ml100k/seq

For each user of the ``seq`` dataset ``data.train`` (the pretraining sequences: every event
but the last, so no CTR target is seen), computes the user model's outputs at the N query
conditions ``lum.queries`` (default: every value of the dataset's one condition feature)
with one group query: the history once, the N query tokens masked from one another
(``LUM.query``). Writes ``features/`` (``recsys.models.lum_features``: the outputs by user,
the user model's item embeddings, ``features.json``), ``stage.json`` and ``DONE``. No user
to ask, or an output that is NaN or infinite, stops the stage instead (the rankers would
train on them).
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import get_unwrapped_module

from recsys.checkpoint.weights import load_weights, named_weights
from recsys.distributed.env import distributed
from recsys.models import build as models
from recsys.models import lum_features
from recsys.stages import build
from recsys.stages.common import StageError, arguments, parser, read_stage, run_stage, start
from recsys.stages.config import from_dict
from recsys.train.ranks import until_every_rank_is_done

NAME = "lum_query"
ITEM_CHUNK = 4096


def queries(config_queries: dict[str, list[int]], conditions: dict[str, int]) -> dict:
    """The query conditions: as configured (checked against the model's), or every value of
    the model's one condition feature."""
    if not config_queries:
        if len(conditions) != 1:
            raise StageError(
                f"the model has condition features {sorted(conditions)}: set lum.queries "
                "(feature → N values) to say which combinations to ask"
            )
        ((name, size),) = conditions.items()
        return {name: list(range(size))}
    if set(config_queries) != set(conditions):
        raise StageError(
            f"lum.queries names {sorted(config_queries)}; the model's condition features are "
            f"{sorted(conditions)}"
        )
    for name, values in config_queries.items():
        bad = [v for v in values if not 0 <= v < conditions[name]]
        if bad:
            raise StageError(f"lum.queries.{name}: values {bad} outside [0, {conditions[name]})")
    return config_queries


def answered(users: np.ndarray, answers: np.ndarray, data: str, rows: int, device) -> int:
    """How many users every rank asked; a StageError (on every rank) unless that is every
    user of ``data`` (at least one) and every answer is finite."""
    broken = ~np.isfinite(answers).reshape(len(answers), -1).all(axis=1)
    counts = torch.tensor([len(users), int(broken.sum())], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    count, nonfinite = (int(c) for c in counts.tolist())
    if count == 0 or count != rows:  # e.g. a rank had no sequences and every rank stopped
        raise StageError(
            f"queried {count} of the {rows} users of data.train={data}"
            + (": use fewer ranks or more row groups for this dataset" if count else "")
        )
    if nonfinite:
        first = (
            f"the first on this rank: user {int(users[broken][0])}"
            if broken.any()
            else "none on this rank"
        )
        raise StageError(
            f"{nonfinite} of {count} users of data.train={data} got NaN or infinite outputs "
            f"from the user model ({first}); nothing recorded"
        )
    return count


def main(argv: list[str] | None = None) -> dict:
    p = parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--init", required=True, help="finished lum_pretrain stage")
    args, config = arguments(p, argv)
    inputs = {"train": config.data.train, "init": args.init}
    with distributed() as env:
        source = read_stage(args.init, "--init", of=("lum_pretrain",))
        meta = build.dataset_meta(config.data.train, "seq", "data.train")
        trained = from_dict(source["config"])  # the model as it was pretrained
        # Condition ids past a vocabulary's keys are its reserved rows: never asked.
        known = {name: meta.keys(name) for name in source["conditions"]}
        asked = queries(config.lum.queries, known)
        stage = start(NAME, args, config, inputs)  # asked follows from these: not fingerprinted
        features = stage.path / "features"
        if env.is_main and features.exists():  # an interrupted run's parts, maybe more ranks
            shutil.rmtree(features)
        if dist.is_initialized():
            dist.barrier()
        model = models.lum_model(trained.model, trained.lum, meta)
        sharded = build.place(model, config.plan, env)
        load_weights(sharded, f"{args.init}/weights", named_weights(sharded))
        user_model = get_unwrapped_module(sharded)  # its query(), past DMP and DDP
        user_model.eval()
        device = env.device
        conditions = {k: torch.tensor(v, device=device) for k, v in asked.items()}
        loader = build.loader(
            config.data.train,
            config.data,
            trained.model,
            config.run.seed,
            train=False,
            conditions=True,
        )
        users, outputs = [], []
        began = time.perf_counter()
        with torch.no_grad():
            for batch, scored in until_every_rank_is_done(iter(loader)):
                out = user_model.query(batch.features.to(device), conditions)
                if scored:
                    users.append(batch.user_ids.numpy())
                    outputs.append(out.float().cpu().numpy())
            seconds = time.perf_counter() - began
            items = []  # every rank takes part in each (collective) lookup
            for first in range(0, meta.vocab["item"], ITEM_CHUNK):
                ids = torch.arange(first, min(first + ITEM_CHUNK, meta.vocab["item"]))
                items.append(user_model.item_embeddings(ids.to(device)).float().cpu().numpy())
        n, d = len(next(iter(asked.values()))), model.config.tower.hidden
        mine = np.concatenate(users) if users else np.zeros(0, np.int64)
        answers = np.concatenate(outputs) if outputs else np.zeros((0, n, d), np.float32)
        count = answered(mine, answers, config.data.train, meta.rows, device)
        lum_features.write_users(features, env.rank, mine, answers)
        if env.is_main:
            lum_features.write_items(features, np.concatenate(items))
            lum_features.write_meta(
                features,
                {
                    "queries": n,
                    "dim": d,
                    "conditions": asked,
                    "users": meta.vocab.get("user", int(mine.max()) + 1 if len(mine) else 0),
                    "queried_users": int(count),
                    "parts": env.world_size,
                    "source": args.init,
                },
            )
        return stage.finish(
            {
                "queries": asked,
                "results": {
                    "users": int(count),
                    "queries": n,
                    "users_per_second": float(count) / max(seconds, 1e-9),
                },
            }
        )


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
