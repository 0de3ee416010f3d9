"""Training-step throughput of the CTR model: sharded on 2 gloo ranks against one process with
plain unsharded tables, measured in the same run; and tower TFLOP/s and MFU on a GPU.

    python benchmarks/model_step.py                    # CPU: L4H64A4, history 100, batch 256
    python benchmarks/model_step.py --tower-only --device cuda --size L12H768A12

A step is forward + backward + optimizer, with the same optimizers on both sides: row-wise
Adagrad for the tables (fused into backward for the sharded model; TorchRec's own row-wise
Adagrad over the plain tables' dense gradients for the baseline) and AdamW for the dense
part (data-parallel through DDP when sharded). The baseline runs in one process with all
cores. Both see the same global batch. ``--tower-only`` times the Transformer tower
alone (pure torch, bf16 autocast on CUDA), eager and compiled block by block, and reports
achieved TFLOP/s and the fraction of the device's peak (MFU).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch
from common import print_rates, seconds_per_step, slowest_rank


@dataclass(frozen=True)
class Setting:
    size: str
    history: int
    batch: int
    """Global samples per step."""
    items: int
    steps: int
    warmup: int


def _batch(setting: Setting, n: int, seed: int):
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((n,), setting.history)
    ones = torch.ones(n, dtype=torch.long)
    values = torch.cat(
        [
            torch.randint(0, setting.items, (n * (setting.history + 1),), generator=g),
            torch.randint(0, 100, (n * (setting.history + 1),), generator=g),
        ]
    )
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["history_item", "candidate_item", "history_category", "candidate_category"],
        values=values,
        lengths=torch.cat([lengths, ones, lengths, ones]),
    )
    return features, torch.randint(0, 2, (n,), generator=g).float()


def _config(setting: Setting):
    from recsys.models.ctr import CTRConfig
    from recsys.models.tower import TowerConfig

    return CTRConfig(
        TowerConfig.from_name(setting.size, max_len=setting.history + 1),
        setting.items,
        {"category": 100},
    )


def unsharded(setting: Setting) -> float:
    """Seconds per step in one process with plain (unsharded) TorchRec tables."""
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from recsys.models.ctr import CTRModel

    torch.set_num_threads(os.cpu_count() or 1)
    model = CTRModel(_config(setting))
    tables = RowWiseAdagrad(list(model.sparse.parameters()), lr=0.01)
    dense = torch.optim.AdamW(
        [p for n, p in model.named_parameters() if not n.startswith("sparse.")], lr=1e-3
    )
    batches = [_batch(setting, setting.batch, i) for i in range(2)]

    def step(i: int) -> None:
        out = model(*batches[i % 2])
        tables.zero_grad()
        dense.zero_grad()
        out.loss.backward()
        tables.step()
        dense.step()

    return seconds_per_step(step, setting.warmup, setting.steps)


def sharded_worker(setting: Setting) -> float:
    """Seconds per step on this rank; the job's step ends with its slowest rank."""
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from recsys.distributed.env import distributed
    from recsys.distributed.planning import manual_plan
    from recsys.distributed.wrap import shard
    from recsys.models.ctr import CTRModel

    with distributed("cpu") as env:
        model = CTRModel(_config(setting), sparse_device=torch.device("meta"))
        apply_optimizer_in_backward(RowWiseAdagrad, model.sparse.parameters(), {"lr": 0.01})
        plan = manual_plan(
            model, {"item": "row_wise", "category": "table_wise"}, world_size=env.world_size
        )
        sharded = shard(model, plan, env)
        dense = [p for n, p in sharded.named_parameters() if "sparse." not in n]
        optimizer = torch.optim.AdamW(dense, lr=1e-3)
        local = setting.batch // env.world_size
        batches = [_batch(setting, local, 10 * env.rank + i) for i in range(2)]

        def step(i: int) -> None:
            out = sharded(*batches[i % 2])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()

        return slowest_rank(seconds_per_step(step, setting.warmup, setting.steps))


def tower_only(size: str, length: int, batch: int, device: str, steps: int) -> None:
    """The tower alone, eager and compiled block by block (``run.compile``), in bf16 on
    CUDA (fp32 on CPU): tokens/s, TFLOP/s and MFU of each, measured in the same run."""
    from recsys.models.tower import Tower, TowerConfig
    from recsys.train.compiling import compile_towers
    from recsys.train.throughput import peak_tflops, tower_flops

    config = TowerConfig.from_name(size, max_len=length)
    eager = Tower(config).to(device)
    compiled = Tower(config).to(device)
    compiled.load_state_dict(eager.state_dict())
    compile_towers(compiled)
    x = torch.randn(batch, length, config.hidden, device=device, requires_grad=True)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    bf16 = device == "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(torch.device(device), bf16)
    for label, model in (("eager", eager), ("compiled", compiled)):

        def step(model=model) -> None:
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                y = model(x, valid)
            y.float().square().mean().backward()

        for _ in range(3):  # the compiled one compiles here
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        achieved = tower_flops(config, batch * length, length) / seconds / 1e12
        mfu = f", MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s" if peak else ""
        print(
            f"tower {size} {label}, {batch} × {length} tokens on {name} "
            f"({'bf16' if bf16 else 'fp32'}): {batch * length / seconds:,.0f} tokens/s, "
            f"{achieved:.2f} TFLOP/s{mfu}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=None, help="L4H64A4 (CTR step) / L12H768A12 (tower)")
    parser.add_argument("--history", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256, help="global samples per step")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tower-only", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.tower_only:
        tower_only(args.size or "L12H768A12", args.history + 1, args.batch, args.device, args.steps)
        return

    from recsys.distributed.launch import run_on_ranks

    setting = Setting(
        args.size or "L4H64A4", args.history, args.batch, args.items, args.steps, args.warmup
    )
    cores = os.cpu_count() or 1
    results = {
        f"baseline: plain unsharded tables, 1 process x {cores} threads": unsharded(setting),
        f"sharded: 2 gloo ranks x {max(1, cores // 2)} threads (row-wise item table)": run_on_ranks(
            sharded_worker, setting, world_size=2, quiet=True
        )[0],
    }
    print(
        f"CTR model {setting.size}, history {setting.history}, global batch {setting.batch}, "
        f"{setting.items:,} items; {setting.steps} timed steps after {setting.warmup}"
    )
    print_rates({name: setting.batch / seconds for name, seconds in results.items()}, "samples")


if __name__ == "__main__":
    main()
