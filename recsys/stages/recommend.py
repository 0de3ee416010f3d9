"""``recsys recommend``: the ``retrieve`` stage in this process, and its first answers shown.

    recsys recommend --model runs/tiny/pretrain --data data/synth/ctr_test --out runs/tiny/recommend

A convenience for a look at a pretrained model's answers on one host: it runs
:mod:`recsys.stages.retrieve` as a world of one (no torchrun; jobs of several ranks run the
stage or its component) and prints its results and the first users' top items, in raw ids.
"""

from __future__ import annotations

import argparse

import pyarrow.parquet as pq


def add_command(commands: argparse._SubParsersAction) -> None:
    """``recsys recommend``."""
    p = commands.add_parser(
        "recommend",
        help="top K items per user over the whole catalogue from a pretrain stage",
        description="Run the retrieve stage in this process: each user's top K known items "
        "over the whole catalogue, from a finished pretrain stage; on a ctr dataset also "
        "full-catalogue HR@K, NDCG@K and MRR of the held-out items. Prints the results and "
        "the first users' answers.",
    )
    p.add_argument("--model", required=True, help="finished pretrain stage")
    p.add_argument("--data", required=True, help="seq dataset, or ctr dataset (evaluated)")
    p.add_argument("--out", required=True, help="the retrieve stage's directory")
    p.add_argument("--k", type=int, default=10, help="items per user (default: %(default)s)")
    p.add_argument(
        "--exclude-seen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave the history's items out (default: yes)",
    )
    p.add_argument("--show", type=int, default=5, help="users printed (default: %(default)s)")
    p.add_argument("--config", help="YAML stage config (data.batch_size, plan)")
    p.add_argument("--force", action="store_true", help="run again over a finished stage")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from recsys.stages import retrieve

    argv = [
        *("--model", args.model, "--data", args.data, "--out", args.out, "--k", str(args.k)),
        "--exclude-seen" if args.exclude_seen else "--no-exclude-seen",
        *(["--config", args.config] if args.config else []),
        *(["--force"] if args.force else []),
        *args.overrides,
    ]
    record = retrieve.main(argv)
    print(" ".join(f"{name}={value:.4g}" for name, value in record["results"].items()))
    part = f"{args.out}/recommendations/part-00000.parquet"
    for row in pq.read_table(part).slice(0, max(args.show, 0)).to_pylist():
        items = " ".join(str(i) for i in row["items"])
        target = f" (held out: {row['target_item']}, rank {row['target_rank']})"
        print(f"user {row['user_id']}: {items}" + (target if "target_item" in row else ""))
    return 0
