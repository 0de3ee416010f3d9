"""What every stage shares: its command line, its directory and the record it leaves there.

A stage runs as ``python -m recsys.stages.<name> --config FILE --out DIR [options]
[section.key=value ...]`` on every rank of a job (:func:`parser`, :func:`arguments`,
:func:`run_stage`). Once it has checked its inputs, :func:`start` takes its fingerprint,
claims its directory and seeds torch; :meth:`StageDir.finish` records the result. It writes
into its own directory::

    DIR/checkpoint/    trainer checkpoints (stages that train), resumed after a crash
    DIR/weights/       the model's weights under stable names (DCP), what the next stage reads
    DIR/stage.json     inputs, their fingerprints, the resolved config, results, timings
    DIR/DONE           written last: the stage finished

A finished stage (``DONE``) is never overwritten unless ``--force`` is given. A result that
cannot be right is never recorded: a training stage that trained no step, or any stage whose
results hold a NaN or infinite number, stops with a :class:`StageError` instead of writing
``stage.json`` and ``DONE``. A stage's
*fingerprint* hashes its name, options, resolved config and its inputs' fingerprints (a
dataset's ``dataset.json``, a stage's own fingerprint): a pipeline skips a stage whose DONE
directory holds the fingerprint it would produce.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from recsys.errors import UserError, guarded
from recsys.stages.config import StageConfig, load

log = logging.getLogger(__name__)


class StageError(UserError, RuntimeError):
    """A stage cannot run or its result is wrong; the message says which and why."""


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m recsys.stages.{name}",
        description=description,
        epilog="Overrides: section.key=value, e.g. optim.lr=3e-4 run.epochs=2 (values are YAML).",
    )
    p.add_argument("--config", help="YAML stage config (default: built-in defaults)")
    p.add_argument("--out", required=True, help="this stage's directory")
    p.add_argument("--force", action="store_true", help="run again over a finished stage")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def arguments(
    p: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, StageConfig]:
    """The command line and the config it names; a bad setting is a ConfigError (one line)."""
    # Intermixed: overrides may come before, between or after the options.
    args = p.parse_intermixed_args(argv)
    stage = p.prog.rsplit(".", 1)[-1]
    return args, load(args.config, args.overrides, stage)


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_fingerprint(path: str | Path) -> str:
    """A dataset's (its dataset.json) or a finished stage's fingerprint."""
    path = Path(path)
    if (path / "stage.json").exists():
        return read_stage(path)["fingerprint"]
    meta = path / "dataset.json"
    if meta.exists():
        return hashlib.sha256(meta.read_bytes()).hexdigest()[:16]
    raise StageError(f"{path}: neither a dataset (dataset.json) nor a finished stage")


def fingerprint(
    stage: str, options: dict[str, Any], config: StageConfig, inputs: dict[str, str]
) -> str:
    """What a stage's result depends on (see the module docstring)."""
    prints = {name: input_fingerprint(path) for name, path in inputs.items() if path}
    return _sha([stage, options, config.to_dict(), prints])


REQUIRED = ("stage", "config", "fingerprint")
"""Keys every stage.json holds (what the next stage and the fingerprints read)."""


