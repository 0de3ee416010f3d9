"""``recsys plan``: the command line of offline sharding plans.

This module owns the arguments of ``recsys plan`` and their dispatch to
``recsys.plan.make`` (plan), ``recsys.plan.show`` (show, compare) and
``recsys.plan.planfile`` (write).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from recsys.plan.hosts import HOSTS, cluster

EPILOG = """examples:
  recsys plan --config configs/ml100k/2026-11-23-demo.yaml data.train=data/ml100k/ctr_train \
      -j 1x2 --device cpu --host cpu
  recsys plan --table item=4e9x64 --table category=1e5 -j 8x8 --host a100-40gb --out plan.json
  recsys plan --table item=4e9x64 --world-size 32 --frozen item model.size=L4H64A4
  recsys plan --compare plan.json plan-80gb.json   (exit 1 when they differ)
Training stages use a written plan with the override plan.file=plan.json (or plan=plan.json).
"""


def add_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "plan",
        help="plan the sharding of a model's tables for a cluster, offline, and show it",
        description="Build a stage's model on the meta device (no memory for its tables), run "
        "TorchRec's planner for the hosts named, and print per table its sharding type, "
        "kernel, ranks and shard shapes, and per rank the HBM and DDR used by weights, "
        "optimizer state and buffers, with the imbalance and totals. --out writes the plan "
        "(docs/plan.md) for training stages (plan.file=PLAN). A plan that cannot fit names "
        "the table, its needs, the memory there is and what would fit.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="stage config (YAML); default: built-in defaults")
    p.add_argument(
        "--stage",
        default="finetune",
        choices=["pretrain", "finetune"],
        help="whose model to plan (default: %(default)s)",
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--world-size", type=int, help="ranks in all (hosts filled in turn)")
    shape.add_argument("-j", dest="job", metavar="NNODESxNPROC", help="hosts × ranks per host")
    p.add_argument(
        "--host",
        default="a100-40gb",
        choices=sorted(HOSTS),
        help="host preset (default: %(default)s)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: the host's")
    p.add_argument("--hbm-gb", type=float, help="HBM per rank, GB (default: the host's)")
    p.add_argument("--ddr-gb", type=float, help="host memory per host, GB (default: the host's)")
    p.add_argument("--batch-size", type=int, help="per-rank batch (default: data.batch_size)")
    p.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="NAME=ROWS[xDIM]",
        help="a table's rows (and width, which must be the model's), e.g. item=4e9x64; "
        "repeat for each table; without a dataset (data.train) every table must be given",
    )
    p.add_argument(
        "--frozen", default="", metavar="TABLES", help="comma-separated frozen tables (SF)"
    )
    p.add_argument(
        "--frozen-dtype",
        help="how the --frozen tables are stored: fp32, fp16 or int8 (default: the config's "
        "freeze.dtype)",
    )
    p.add_argument(
        "--sharding-types",
        action="append",
        default=[],
        metavar="[TABLE=]TYPES",
        help="allowed sharding types, comma-separated, for one table (item=row_wise) or all "
        "(row_wise); default: the config's plan.sharding_types",
    )
    p.add_argument(
        "--compute-kernels",
        default="fused",
        metavar="KERNELS",
        help="allowed kernels: fused, fused_uvm_caching, fused_uvm (default: %(default)s)",
    )
    p.add_argument("--out", metavar="PLAN.json", help="write the plan here")
    p.add_argument("--format", default="table", choices=["table", "json", "markdown"])
    p.add_argument("--show", metavar="PLAN.json", help="show a written plan instead")
    p.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"), help="the differences of two plans"
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(run=main)


def _sharding_types(values: list[str]) -> dict[str, list[str]]:
    """``item=row_wise,table_wise`` → ``{"item": [...]}``; a bare list applies to every
    table (key ``*``)."""
    from recsys.plan.make import PlanError

    out: dict[str, list[str]] = {}
    for value in values:
        name, sep, types = value.rpartition("=")
        chosen = [t for t in types.split(",") if t]
        if not chosen:
            raise PlanError(f"--sharding-types {value!r}: no sharding type given")
        out[name if sep else "*"] = chosen
    return out


def quiet_planner() -> None:
    """TorchRec's planner warns about its own defaults on every offline plan (a directly
    built topology, the heuristic storage reserve on meta tensors); the plan says what it
    assumed, so those warnings are dropped here."""
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\.")


def main(args: argparse.Namespace) -> int:
    quiet_planner()
    return _run(args)  # a user error: one line and exit code 2 (recsys.cli's guard)


def _run(args: argparse.Namespace) -> int:
    from recsys.plan import planfile, show

    if args.compare:
        a, b = (planfile.read(p) for p in args.compare)
        lines = show.compare(a, b, tuple(args.compare))
        print("\n".join(lines) if lines else "the plans place every table the same way")
        return 1 if lines else 0
    if args.show:
        print(show.render(planfile.read(args.show), args.format))
        return 0
    # Making a plan builds the stage's model: only now are models and stages imported.
    from recsys.plan.make import Request, make, parse_tables
    from recsys.stages.config import load

    if args.out:
        check_out(Path(args.out))
    config = load(args.config, args.overrides, args.stage)
    ranks = cluster(
        args.host,
        world_size=args.world_size,
        job=args.job,
        device=args.device,
        hbm_gb=args.hbm_gb,
        ddr_gb=args.ddr_gb,
    )
    frozen = tuple(t for t in args.frozen.split(",") if t)
    request = Request(
        stage=args.stage,
        tables=parse_tables(args.table),
        frozen=frozen,
        frozen_dtype=args.frozen_dtype or (config.freeze.dtype if frozen else "fp32"),
        sharding_types=_sharding_types(args.sharding_types),
        compute_kernels=tuple(k for k in args.compute_kernels.split(",") if k),
        batch_size=args.batch_size,
    )
    doc = make(config, request, ranks)
    if args.out:
        write(doc, Path(args.out))
    print(show.render(doc, args.format))
    if args.out:
        print(f"plan written to {args.out}", file=sys.stderr)
    return 0


def check_out(path: Path) -> None:
    """``--out`` names a file that can be written: not a directory, not under a file."""
    from recsys.plan.make import PlanError

    if path.is_dir():
        raise PlanError(f"--out {path}: is a directory; give a file, e.g. {path / 'plan.json'}")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise PlanError(f"--out {path}: lies under {above}, a file")


def write(doc: dict, path: Path) -> None:
    """The plan to ``path`` (whole or not at all), or a PlanError naming ``--out`` (not the
    temporary file the plan is written to first)."""
    from recsys.errors import os_reason
    from recsys.plan import planfile
    from recsys.plan.make import PlanError

    try:
        planfile.write(doc, path)
    except OSError as err:
        raise PlanError(f"--out {path}: cannot be written: {os_reason(err)}") from None
