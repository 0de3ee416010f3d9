"""End-to-end training throughput at L4H64A4 on 2 gloo ranks: pretraining and CTR training,
on MovieLens-100K (GPSD protocol) and on synthetic logs, through the real trainer (data
streaming, sharded tables, fused table optimizer, DDP, metrics, logs and checkpoints).

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --towers compiled,eager --datasets ml100k

MovieLens-100K comes from the recbole 1.2.1 wheel (``pip download`` into --data once). Each
run is timed in fp32 and, on CPUs with bf16 matrix units (AMX), with bf16 autocast
(``run.cpu_bf16``; attention stays fp32), and with each way of running the tower
(``--towers``): ``compiled`` (``run.compile=on``: each block through ``torch.compile``) and
``eager`` (plain torch); docs/results.md has them beside the C kernels the tower had before,
measured by this script in one run. Prints samples (sequences) per second of each whole run
(start-up, compile, data loading, steps, metrics and the final checkpoint included) and of
its steady state (training steps with their data loading, past the first 10 steps, no step
that compiled, evaluation excluded), beside GPSD's public code measured at L4H64A4 on
ML-100K: steady state ~1.1 k CTR samples/s at batch 256 and ~100 pretraining sequences/s at
batch 64 on an Intel Xeon host with AMX units (2 cores) like the one this project's figures
come from; end to end ~0.33 k and ~47 on a 2-core AMD EPYC host (so not comparable to this
host's end-to-end figures).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from common import print_rates, recbole_wheel

# GPSD's public code, L4H64A4, ML-100K, fp32. Steady state: batch 256 (CTR) and 64
# (pretraining) on a 2-core Intel Xeon with AMX units; end to end: on a 2-core AMD EPYC.
STEADY_REFERENCE = {"ctr": 1100.0, "pretrain": 100.0}
STEADY_HOST = "2-core Intel Xeon (AMX)"
REFERENCE = {"ctr": 330.0, "pretrain": 47.0}
REFERENCE_HOST = "2-core AMD EPYC, another host"
TOWERS = ("compiled", "eager")


def movielens(data: Path) -> Path:
    out = data / "ml100k"
    if not (out / "ctr_train" / "dataset.json").exists():
        from recsys.data.convert import movielens as converter
        from recsys.data.protocol import write_split

        result, source = converter.convert(str(recbole_wheel(data)))
        write_split(out, result, source, overwrite=True)
    return out


def synthetic(data: Path, users: int) -> Path:
    out = data / f"synth-{users}"
    if not (out / "ctr_train" / "dataset.json").exists():
        from recsys.data.protocol import write_split
        from recsys.data.synth import SynthConfig, make

        result, source = make(
            SynthConfig(users=users, items=5_000, categories=50, min_events=10, max_events=60)
        )
        write_split(out, result, source, overwrite=True, row_group_rows=4_096)
    return out


def train(
    task: str,
    data: str,
    run_dir: str,
    epochs: int,
    batch: int,
    negatives: int,
    bf16: bool = False,
    tower_mode: str = "compiled",
) -> dict:
    """One training run on this rank; returns rows trained and seconds (rank 0's view)."""
    import json

    import torch
    import torch.distributed as dist
    from torchdata.stateful_dataloader import StatefulDataLoader

    from recsys.data.files import open_dataset
    from recsys.data.stream import ParquetStream, StreamConfig
    from recsys.distributed.env import distributed
    from recsys.distributed.planning import planned
    from recsys.distributed.wrap import shard
    from recsys.models.ctr import CTRConfig, CTRModel
    from recsys.models.generative import GenerativeConfig, GenerativeModel
    from recsys.models.tower import TowerConfig
    from recsys.train.compiling import compile_towers
    from recsys.train.optim import OptimConfig, attach_sparse_optimizer, dense_optimizer
    from recsys.train.trainer import RunConfig, Trainer

    with distributed("cpu") as env:
        source = f"{data}/{'ctr_train' if task == 'ctr' else 'seq'}"
        meta = open_dataset(source).meta
        tower = TowerConfig.from_name("L4H64A4", max_len=51)
        sides = {"category": meta.vocab["category"]}
        if task == "ctr":
            model = CTRModel(
                CTRConfig(tower, meta.vocab["item"], sides), sparse_device=torch.device("meta")
            )
        else:
            model = GenerativeModel(
                GenerativeConfig(
                    tower,
                    meta.vocab["item"],
                    sides,
                    negatives=negatives,
                    item_keys=meta.keys("item"),
                ),
                sparse_device=torch.device("meta"),
            )
        rows = open_dataset(source).rows
        steps = epochs * max(1, rows // (batch * env.world_size))
        optim = OptimConfig(warmup_steps=min(60, steps // 4), total_steps=steps)
        attach_sparse_optimizer(model, optim)
        plan = planned(model, world_size=env.world_size, sharding_types={"item": ["row_wise"]})
        sharded = shard(model, plan, env)
        dense, schedule = dense_optimizer(sharded, optim)
        if tower_mode == "compiled":
            compile_towers(sharded)
        # History capped at 50 events, as GPSD's code does on MovieLens.
        stream = ParquetStream(source, StreamConfig(batch_size=batch, max_len=50))
        trainer = Trainer(
            sharded,
            dense,
            schedule,
            StatefulDataLoader(stream, batch_size=None),
            RunConfig(epochs=epochs, resume=False, cpu_bf16=bf16),
            optim,
            run_dir=run_dir,
            task=task,
        )
        # Steady state: the intervals between the starts of consecutive training steps (the
        # step and the loading of the next batch), past the first steps (10, or a quarter of
        # a short run), never across an epoch's end (evaluation, checkpoints) and never over
        # a step that compiled (a new batch shape's first step).
        marks: list[tuple[float, int, int, int]] = []
        step = trainer._train_step

        def timed(batch) -> None:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            marks.append((time.perf_counter(), trainer.epoch, len(batch), graphs))
            step(batch)

        trainer._train_step = timed
        start = time.perf_counter()
        results = trainer.train()
        seconds = time.perf_counter() - start
        steady_rows, steady_seconds = 0, 0.0
        for (t0, e0, rows0, g0), (t1, e1, _, g1) in itertools.pairwise(
            marks[min(10, len(marks) // 4) :]
        ):
            if e0 == e1 and g0 == g1:
                steady_rows, steady_seconds = steady_rows + rows0, steady_seconds + (t1 - t0)
        steady = torch.tensor([steady_rows / max(steady_seconds, 1e-9)])
        dist.all_reduce(steady)  # every rank trains its own rows at the same steps
        trained = torch.tensor([trainer.samples])  # rows each rank trained on
        dist.all_reduce(trained)
        log = Path(run_dir, "metrics.jsonl")
        records = [json.loads(line) for line in log.read_text().splitlines()] if env.is_main else []
        return {
            "rows": int(trained),
            "seconds": seconds,
            "steady": float(steady),
            "results": results,
            "records": len(records),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/bench-data"))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-train"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ctr-batch", type=int, default=256)
    parser.add_argument("--seq-batch", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=4096)
    parser.add_argument("--synth-users", type=int, default=20_000)
    parser.add_argument(
        "--datasets", default="ml100k,synth", help="ml100k, synth, or both (default)"
    )
    parser.add_argument(
        "--towers",
        default="compiled,eager",
        help=f"ways to run the tower, of {', '.join(TOWERS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "both"],
        default=None,
        help="fp32, bf16 autocast (run.cpu_bf16), or both; default: both on CPUs with bf16 "
        "matrix units (AMX), fp32 elsewhere",
    )
    args = parser.parse_args()

    from recsys.distributed.launch import run_on_ranks
    from recsys.doctor import cpu_bf16_units

    precision = args.precision or ("both" if cpu_bf16_units() else "fp32")
    precisions = ["fp32", "bf16"] if precision == "both" else [precision]

    towers = args.towers.split(",")
    if not towers or any(t not in TOWERS for t in towers):
        parser.error(f"--towers: a list of {', '.join(TOWERS)}, got {args.towers!r}")
    names = args.datasets.split(",")
    if not names or any(n not in ("ml100k", "synth") for n in names):
        parser.error(f"--datasets: ml100k, synth or both, got {args.datasets!r}")

    datasets = {}
    if "ml100k" in names:
        datasets["ml100k"] = movielens(args.data)
    if "synth" in names:
        datasets[f"synth-{args.synth_users}"] = synthetic(args.data, args.synth_users)
    for task, batch, unit in (
        ("ctr", args.ctr_batch, "samples"),
        ("pretrain", args.seq_batch, "sequences"),
    ):
        rates = {f"reference: GPSD public code, ML-100K, {REFERENCE_HOST}": REFERENCE[task]}
        steady_rates = {
            f"reference: GPSD public code, ML-100K, {STEADY_HOST}": STEADY_REFERENCE[task]
        }
        runs = itertools.product(datasets.items(), precisions, towers)
        for (name, data), precision, tower in runs:
            out = run_on_ranks(
                train,
                task,
                str(data),
                str(args.runs / f"{task}-{name}-{precision}-{tower}"),
                args.epochs,
                batch,
                args.negatives,
                precision == "bf16",
                tower,
                world_size=2,
                quiet=True,
            )[0]
            label = f"recsys {task}, {name}, 2 gloo ranks, {precision}, {tower}"
            rates[label] = out["rows"] / out["seconds"]
            steady_rates[label] = out["steady"]
            shown = ", ".join(f"{k} {v:.4f}" for k, v in out["results"].items())
            print(f"{label}: {out['rows']:,} {unit} in {out['seconds']:.1f} s; {shown}")
        print(f"{task} at L4H64A4, batch {batch} per rank, {args.epochs} epochs, end to end")
        print_rates(rates, unit)
        print(f"{task}, steady state (training steps and their data loading)")
        print_rates(steady_rates, unit)


if __name__ == "__main__":
    main()