def read_stage(path: str | Path, option: str = "", of: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record of a finished stage (``option``: how the user named it, e.g. ``--init``);
    a StageError if it is no directory, has not finished, its stage.json is unreadable, or
    it is not one of the stages ``of`` names (when given)."""
    name = (
        (f"{option} {path}" if option.startswith("--") else f"{option}={path}")
        if option
        else str(path)
    )
    path = Path(path)
    if not path.exists():
        raise StageError(f"{name}: no such directory; give a finished stage's directory")
    if not path.is_dir():
        raise StageError(f"{name}: not a directory; give a finished stage's directory")
    if not (path / "DONE").exists():
        raise StageError(f"{name}: not a finished stage (no DONE): run that stage first")
    record_file = path / "stage.json"
    if not record_file.is_file():
        raise StageError(f"{record_file}: missing (the stage has DONE): run that stage again")
    try:
        record = json.loads(record_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"{record_file}: not valid JSON ({err}); run that stage again") from None
    if not isinstance(record, dict):
        raise StageError(
            f"{record_file}: holds a {type(record).__name__}, not a stage record (an object); "
            "run that stage again"
        )
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise StageError(
            f"{record_file}: lacks {', '.join(missing)}; not a stage record: run that stage again"
        )
    if of and record["stage"] not in of:
        raise StageError(f"{name} is a {record['stage']} stage, not {' or '.join(of)}")
    return record


INPUT_OPTIONS = {"train": "data.train", "valid": "data.valid", "features": "lum.features"}
"""How the user names a stage's input (the key of its ``inputs``); others are ``--key``."""


def _input_name(key: str, path: str) -> str:
    option = INPUT_OPTIONS.get(key)
    return f"{option}={path}" if option else f"--{key} {path}"


def _stage_name(path: Path) -> str | None:
    """The ``stage`` a directory's stage.json names; None when it has no readable one."""
    try:
        record = json.loads((path / "stage.json").read_text())
    except (OSError, ValueError):
        return None
    stage = record.get("stage") if isinstance(record, dict) else None
    return stage if isinstance(stage, str) else None


def _main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StageDir:
    """One stage's directory: refuse to redo a finished stage, record the result last.

    ``about``: what :meth:`finish` records first, after the stage's name (:func:`start`
    gives the fingerprint, the inputs and the resolved config)."""

    def __init__(
        self,
        path: str | Path,
        stage: str,
        force: bool = False,
        about: dict[str, Any] | None = None,
    ) -> None:
        self.out = str(path)  # as given: Path("") would be the current directory
        self.path, self.stage, self.force = Path(path), stage, force
        self.about = about or {}
        self.started = time.time()

    @property
    def weights(self) -> Path:
        return self.path / "weights"

    def begin(self, inputs: dict[str, Any] | None = None) -> None:
        """Check the directory against the stage's ``inputs`` (name → path, as recorded),
        then make it (every rank calls it; every check comes before anything is written or
        deleted)."""
        self.refuse(inputs or {})
        if (self.path / "DONE").exists():
            if not self.force:
                raise StageError(
                    f"{self.path}: stage {self.stage} has finished already (DONE); "
                    "pass --force to run it again"
                )
            barrier()
            if _main():
                shutil.rmtree(self.path)
        barrier()
        if _main():
            self.path.mkdir(parents=True, exist_ok=True)
        barrier()

    def refuse(self, inputs: dict[str, Any]) -> None:
        """A StageError when ``--out`` is empty, is, contains or lies inside an input, holds
        a dataset, or (with ``--force`` over a finished one) is not a stage of this name."""
        if not self.out.strip():
            raise StageError(
                f"--out is empty; give this stage's own directory (e.g. runs/NAME/{self.stage})"
            )
        out = self.path.resolve()
        for key, given in inputs.items():
            if not given:
                continue
            source = Path(given).resolve()
            where = (
                "is"
                if out == source
                else "contains"
                if out in source.parents
                else "lies inside"
                if source in out.parents
                else None
            )
            if where:
                raise StageError(
                    f"--out {self.out} {where} the input {_input_name(key, str(given))}; "
                    "give another --out"
                )
        if (self.path / "dataset.json").exists():
            raise StageError(f"--out {self.out} holds a dataset (dataset.json); give another --out")
        if (self.path / "DONE").exists() and self.force:
            other = _stage_name(self.path)
            if other is None:
                raise StageError(
                    f"--out {self.out} is not a stage directory (DONE, but no readable "
                    "stage.json naming its stage); --force would delete it: give another --out"
                )
            if other != self.stage:
                raise StageError(
                    f"--out {self.out} holds a {other} stage, not {self.stage}; --force "
                    "would delete it: give another --out"
                )
            if any(self.path.rglob("dataset.json")):
                raise StageError(
                    f"--out {self.out} holds a dataset (a dataset.json inside); --force "
                    "would delete it: give another --out"
                )

    def finish(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write stage.json, then DONE (rank 0, after every rank got here); a
        :class:`StageError` instead when the result cannot be right (:meth:`check`)."""
        record = {**self.about, **record}
        self.check(record)  # every rank: its record's steps and results are the same on all
        barrier()
        record = {
            "stage": self.stage,
            **record,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "seconds": round(time.time() - self.started, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if _main():
            tmp = self.path / "stage.json.tmp"
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
            os.replace(tmp, self.path / "stage.json")
            (self.path / "DONE.tmp").write_text(record["fingerprint"] + "\n")
            os.replace(self.path / "DONE.tmp", self.path / "DONE")
        barrier()
        return record

    def check(self, record: dict[str, Any]) -> None:
        """Refuse a training stage (its record has ``steps``: the trainer's count, resumed
        steps included) that trained no step, and results with a NaN or infinite number."""
        steps = record.get("steps")
        if steps is not None and steps < 1:
            train = record.get("inputs", {}).get("train")
            data = f"data.train={train}" if train else "its training data"
            raise StageError(
                f"{self.path}: stage {self.stage} trained no step: {data} gave no batch (no "
                "rows, or every row skipped); nothing recorded (no stage.json, no DONE)"
            )
        bad = nonfinite_results(record.get("results") or {})
        if bad:
            raise StageError(
                f"{self.path}: stage {self.stage} ended with non-finite results: {bad}; "
                "nothing recorded (no stage.json, no DONE; run.resume=false starts over)"
            )


UNDEFINED_ALLOWED = ("gauc",)
"""Results that may be NaN in a sound run: gAUC when no user has samples of both labels (a
NaN logit makes AUC and logloss NaN too, and those are checked)."""


def nonfinite_results(results: dict[str, Any]) -> str:
    """The NaN or infinite numbers among ``results`` and their sample counts, as
    ``name=value`` (empty when all are finite)."""
    bad = {
        name: value
        for name, value in results.items()
        if isinstance(value, float)
        and not math.isfinite(value)
        and not name.endswith(UNDEFINED_ALLOWED)
    }
    if not bad:
        return ""
    context = {n: v for n, v in results.items() if n.endswith(("samples", "nonfinite_logits"))}
    return ", ".join(f"{n}={v:g}" for n, v in {**bad, **context}.items())


def start(
    name: str,
    args: argparse.Namespace,
    config: StageConfig,
    inputs: dict[str, Any],
    options: dict[str, Any] | None = None,
) -> StageDir:
    """The stage's directory ``args.out``, begun: called on every rank once the stage has
    checked its inputs (their errors name them better than a fingerprint would). Takes the
    stage's fingerprint (its ``options``, ``config`` and ``inputs``), checks and makes the
    directory (:meth:`StageDir.begin`), and seeds torch with ``run.seed``, so that a dense
    part built next starts the same on every run. The directory's :meth:`StageDir.finish`
    records the fingerprint, the inputs and the config ahead of the stage's own results."""
    about = {
        "fingerprint": fingerprint(name, options or {}, config, inputs),
        "inputs": inputs,
        "config": config.to_dict(),
    }
    stage = StageDir(args.out, name, args.force, about)
    stage.begin(inputs)
    torch.manual_seed(config.run.seed)
    return stage


def run_stage(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Entry point of ``python -m recsys.stages.X``: logs to stderr; a user error is one line
    naming the rank (``recsys.errors``), a preemption exits 143."""
    logging.basicConfig(
        level=os.environ.get("RECSYS_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # importing torchrec installs a root handler at WARNING first
    )
    from recsys.train.trainer import Preempted

    rank = os.environ.get("RANK", "0")

    def run() -> int:
        try:
            main(argv)
        except Preempted as stop:
            print(f"stopped (rank {rank}): {stop}", file=sys.stderr)
            return PREEMPTED
        return 0

    return guarded(run, prefix=f"error (rank {rank})")


PREEMPTED = 143
"""Exit code of a stage stopped by SIGTERM after saving its checkpoint (128 + SIGTERM)."""
