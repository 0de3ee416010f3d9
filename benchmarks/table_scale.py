"""Is the plan true as tables grow? CTR finetuning (or pretraining) at L4H64A4 on 2 gloo ranks
with the item table at several sizes, the same synthetic log hashed into each (``recsys data
synth --stream --hash-ids --table-rows N``), so the work per step stays the same.

    python benchmarks/table_scale.py --sizes '1e5,1e6,1e7,2**25' --sharding both
    python benchmarks/table_scale.py --stage pretrain --batch 64 --sizes '1e5,2**25'
    python benchmarks/table_scale.py --sizes '2**25' --frozen fp32,fp16,int8 --no-reshard

For each size (and sharding type, and frozen dtype): steady-state seconds per step, rows
touched per step (distinct ids a step looks up in the item table, the sampled negatives
included, mean over ranks and steps), each rank's peak RSS while training (``ru_maxrss``,
before any checkpoint), the per-rank memory ``recsys plan --host cpu`` gives for the same
model, batch and sharding (``recsys.plan.make`` in-process: the tables and the rest of the
rank, ``recsys.plan.process``), their ratio,
and a checkpoint's save seconds, bytes (all ranks' files) and load seconds (model and fused
optimizer, DCP).
Then the largest checkpoint is loaded on 1 rank (resharding 2 → 1) and on 2 ranks under
the other sharding type (row-wise ↔ table-wise). Before each size, the
run stops with one line if the table cannot fit the host's free memory
(``recsys.plan.measure.check_fits``). The last line is

    table_scale: rows=N rss_over_plan=R step_time_ratio=S

R: the worst measured / planned ratio over ranks at the largest size; S: step time at the
largest size over the smallest (the first sharding type and frozen dtype). ``--frozen fp32,int8``
runs the CTR model with every table frozen (GPSD's ST&SF), stored in each dtype in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

MODEL = "L4H64A4"
DIM = 64
RANKS = 2


STAGES = {"finetune": ("ctr_train", "ctr", "ctr"), "pretrain": ("seq", "seq", "pretrain")}
"""The stages measured: the split each trains on, its kind and the trainer's task."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What one run trains: the stage, the item table's sharding type, and the dtype every
    table is frozen in (None: trainable)."""

    stage: str = "finetune"
    sharding: str = "row_wise"
    frozen: str | None = None

    def label(self) -> str:
        return self.sharding + (f", frozen {self.frozen}" if self.frozen else "")


def stage_config(data: str, batch: int, steps: int, job: Job):
    """The stage's config for this benchmark: the model, batch, steps and the item table's
    sharding type."""
    from recsys.stages.config import load

    config = load(
        None,
        [
            f"data.train={data}",
            f"data.batch_size={batch}",
            f"model.size={MODEL}",
            f"run.max_steps={steps}",
            "run.resume=false",
        ],
        job.stage,
    )
    plan = dataclasses.replace(config.plan, sharding_types={"item": [job.sharding]})
    return dataclasses.replace(config, plan=plan)


def make_data(root: Path, rows: int, users: int, items: int) -> Path:
    """The log hashed into ``rows`` item rows (generated once per size): its directory."""
    from recsys.data.synth import SynthConfig
    from recsys.data.synth_stream import StreamSynthConfig, write

    out = root / f"hash-u{users}-i{items}-t{rows}"
    if not (out / "ctr_train" / "dataset.json").exists():
        world = SynthConfig(users=users, items=items, categories=50, min_events=10, max_events=60)
        write(out, StreamSynthConfig(world, hash_ids=True, table_rows=rows), overwrite=True)
    return out


def frozen_tables(data: str, job: Job) -> tuple[str, ...]:
    """Every table of the CTR model when ``job`` freezes them, else none."""
    from recsys.models.build import side_features
    from recsys.stages.build import dataset_meta

    if job.frozen is None:
        return ()
    return ("item", *side_features(dataset_meta(data, "ctr", "data.train")))


def planned_per_rank(data: str, batch: int, job: Job, world_size: int = RANKS) -> list[dict]:
    """Each rank's memory in ``recsys plan --host cpu``'s plan of this job: ``total_ddr_bytes``
    (its tables and the rest: runtime, dense state, activations) and
    ``checkpoint_ddr_bytes`` (while a checkpoint is saved or loaded)."""
    from recsys.plan.cli import quiet_planner
    from recsys.plan.hosts import cluster
    from recsys.plan.make import Request, make

    quiet_planner()
    config = stage_config(data, batch, 1, job)
    request = Request(
        stage=job.stage,
        sharding_types={"item": [job.sharding]},
        batch_size=batch,
        frozen=frozen_tables(data, job),
        frozen_dtype=job.frozen or "fp32",
    )
    doc = make(config, request, cluster("cpu", world_size=world_size))
    return doc["ranks"]


def _state(sharded, job: Job) -> dict:
    """What a checkpoint holds: the model, and the fused optimizer unless every table is
    frozen."""
    return {"model": sharded} | ({"fused": sharded.fused_optimizer} if job.frozen is None else {})


def _sum(tensor):
    """fp64 sum of ``tensor``, a block of rows at a time (a whole shard in fp64 would take
    twice its memory)."""
    import torch

    flat = tensor.reshape(tensor.shape[0], -1) if tensor.dim() else tensor.reshape(1, 1)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, flat.shape[0], 1 << 16):
        total += flat[start : start + (1 << 16)].double().sum()
    return total


def checksum(sharded) -> float:
    """The sum of every weight of the model's state, the same whatever the job's shape or
    sharding: each table shard counted on the rank that holds it, the replicated dense
    weights once (rank 0)."""
    import torch
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float64)
    for value in sharded.state_dict().values():
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                total += _sum(shard.tensor)
        elif isinstance(value, DTensor):
            total += _sum(value.to_local())
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and dist.get_rank() == 0:
            total += _sum(value)
    dist.all_reduce(total)
    return float(total)


def _build(data: str, batch: int, steps: int, job: Job, env, run_dir: str):
    from recsys.models import build as models
    from recsys.stages import build

    config = stage_config(data, batch, steps, job)
    _, kind, task = STAGES[job.stage]
    meta = build.training_meta(config.data, kind)
    train = build.loader(data, config.data, config.model, config.run.seed, train=True)
    if job.stage == "pretrain":
        model = models.generative_model(config.model, meta)
    else:
        frozen = frozen_tables(data, job)
        model = models.ctr_model(config.model, meta, frozen, frozen_dtype=job.frozen or "fp32")
    return build.trainer(model, train, None, config, env, run_dir, task)


def train(data: str, batch: int, warmup: int, steps: int, job: Job, run_dir: str) -> dict:
    """On one rank: ``warmup + steps`` training steps through the real trainer, then a checkpoint
    saved and loaded; this rank's figures."""
    import torch
    import torch.distributed as dist

    from recsys.checkpoint.manager import CheckpointManager
    from recsys.distributed.env import distributed
    from recsys.plan.measure import PeakRss, peak_rss_bytes

    with distributed("cpu") as env:
        sharded, trainer = _build(data, batch, warmup + steps, job, env, run_dir)
        sparse = sharded.module.sparse
        features = next(t.features for t in sparse.config.tables if t.name == "item")
        marks: list[float] = []
        touched: list[int] = []
        peak = [0]
        step = trainer._train_step

        def looked_up(module, inputs) -> None:  # every id of the item table, negatives too
            kjt = inputs[0]
            present = set(kjt.keys())
            ids = torch.cat([kjt[f].values() for f in features if f in present])
            touched.append(int(torch.unique(ids).numel()))

        sparse.register_forward_pre_hook(looked_up)

        def timed(b):
            marks.append(time.perf_counter())
            out = step(b)
            peak[0] = peak_rss_bytes()  # training only: before the trainer's final checkpoint
            return out

        trainer._train_step = timed
        ready = peak_rss_bytes()  # the runtime, the model and its tables, before any step
        trainer.train()
        dist.barrier()
        if dist.get_rank() == 0:  # the trainer's own final checkpoint: disk, not measured
            shutil.rmtree(trainer.checkpoints.directory, ignore_errors=True)
        if len(marks) < warmup + 2:
            raise RuntimeError(
                f"{data}: only {len(marks)} steps of {batch} rows per rank, fewer than "
                f"--warmup {warmup} + 2: give more --users or fewer --steps"
            )
        # Seconds between the starts of consecutive steps past the warm-up, slowest rank.
        span = torch.tensor([(marks[-1] - marks[warmup]) / max(1, len(marks) - 1 - warmup)])
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        manager = CheckpointManager(Path(run_dir) / "bench-ckpt", keep=1)
        dist.barrier()
        start = time.perf_counter()
        with PeakRss() as saving:
            path = manager.save(trainer.step, _state(sharded, job))
        saved = time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        with PeakRss() as loading:
            manager.load(_state(sharded, job), path)
        loaded = time.perf_counter() - start
        saved_sum = checksum(sharded)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return {
            "step_s": float(span),
            "touched": sum(touched[warmup:]) / max(1, len(touched) - warmup),
            "rss": peak[0],
            "ready_rss": ready,
            "save_s": saved,
            "checkpoint_rss": max(saving.peak, loading.peak),
            "load_s": loaded,
            "bytes": size,
            "checkpoint": str(path),
            "checksum": saved_sum,
        }


