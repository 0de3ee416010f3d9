"""Time to plan a 4e9 × 64 item table plus side tables for clusters of A100-40GB hosts.

For each world size (32, 64 and 128 ranks by default, 8 per host) this builds the finetune
model on the meta device and runs TorchRec's planner through ``recsys.plan.make`` (what
``recsys plan`` does), then prints the seconds it took (model + planner, imports excluded),
the largest and mean HBM per rank and the process's peak memory. The baseline is the same
plan for the smallest world size, so the ratios show how planning time grows with ranks.

    python benchmarks/plan_scale.py
    python benchmarks/plan_scale.py --world-sizes 64 --items 4e9 --host a100-80gb

Target: under 10 s for 64 ranks.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="32,64,128")
    parser.add_argument("--items", type=float, default=4e9, help="rows of the item table")
    parser.add_argument("--dim", type=int, default=64, help="width (model.size's H)")
    parser.add_argument(
        "--side",
        default="category=1e5,brand=1e7,shop=1e8",
        help="side tables NAME=ROWS, comma-separated",
    )
    parser.add_argument("--host", default="a100-40gb")
    parser.add_argument("--repeats", type=int, default=2, help="plans per size; best kept")
    args = parser.parse_args()

    from recsys.distributed.planning import SHARDING_TYPES
    from recsys.plan.cli import quiet_planner
    from recsys.plan.hosts import cluster
    from recsys.plan.make import Request, make, parse_table
    from recsys.plan.measure import peak_rss_bytes
    from recsys.stages.config import load

    quiet_planner()
    tables = dict([parse_table(f"item={args.items:.0f}")])
    tables.update(parse_table(t) for t in args.side.split(",") if t)
    config = load(None, [f"model.size=L4H{args.dim}A4", "data.batch_size=512"], "finetune")
    print(
        f"finetune model L4H{args.dim}A4, tables "
        + ", ".join(f"{n} {r:,.0f}×{args.dim}" for n, (r, _) in tables.items())
        + f", on {args.host} hosts of 8"
    )
    for label, types in (
        ("item row_wise (the config's constraint)", {}),
        ("every table: any of table/row/column_wise", {"*": list(SHARDING_TYPES)}),
    ):
        print(f"{label}:")
        request = Request(tables=tables, sharding_types=types)
        rows = []
        for world in (int(w) for w in args.world_sizes.split(",")):
            ranks = cluster(args.host, world_size=world)
            best, doc = float("inf"), None
            for _ in range(args.repeats):
                start = time.perf_counter()
                doc = make(config, request, ranks)
                best = min(best, time.perf_counter() - start)
            hbm = [r["hbm_bytes"] for r in doc["ranks"]]
            rows.append((world, best, max(hbm), sum(hbm) / len(hbm)))
        report(rows)
    peak_mb = peak_rss_bytes() / 2**20
    print(f"process peak memory: {peak_mb:,.0f} MB (the tables alone would take TBs)")


def report(rows: list[tuple[int, float, float, float]]) -> None:
    from recsys.plan.hosts import GB

    base = rows[0][1]
    head = f"vs {rows[0][0]}"
    print(f"  {'ranks':>5} {'seconds':>8} {head:>7} {'max HBM':>10} {'mean HBM':>10}")
    for world, seconds, top, mean in rows:
        print(
            f"  {world:>5} {seconds:>8.2f} {seconds / base:>6.2f}x "
            f"{top / GB:>7.2f} GB {mean / GB:>7.2f} GB"
        )
    at64 = [s for w, s, _, _ in rows if w == 64]
    if at64:
        verdict = "met" if at64[0] < 10 else "NOT met"
        print(f"  target, 64 ranks in < 10 s: {verdict} ({at64[0]:.2f} s)")


if __name__ == "__main__":
    main()
