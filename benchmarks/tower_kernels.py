"""The tower's compiled CPU kernels (recsys.models.fused) against the torch computation they
replace, measured in the same run on one thread: each step forward + backward on the
activations of an L4H64A4 CTR batch, and a whole tower step (bf16 autocast, outputs at the
candidate only, as the ranker runs it).

    python benchmarks/tower_kernels.py
    python benchmarks/tower_kernels.py --batch 128 --length 101 --size L4H128A4

Passes alternate between the two paths and the median of each is printed, so that a host
whose speed drifts moves both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_seconds(step, passes: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="L4H64A4")
    parser.add_argument("--batch", type=int, default=256, help="rows per rank")
    parser.add_argument("--length", type=int, default=51, help="positions (history + 1)")
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from recsys.models import fused
    from recsys.models.tower import Tower, TowerConfig, rotary_tables

    if not fused.NATIVE:
        raise SystemExit("the compiled kernels are not built (pip install -e . builds them)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = TowerConfig.from_name(args.size, max_len=args.length)
    b, t, d, heads = args.batch, args.length, config.hidden, config.heads
    bf16 = torch.bfloat16
    cos, sin = rotary_tables(d // heads, t, config.rope_theta)

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype).requires_grad_()

    x, weight = leaf(b, t, d), leaf(d)
    gate_up = leaf(b, t, 2 * config.ffn, dtype=bf16)
    qkv = leaf(b, t, 3, heads, d // heads, dtype=bf16)
    q, k, v = (leaf(b, t, heads, d // heads).transpose(1, 2) for _ in range(3))

    def backward(out) -> None:
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    steps = {
        "RMSNorm (fp32 in, bf16 out)": (
            lambda: backward(fused.rms_norm(x, weight, 1e-6, bf16)),
            lambda: backward(fused.rms_norm_reference(x, weight, 1e-6, bf16)),
        ),
        "SwiGLU (bf16)": (
            lambda: backward(fused.swiglu(gate_up)),
            lambda: backward(fused.swiglu_reference(gate_up)),
        ),
        "rotary + heads (bf16 in, fp32 out)": (
            lambda: backward(fused.rotary_heads(qkv, cos, sin, 2, torch.float32)),
            lambda: backward(fused.rotary_heads_reference(qkv, cos, sin, 2, torch.float32)),
        ),
        "causal attention (fp32)": (
            lambda: backward(fused.attention(q, k, v, causal=True)),
            lambda: backward(F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ),
    }

    tower = Tower(config)
    tokens = torch.randn(b, t, d, requires_grad=True)
    lengths = torch.randint(t // 5, t, (b,))
    valid = torch.arange(t)[None, :] <= lengths[:, None]

    def tower_step() -> None:
        with torch.autocast("cpu", dtype=bf16):
            out = tower(tokens, valid, at=lengths)
        out.float().square().mean().backward()

    def with_native(native: bool):
        def step() -> None:
            saved, fused.NATIVE = fused.NATIVE, native
            try:
                tower_step()
            finally:
                fused.NATIVE = saved

        return step

    steps[f"tower {args.size}, bf16 autocast, one output per row"] = (
        with_native(True),
        with_native(False),
    )

    print(
        f"{args.size}, {b} rows x {t} positions, one thread; forward + backward, "
        f"median of {args.rounds} x {args.passes} passes"
    )
    width = max(len(name) for name in steps)
    for name, (native, reference) in steps.items():
        times = {"compiled": [], "torch": []}
        for _ in range(args.rounds):  # alternate: a drifting host moves both alike
            times["compiled"].append(median_seconds(native, args.passes))
            times["torch"].append(median_seconds(reference, args.passes))
        ours, theirs = (statistics.median(v) * 1e3 for v in times.values())
        print(
            f"  {name:<{width}}  compiled {ours:7.2f} ms  torch {theirs:7.2f} ms  "
            f"{theirs / ours:4.2f}x"
        )


if __name__ == "__main__":
    main()