def reload(data: str, batch: int, job: Job, run_dir: str, checkpoint: str) -> dict:
    """On one rank: load a checkpoint saved by another job shape or sharding (resharding);
    seconds, peak RSS."""
    from recsys.checkpoint.manager import CheckpointManager
    from recsys.distributed.env import distributed
    from recsys.plan.measure import peak_rss_bytes

    with distributed("cpu") as env:
        sharded, _ = _build(data, batch, 1, job, env, run_dir)
        start = time.perf_counter()
        CheckpointManager(Path(checkpoint).parent).load(_state(sharded, job), checkpoint)
        seconds = time.perf_counter() - start
        return {"load_s": seconds, "rss": peak_rss_bytes(), "checksum": checksum(sharded)}


def parse_sizes(text: str) -> list[int]:
    """``1e5,1e6,2**25`` → ``[100000, 1000000, 33554432]``."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        base, _, power = part.partition("**")
        value = int(base) ** int(power) if power else int(float(part))
        if value < 1 or (not power and float(part) != value):
            raise argparse.ArgumentTypeError(f"--sizes: {part!r} is not a whole number >= 1")
        sizes.append(value)
    return sizes


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1e5,1e6,1e7,2**25"))
    parser.add_argument("--stage", choices=sorted(STAGES), default="finetune")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="samples (sequences) per rank")
    parser.add_argument("--users", type=int, default=12_000, help="enough for 30 steps")
    parser.add_argument("--items", type=int, default=10_000_000, help="the log's catalogue")
    parser.add_argument("--sharding", default="row_wise", help="row_wise, table_wise or both")
    parser.add_argument(
        "--frozen",
        default="",
        help="finetune with every table frozen in these dtypes: fp32,fp16,int8",
    )
    parser.add_argument("--data", type=Path, default=Path("runs/bench-data/table-scale"))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-table-scale"))
    parser.add_argument("--no-reshard", action="store_true", help="skip the resharding loads")
    args = parser.parse_args(argv)

    from recsys.distributed.launch import run_on_ranks
    from recsys.models.sparse import FROZEN_DTYPES
    from recsys.plan.measure import TableTooLarge, check_fits, check_reload_fits

    types = ["row_wise", "table_wise"] if args.sharding == "both" else [args.sharding]
    frozen = [d for d in args.frozen.split(",") if d] or [None]
    wrong = any(d not in FROZEN_DTYPES for d in frozen if d)
    if wrong or (args.frozen and args.stage != "finetune"):
        parser.error(f"--frozen: finetune only, dtypes among {', '.join(FROZEN_DTYPES)}")
    jobs = [Job(args.stage, sharding, dtype) for sharding in types for dtype in frozen]
    sizes = sorted(args.sizes)
    mib = 1024**2
    steps: dict[int, float] = {}
    ratios: dict[int, float] = {}
    last: tuple[str, str, float, int] | None = None
    for rows in sizes:
        try:
            check_fits(rows, DIM, RANKS)
        except TableTooLarge as err:
            sys.exit(f"table_scale: {err}")
        data = str(make_data(args.data, rows, args.users, args.items) / STAGES[args.stage][0])
        for job in jobs:
            run_dir = args.runs / f"{job.stage}-{job.sharding}-{job.frozen or 'trained'}-{rows}"
            shutil.rmtree(run_dir, ignore_errors=True)
            out = run_on_ranks(
                train, data, args.batch, args.warmup, args.steps, job, str(run_dir),
                world_size=RANKS, quiet=True,
            )  # fmt: skip
            ranks = planned_per_rank(data, args.batch, job)
            plan = [r["total_ddr_bytes"] for r in ranks]
            over = [o["rss"] / p for o, p in zip(out, plan, strict=True)]
            if job == jobs[0]:
                steps[rows], ratios[rows] = out[0]["step_s"], max(over)
                last = (data, out[0]["checkpoint"], out[0]["checksum"], out[0]["bytes"])
            print(
                f"rows={rows:,} {job.label()}: step {out[0]['step_s'] * 1e3:.1f} ms, "
                f"rows touched/step {sum(o['touched'] for o in out) / RANKS:,.0f}, "
                f"checkpoint save {max(o['save_s'] for o in out):.2f} s "
                f"{out[0]['bytes'] / mib:,.1f} MiB load {max(o['load_s'] for o in out):.2f} s"
            )
            for rank, (o, p, r) in enumerate(zip(out, plan, ranks, strict=True)):
                copy = r["checkpoint_ddr_bytes"]
                print(
                    f"  rank {rank}: peak RSS {o['rss'] / mib:,.0f} MiB (before the first step "
                    f"{o['ready_rss'] / mib:,.0f}), planned {p / mib:,.1f} "
                    f"MiB, measured/planned {o['rss'] / p:.2f} (not in the plan: "
                    f"{(o['rss'] - p) / mib:,.0f} MiB); checkpointing "
                    f"{o['checkpoint_rss'] / mib:,.0f} MiB, planned {copy / mib:,.1f} MiB "
                    f"({o['checkpoint_rss'] / copy:.2f})"
                )
            if job != jobs[0] or rows != sizes[-1]:  # the largest first job's: reloaded below
                shutil.rmtree(run_dir / "bench-ckpt", ignore_errors=True)
    if last is not None and not args.no_reshard:
        data, checkpoint, expected, size = last
        first = jobs[0]
        other = "table_wise" if first.sharding == "row_wise" else "row_wise"
        for world_size, sharding in ((1, first.sharding), (2, other)):
            job = dataclasses.replace(first, sharding=sharding)
            head = (
                f"rows={sizes[-1]:,}: checkpoint of 2 ranks ({first.sharding}) loaded on "
                f"{world_size} rank(s) ({sharding})"
            )
            try:
                check_reload_fits(size, world_size)
            except TableTooLarge as err:
                print(f"{head}: not run, {err}")
                continue
            loads = run_on_ranks(
                reload, data, args.batch, job, str(args.runs / f"reload-{world_size}"),
                checkpoint, world_size=world_size, quiet=True,
            )  # fmt: skip
            print(
                f"{head} in {max(o['load_s'] for o in loads):.2f} s, peak RSS "
                + ", ".join(f"{o['rss'] / mib:,.0f}" for o in loads)
                + " MiB, weights "
                + (
                    "the same"
                    if math.isclose(loads[0]["checksum"], expected, rel_tol=1e-9)
                    else f"DIFFER (sum {loads[0]['checksum']!r}, saved {expected!r})"
                )
            )
    if last is not None:
        shutil.rmtree(Path(last[1]).parent, ignore_errors=True)
    largest, smallest = sizes[-1], sizes[0]
    summary = (
        f"table_scale: rows={largest} rss_over_plan={ratios[largest]:.3f} "
        f"step_time_ratio={steps[largest] / steps[smallest]:.3f}"
    )
    print(summary)
    return summary


if __name__ == "__main__":
    main()
