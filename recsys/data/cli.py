"""``recsys data ...``: convert public logs, generate synthetic ones, inspect a dataset.

This module owns the sub-commands' arguments, their progress display and their exit codes;
the work is done by the converters, the generator and ``inspect``, imported when a
sub-command runs. Bad input, bad arguments and OS errors (an ``--out`` that is a file,
read-only, on a full disk) end a command with one line on stderr and exit code 2;
``inspect --check`` exits 1 when it finds problems.
"""

from __future__ import annotations

import argparse
import json


def _reporting_errors(run):
    """Bad input, arguments or paths end the command with one line on stderr and exit code 2,
    no traceback (DataError is a UserError; the configs' checks of arguments raise
    ValueError; a path that cannot be written, OSError)."""
    from recsys.errors import EXIT_USER_ERROR, UserError, report

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, UserError, OSError) as err:
            report(err, prefix=f"recsys data {args.data_command}: error")
            return EXIT_USER_ERROR

    return wrapped


def _protocol_args(parser: argparse.ArgumentParser, min_events: int) -> None:
    group = parser.add_argument_group("protocol (GPSD)")
    group.add_argument(
        "--min-events",
        type=int,
        default=min_events,
        help="drop users with fewer events (default: %(default)s)",
    )
    group.add_argument(
        "--test-quantile",
        type=float,
        default=0.7,
        help="users whose last event is after this quantile of last-event "
        "times are test users (default: %(default)s)",
    )
    group.add_argument(
        "--max-history",
        type=int,
        default=200,
        help="most recent events kept as a CTR sample's history (default: %(default)s)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the negative candidates")
    group.add_argument(
        "--valid-users",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="hold out this fraction of training users (the latest by last event) as "
        "validation users: ctr_valid/ and ctr_fit/ (the other training users) are written "
        "too, for tuning without the test users (default: none)",
    )
    group.add_argument(
        "--dense-train",
        action="store_true",
        help="also write ctr_train_dense/ (and ctr_fit_dense/): a positive and a negative "
        "sample at every position of each training user's sequence, not only the last",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory: seq/, ctr_train/, ctr_test/ are written there, all or nothing",
    )
    parser.add_argument(
        "--row-group-rows",
        type=int,
        default=65_536,
        help="rows per Parquet row group (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _protocol(args: argparse.Namespace):
    from recsys.data.protocol import ProtocolConfig

    return ProtocolConfig(
        min_events=args.min_events,
        test_quantile=args.test_quantile,
        max_history=args.max_history,
        seed=args.seed,
        valid_users=args.valid_users,
        dense_train=args.dense_train,
    )


def _run(args: argparse.Namespace, produce) -> int:
    """Produce a split with a progress bar over the stages, write it, print the counts."""
    from tqdm import tqdm

    from recsys.data.protocol import write_split
    from recsys.data.writer import check_target

    check_target(args.out, args.overwrite)  # before any work, not after it
    # The bar is closed, its line ended, when the block ends, by an error too.
    with tqdm(total=2, desc=f"recsys data {args.data_command}", unit="stage") as bar:
        bar.set_postfix_str("read + split")
        result, source = produce()
        bar.update()
        bar.set_postfix_str(f"write {args.out}")
        written = write_split(
            args.out, result, source, overwrite=args.overwrite, row_group_rows=args.row_group_rows
        )
        bar.update()
    for name, meta in written.items():
        print(f"{args.out}/{name}: {meta.rows:,} rows ({meta.kind})")
    print("counts: " + ", ".join(f"{k} {v:,}" for k, v in result.counts.items()))
    for key in ("checked_against", "oracle_auc_expected", "oracle_auc_test"):
        if source.get(key) is not None:
            print(f"{key}: {source[key]}")
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from recsys.data.convert import movielens

    return _run(args, lambda: movielens.convert(args.input, _protocol(args), args.expect))


def _taobao(args: argparse.Namespace) -> int:
    from recsys.data.convert import taobao

    behaviours = tuple(b for b in args.behaviours.split(",") if b)
    return _run(args, lambda: taobao.convert(args.input, _protocol(args), behaviours))


def _amazon(args: argparse.Namespace) -> int:
    from recsys.data.convert import amazon

    return _run(args, lambda: amazon.convert(args.reviews, args.meta, _protocol(args)))


def _synth(args: argparse.Namespace) -> int:
    from recsys.data import synth

    config = synth.SynthConfig(
        users=args.users,
        items=args.items,
        categories=args.categories,
        min_events=args.min_len,
        max_events=args.max_len,
        stay=args.stay,
        zipf=args.zipf,
        merge=args.merge,
        conditions=args.conditions,
        seed=args.seed,
    )
    if args.stream or args.hash_ids:
        return _synth_stream(args, config)
    if args.table_rows:
        raise ValueError("--table-rows is the hashed item table's size: add --hash-ids")
    return _run(args, lambda: synth.make(config, _protocol(args)))


def _synth_stream(args: argparse.Namespace, config) -> int:
    """``synth --stream``: generated and written block by block (``synth_stream``)."""
    from recsys.data import synth_stream
    from recsys.data.writer import check_target

    stream = synth_stream.StreamSynthConfig(
        config, hash_ids=args.hash_ids, table_rows=args.table_rows
    )
    check_target(args.out, args.overwrite)
    written, report = synth_stream.write(
        args.out,
        stream,
        _protocol(args),
        overwrite=args.overwrite,
        row_group_rows=args.row_group_rows,
    )
    for name, meta in written.items():
        print(f"{args.out}/{name}: {meta.rows:,} rows ({meta.kind}, id_mode {meta.id_mode})")
    print("counts: " + ", ".join(f"{k} {v:,}" for k, v in report["counts"].items()))
    for key in ("oracle_auc_expected", "oracle_auc_test"):
        print(f"{key}: {report[key]}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from recsys.data import inspect

    if args.check:
        findings = inspect.check(args.path, limit=args.show)
        as_json = json.dumps(findings.as_dict(), indent=2)
        print(as_json if args.json else inspect.render_check(findings, args.path))
        return 1 if findings.count() else 0
    summary = inspect.summarise(args.path)
    print(json.dumps(summary, indent=2) if args.json else inspect.render(summary))
    return 0


def _requests(args: argparse.Namespace) -> int:
    from recsys.data import raw_requests

    rows = raw_requests.write(
        args.dataset,
        args.out,
        limit=args.limit,
        labels=not args.no_labels,
        overwrite=args.overwrite,
    )
    print(f"{args.out}: {rows:,} requests from {args.dataset}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``recsys data`` and its sub-commands."""
    data = commands.add_parser(
        "data",
        help="convert, generate and inspect datasets",
        description="Convert public behaviour logs or generate synthetic "
        "ones into recsys datasets (seq + ctr Parquet, see docs/data.md), "
        "and inspect datasets.",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    ml = sub.add_parser(
        "movielens",
        help="MovieLens (100K, 1M, 10M, 20M, RecBole's ml-100k)",
        description="Convert MovieLens ratings with the GPSD protocol; genres "
        "are the side feature. --input is the ratings file, its directory, or "
        "a zip/wheel holding it (e.g. the recbole 1.2.1 wheel, which ships "
        "ml-100k: pip download --no-deps recbole==1.2.1).",
    )
    ml.add_argument("--input", required=True, help="ratings file, directory or .zip/.whl")
    ml.add_argument(
        "--expect",
        default="auto",
        help="check the counts against a release: "
        "auto (recognise it by its number of ratings), none, ml-100k, ml-1m, "
        "ml-10m, ml-20m (default: %(default)s)",
    )
    _protocol_args(ml, min_events=4)
    ml.set_defaults(run=_reporting_errors(_movielens))

    tb = sub.add_parser(
        "taobao",
        help="Taobao UserBehavior.csv",
        description="Convert Taobao's UserBehavior.csv with the GPSD protocol; "
        "item categories are the side feature.",
    )
    tb.add_argument("--input", required=True, help="UserBehavior.csv (or .gz), or its directory")
    tb.add_argument(
        "--behaviours",
        default="pv",
        help="comma-separated behaviours kept: pv, buy, cart, fav (default: pv)",
    )
    _protocol_args(tb, min_events=10)
    tb.set_defaults(run=_reporting_errors(_taobao))

    am = sub.add_parser(
        "amazon",
        help="Amazon reviews + metadata (2014 or 2018 releases)",
        description="Convert Amazon reviews with the GPSD protocol; the most "
        "specific category of each item is the side feature.",
    )
    am.add_argument("--reviews", required=True, help="reviews JSON lines (.json or .json.gz)")
    am.add_argument("--meta", help="item metadata JSON lines with categories (optional)")
    _protocol_args(am, min_events=4)
    am.set_defaults(run=_reporting_errors(_amazon))

    sy = sub.add_parser(
        "synth",
        help="synthetic logs with a planted structure",
        description="Generate behaviour logs where items belong to latent "
        "clusters and users drift between them (a known answer: the oracle "
        "AUC is printed), then split them with the GPSD protocol.",
    )
    sy.add_argument("--users", type=int, default=1_000)
    sy.add_argument("--items", type=int, default=500)
    sy.add_argument("--categories", type=int, default=10, help="latent clusters")
    sy.add_argument("--min-len", type=int, default=10, help="shortest user sequence")
    sy.add_argument("--max-len", type=int, default=50, help="longest user sequence")
    sy.add_argument(
        "--stay", type=float, default=0.8, help="probability of staying in the current cluster"
    )
    sy.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    sy.add_argument(
        "--merge",
        type=int,
        default=1,
        help="clusters per value of the category side feature (default: %(default)s, the "
        "cluster itself); above 1 the exact cluster is learnt only from co-occurrence",
    )
    sy.add_argument(
        "--conditions",
        type=int,
        default=0,
        help="values of a 'condition' feature per event (LUM), each with its own walk "
        "between clusters per user, so the next item depends on the condition (default: none)",
    )
    sy.add_argument(
        "--stream",
        action="store_true",
        help="generate and write block by block with bounded memory (catalogues of tens of "
        "millions of items): the item table holds the whole catalogue, item i is id i",
    )
    sy.add_argument(
        "--hash-ids",
        action="store_true",
        help="(implies --stream) write raw 64-bit item keys, id_mode hash, no vocabularies",
    )
    sy.add_argument(
        "--table-rows",
        type=int,
        default=0,
        help="with --hash-ids: the item table's rows, smaller than --items allowed "
        "(default: --items)",
    )
    _protocol_args(sy, min_events=4)
    sy.set_defaults(run=_reporting_errors(_synth))

    ins = sub.add_parser(
        "inspect",
        help="schema, rows, vocab sizes, length histogram",
        description="Summarise a dataset directory (or file, or URI), or check every value "
        "of it (--check): exit code 0 when the stream would read it all, 1 with a line per "
        "problem found (file, row group, row, column), 2 when it cannot be checked at all.",
    )
    ins.add_argument("path")
    ins.add_argument("--json", action="store_true", help="print the summary (or check) as JSON")
    ins.add_argument(
        "--check",
        action="store_true",
        help="read every row group of every file and report every value, row group and file "
        "the stream would refuse, instead of the summary",
    )
    ins.add_argument(
        "--show",
        type=int,
        default=20,
        metavar="N",
        help="--check: problems shown per column, the rest counted (default: %(default)s)",
    )
    ins.set_defaults(run=_reporting_errors(_inspect))

    rq = sub.add_parser(
        "requests",
        help="a ctr dataset as raw-key requests (for predict and exported models)",
        description="Write the samples of a ctr dataset as requests in raw keys (user_id, "
        "history, candidate, label), mapped back through the dataset's vocabularies: what "
        "python -m recsys.stages.predict and an exported model's score.py read "
        "(docs/serving.md).",
    )
    rq.add_argument("dataset", help="a ctr dataset with vocabularies (a converter's split)")
    rq.add_argument("--out", required=True, help="Parquet file to write")
    rq.add_argument("--limit", type=int, help="the first N samples only (default: all)")
    rq.add_argument("--no-labels", action="store_true", help="leave the labels out")
    rq.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    rq.set_defaults(run=_reporting_errors(_requests))
