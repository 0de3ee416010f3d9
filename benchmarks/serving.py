"""Serving figures in one run: predict against evaluate, the exported model's latency, and
artifact sizes.

    python benchmarks/serving.py
    python benchmarks/serving.py --synth-items 1000000 --repeats 200

1. A CTR model at L4H64A4 (max history 50, as the demo) is finetuned for a few steps on
   MovieLens-100K (GPSD protocol, the recbole 1.2.1 wheel; the dense training set gives
   125,212 samples to score). Then, on one rank and on the same samples,
   ``python -m recsys.stages.evaluate`` scores the ``ctr`` dataset (the loop the trainer
   evaluates with: dense ids from the Parquet stream) and ``python -m recsys.stages.predict``
   scores the same samples given as raw-key requests (``recsys data requests``): samples
   per second of each stage, start-up and model loading included, and their ratio
   (evaluate is the baseline).
2. ``recsys export`` of that model at fp32, fp16 and int8; each artifact's latency (the
   exported program alone, known random ids, full 50-event histories) at p50 and p99 for
   batches of 1, 64 and 1,024 on one thread and on two, and its size on disk.
3. The same three artifact sizes for a CTR model over synthetic logs with an item table of
   about ``--synth-items`` rows (uniform popularity, so that most items are touched).

Prints the host's CPU, since speeds compare only on one host and in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from common import recbole_wheel

TINY_TRAIN = ["run.max_steps=20", "data.batch_size=64"]
MODEL = ["model.size=L4H64A4", "model.max_len=50"]


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def movielens(data: Path) -> Path:
    out = data / "ml100k-dense"
    if not (out / "ctr_test" / "dataset.json").exists():
        from recsys.data.convert import movielens as converter
        from recsys.data.protocol import ProtocolConfig, write_split

        result, source = converter.convert(
            str(recbole_wheel(data)), ProtocolConfig(dense_train=True)
        )
        write_split(out, result, source, overwrite=True, row_group_rows=8_192)
    return out


def synthetic(data: Path, items: int) -> Path:
    out = data / f"synth-{items}"
    if not (out / "ctr_test" / "dataset.json").exists():
        from recsys.data.protocol import write_split
        from recsys.data.synth import SynthConfig, make

        users = max(1_000, items // 10)
        config = SynthConfig(
            users=users, items=items, categories=100, min_events=10, max_events=30, zipf=0.0
        )
        result, source = make(config)
        write_split(out, result, source, overwrite=True, row_group_rows=65_536)
    return out


def finetuned(data: Path, runs: Path) -> Path:
    """A finetune stage (NT, a few steps) on ``data``'s ctr_train."""
    from recsys.stages import finetune, transfer

    stage = runs / "finetune"
    if not (stage / "DONE").exists():
        train = [*MODEL, *TINY_TRAIN, f"data.train={data / 'ctr_train'}"]
        transfer.main(["--strategy", "NT", "--out", str(runs / "nt"), "--force", *MODEL,
                       f"data.train={data / 'ctr_train'}"])  # fmt: skip
        finetune.main(["--init", str(runs / "nt"), "--out", str(stage), "--force", *train])
    return stage


def stage_rate(record: dict, samples: int) -> float:
    return samples / record["seconds"]


def scoring(data: Path, model: Path, runs: Path) -> dict[str, float]:
    """Samples per second of evaluate and predict on the same samples, one rank each."""
    from recsys.data import raw_requests
    from recsys.stages import evaluate, predict

    dataset = data / "ctr_train_dense"
    requests = runs / "requests.parquet"
    samples = raw_requests.write(str(dataset), requests, overwrite=True)
    batch = ["data.batch_size=1024"]
    common = ["--model", str(model), "--force", *batch]
    scored = evaluate.main([*common, "--data", str(dataset), "--out", str(runs / "evaluate")])
    predicted = predict.main(
        [*common, "--requests", str(requests), "--out", str(runs / "predict"), "run.resume=false"]
    )
    assert predicted["results"]["scored"] == samples, predicted["results"]
    return {
        "samples": samples,
        "evaluate": stage_rate(scored, samples),
        "predict": stage_rate(predicted, samples),
    }


