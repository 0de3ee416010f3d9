"""The ``recsys`` command: one sub-command per job a user runs by hand.

This module owns argument parsing and dispatch only; each sub-command's work lives in its own
module, imported when the sub-command runs so that ``recsys --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from recsys import __version__


def _seconds(text: str) -> float:
    """A time limit in seconds: a finite number > 0 (argparse's type)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds > 0")
    return value


def _doctor(args: argparse.Namespace) -> int:
    from recsys import doctor

    return doctor.main(as_json=args.json, timeout=args.timeout)


def _stopped(err, args: argparse.Namespace) -> int:
    """A pipeline stopped by a signal: one line, and the signal's exit code."""
    from recsys.errors import fresh_line

    fresh_line()
    print(
        f"recsys {args.command}: stopped by {err.sigval.name} (its jobs end with it); the same "
        "command resumes the study",
        file=sys.stderr,
    )
    return 128 + int(err.sigval)


def _experiment(args: argparse.Namespace) -> int:
    from torchx.schedulers.local_scheduler import SignalException

    from recsys import report
    from recsys.errors import report as report_error
    from recsys.pipelines import experiment
    from recsys.pipelines.gpsd import PipelineError, StageFailed

    spec = experiment.load(args.experiment)
    try:  # the report's settings fail now, not after the study
        if "out" in spec.report:
            report.check_out(Path(spec.report["out"]))
        report.read_notes(spec.report.get("notes", ""))
    except report.ReportError as err:
        raise PipelineError(f"{spec.path}: {err}") from None
    try:
        steps = experiment.run(spec, args.profile, args.profiles)
    except StageFailed as err:  # the job ran and failed: its lines, exit code 1
        report_error(err, f"recsys {args.command}")
        return 1
    except SignalException as err:  # Ctrl-C or SIGTERM while TorchX's local scheduler waits
        return _stopped(err, args)
    skipped = sum(s.skipped for s in steps)
    print(f"{len(steps)} stages, {skipped} skipped (done with the same inputs and config)")
    table, _ = report.write(spec.out, **spec.report)
    print(table)
    print(
        f"report: {spec.out}/report.md"
        + (f" and {spec.report['out']}" if "out" in spec.report else "")
    )
    return 0


def _names(text: str | None) -> tuple[str, ...]:
    """``a,b,,c`` → ``("a", "b", "c")``."""
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def _data_directory(data: str) -> None:
    """``--data`` is a directory (URIs are left to the stages, which read them)."""
    from recsys.pipelines.gpsd import PipelineError

    if "://" in data or Path(data).is_dir():
        return
    problem = "is not a directory" if Path(data).exists() else "no such directory"
    raise PipelineError(
        f"--data {data}: {problem}; give the directory holding seq/, ctr_train/ and "
        "ctr_test/ (made by `recsys data movielens` or `recsys data synth`)"
    )


def _pipeline(args: argparse.Namespace) -> int:
    from torchx.schedulers.local_scheduler import SignalException

    from recsys import report
    from recsys.errors import report as report_error
    from recsys.pipelines.gpsd import STRATEGIES, PipelineError, StageFailed, Study, run

    if args.experiment.endswith((".yaml", ".yml")):
        given = args.retrieve_k is not None
        if args.data or args.config or args.sizes or args.baselines or args.overrides or given:
            raise PipelineError(
                "an experiment file gives data, config, sizes and arms itself; --data, "
                "--config, --sizes, --baselines, --retrieve-k and overrides go with a directory"
            )
        return _experiment(args)
    if not args.data:
        raise PipelineError("--data is required with an experiment directory")
    _data_directory(args.data)
    strategies = STRATEGIES if args.strategies.strip() == "all" else _names(args.strategies)
    study = Study(
        experiment=args.experiment,
        data=args.data,
        config=args.config,
        strategies=strategies,
        sizes=_names(args.sizes),
        overrides=tuple(args.overrides),
        baselines=_names(args.baselines),
        **({} if args.retrieve_k is None else {"retrieve_k": args.retrieve_k}),
    )
    try:
        steps = run(study, args.profile or "local_cwd", args.profiles)
    except StageFailed as err:  # the job ran and failed: its lines, exit code 1
        report_error(err, f"recsys {args.command}")
        return 1
    except SignalException as err:  # Ctrl-C or SIGTERM while TorchX's local scheduler waits
        return _stopped(err, args)
    skipped = sum(s.skipped for s in steps)
    print(f"{len(steps)} stages, {skipped} skipped (done with the same inputs and config)")
    table, _ = report.write(args.experiment)
    print(table)
    print(f"report: {args.experiment}/report.md, report.json and figures")
    return 0


def _report(args: argparse.Namespace) -> int:
    from recsys import report

    options: dict = {}
    experiment = args.experiment
    if experiment.endswith((".yaml", ".yml")):  # an experiment file: its out and report
        from recsys.pipelines import experiment as experiments

        spec = experiments.load(experiment)
        experiment, options = str(spec.out), dict(spec.report)
    if args.out:
        options["out"] = args.out
    if args.title:
        options["title"] = args.title
    table, _ = report.write(experiment, **options)
    print(table)
    if "out" in options:
        print(f"report: {options['out']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from recsys.serve.export import export

    manifest = export(args.model, args.out, args.dtype, args.force)
    size = sum(manifest["files"].values())
    print(f"{args.model} → {args.out} ({manifest['dtype']} tables, {size:,} bytes)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Generative pretraining for Transformer rankers on TorchRec (GPSD).",
    )
    parser.add_argument("--version", action="version", version=f"recsys {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    doctor = commands.add_parser(
        "doctor",
        help="check that this host's stack can train (versions, accelerator, a 2-rank job)",
        description="Print the versions of the stack, the accelerator and the distributed "
        "backends, then prove the stack works with a 2-process gloo job that shards a TorchRec "
        "EmbeddingCollection and takes a forward/backward step. Exit code 0 only when every "
        "check passes; each failed check names its cause and the fix.",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--timeout",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="limit for the 2-rank job (default: %(default)s)",
    )
    doctor.set_defaults(run=_doctor)

    pipeline = commands.add_parser(
        "pipeline",
        help="run the GPSD stages as TorchX jobs (pretrain → transfer → freeze → finetune)",
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    run = pipeline.add_parser(
        "run",
        help="run a study: every strategy and size, skipping finished stages",
        description="Chain pretrain, transfer, freeze and finetune through the TorchX runner on "
        "a scheduler profile of torchx.yaml; a rerun skips stages DONE with the same inputs "
        "and config and resumes an interrupted one. Writes EXPERIMENT/report.md.",
    )
    run.add_argument("--data", help="directory with seq/, ctr_train/, ctr_test/")
    run.add_argument(
        "--experiment",
        required=True,
        help="directory of the stages and report, or an experiment file (.yaml: data, "
        "config, arms, seeds and report in one file, see configs/README.md)",
    )
    run.add_argument("--config", help="stage config (YAML) for every stage")
    run.add_argument(
        "--strategies", default="ST&SF", help="comma-separated NT,FT,ST,FT&SF,ST&SF, or all"
    )
    run.add_argument("--sizes", help="comma-separated model sizes, e.g. L4H32A4,L4H64A4")
    run.add_argument(
        "--baselines", help="also run these CTR baselines with NT and ST&SF: deepfm,din"
    )
    run.add_argument(
        "--retrieve-k",
        type=int,
        help="K of the retrieve stage after each pretraining: full-catalogue HR@K, NDCG@K "
        "and MRR in the report (default: 10; 0: no retrieve stage)",
    )
    run.add_argument("--profile", help="profile of torchx.yaml (default: local_cwd)")
    run.add_argument("--profiles", help="the profiles file (default: the project's torchx.yaml)")
    run.add_argument("overrides", nargs="*", metavar="section.key=value")
    run.set_defaults(run=_pipeline)

    report = commands.add_parser(
        "report",
        help="write the report of an experiment's finished finetune stages",
        description="Read every finished finetune stage under EXPERIMENT (a directory, or an "
        "experiment file: its out directory and report settings) and write report.md, "
        "report.json and figures there: AUC per size × model × strategy over seeds, the "
        "popularity baseline and standard errors, overfitting gaps, scaling-law fits, wall "
        "times, and where the numbers agree with GPSD's claims.",
    )
    report.add_argument("experiment", help="experiment directory or experiment file (.yaml)")
    report.add_argument(
        "--out", help="also write the report to this markdown file, figures beside it"
    )
    report.add_argument("--title", help="the report's title")
    report.set_defaults(run=_report)

    export = commands.add_parser(
        "export",
        help="write a finetuned model as an artifact plain PyTorch serves (torch.export)",
        description="From a finished finetune stage, write OUT/model.pt2 (torch.export: "
        "history and candidate ids → click probability), OUT/vocab/, OUT/manifest.json and "
        "OUT/score.py, which scores raw requests or a ctr dataset with torch, pyarrow and "
        "numpy only (docs/serving.md). Not `recsys checkpoint export`, which writes a "
        "checkpoint's tensors to one file.",
    )
    export.add_argument("--model", required=True, help="finished finetune stage")
    export.add_argument("--out", required=True, help="artifact directory to write")
    export.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="how the tables are stored (int8: row-wise, per-row scale and offset; "
        "default: %(default)s)",
    )
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(run=_export)

    from recsys.checkpoint.cli import add_command as add_checkpoint_command
    from recsys.data.cli import add_commands as add_data_commands
    from recsys.plan.cli import add_command as add_plan_command
    from recsys.stages.configshow import add_command as add_config_command
    from recsys.stages.recommend import add_command as add_recommend_command

    add_data_commands(commands)
    add_plan_command(commands)
    add_checkpoint_command(commands)
    add_config_command(commands)
    add_recommend_command(commands)
    return parser


def _log_to_stderr() -> None:
    """recsys's own INFO logs (counts, progress notes) on stderr; other libraries' stay quiet.
    Called again in one process (tests, a caller of main()), it replaces its own handler."""
    logger = logging.getLogger("recsys")
    for old in [h for h in logger.handlers if getattr(h, "recsys_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.recsys_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recsys`` console script."""
    from recsys.errors import guarded

    args = build_parser().parse_args(argv)
    _log_to_stderr()
    return guarded(lambda: args.run(args), prefix=f"recsys {args.command}")


if __name__ == "__main__":
    sys.exit(main())