def latency(artifact: Path, threads: int, repeats: int) -> dict[int, tuple[float, float]]:
    """p50 and p99 milliseconds per call of the exported program, by batch size."""
    import torch

    from recsys.serve.score import load

    torch.set_num_threads(threads)
    loaded = load(artifact)
    rng = np.random.default_rng(0)
    keys = loaded.manifest["tables"][0]["keys"]
    out = {}
    for size in (1, 64, 1024):
        items = rng.integers(0, keys, size=(size, loaded.max_len + 1))
        history = np.ascontiguousarray(loaded.sides[items[:, :-1]].transpose(0, 2, 1))
        candidate = loaded.sides[items[:, -1]]
        calls = repeats if size < 1024 else max(10, repeats // 10)
        for _ in range(3):
            loaded.score_ids(history, candidate)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            loaded.score_ids(history, candidate)
            times.append(time.perf_counter() - start)
        out[size] = (1e3 * float(np.percentile(times, 50)), 1e3 * float(np.percentile(times, 99)))
    return out


def size_mb(directory: Path) -> tuple[float, float]:
    """The artifact's size and its model.pt2's, in MB."""
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return total / 1e6, (directory / "model.pt2").stat().st_size / 1e6


def exported(model: Path, runs: Path) -> dict[str, Path]:
    from recsys.serve.export import export

    artifacts = {}
    for dtype in ("fp32", "fp16", "int8"):
        artifacts[dtype] = runs / f"export-{dtype}"
        export(model, artifacts[dtype], dtype=dtype, force=True)
    return artifacts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="runs/bench-serving", help="datasets and runs go here")
    p.add_argument("--synth-items", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=100, help="timed calls per batch size")
    args = p.parse_args()
    root = Path(args.data)
    print(f"host: {cpu()}")

    data = movielens(root)
    model = finetuned(data, root / "ml100k-runs")
    rates = scoring(data, model, root / "ml100k-runs")
    print(f"\nscoring {rates['samples']:,} ML-100K samples (L4H64A4, history ≤ 50, 1 rank):")
    print(f"  evaluate (dense ids, Parquet stream)   {rates['evaluate']:>9,.0f} samples/s  1.00x")
    ratio = rates["predict"] / rates["evaluate"]
    print(f"  predict (raw-key requests)            {rates['predict']:>9,.0f} samples/s"
          f"  {ratio:.2f}x")  # fmt: skip

    artifacts = exported(model, root / "ml100k-runs")
    print("\nexported model, ML-100K: latency of one call in ms (p50 / p99), 50-event histories")
    print(f"  {'dtype':<6}{'threads':>8}" + "".join(f"{f'batch {b}':>18}" for b in (1, 64, 1024)))
    for dtype, artifact in artifacts.items():
        for threads in (1, 2):
            times = latency(artifact, threads, args.repeats)
            cells = "".join(f"{f'{p50:.2f} / {p99:.2f}':>18}" for p50, p99 in times.values())
            print(f"  {dtype:<6}{threads:>8}{cells}")

    sizes = {"ML-100K": {d: size_mb(a) for d, a in artifacts.items()}}
    synth = synthetic(root, args.synth_items)
    rows = json.loads((synth / "ctr_train" / "dataset.json").read_text())["vocab"]["item"]
    synth_model = finetuned(synth, root / f"synth-{args.synth_items}-runs")
    synth_artifacts = exported(synth_model, root / f"synth-{args.synth_items}-runs")
    sizes[f"synthetic, {rows:,}-row item table"] = {
        d: size_mb(a) for d, a in synth_artifacts.items()
    }
    print("\nartifact size in MB (whole directory / model.pt2), and the ratio to fp32:")
    for name, by_dtype in sizes.items():
        base = by_dtype["fp32"][0]
        cells = ", ".join(
            f"{d} {total:,.1f} / {pt2:,.1f} ({total / base:.2f}x)"
            for d, (total, pt2) in by_dtype.items()
        )
        print(f"  {name}: {cells}")


if __name__ == "__main__":
    main()
