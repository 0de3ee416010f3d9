"""The GPSD pipeline: pretrain (→ retrieve) → transfer → freeze → finetune, as TorchX jobs.

    recsys pipeline run --data data/ml100k --config configs/ml100k/demo.yaml \
        --experiment runs/demo --strategies all --sizes L4H64A4

This module owns the order of the stages of a study and whether each must run. Every stage is
submitted through the TorchX runner API (the component's ``AppDef``, ``run``, then ``wait``)
on a profile of ``torchx.yaml``; Slurm jobs are followed by ``recsys.pipelines.slurm`` instead
(bounded waits, states TorchX 0.7.0 misreads), with a pre-check that some node can hold a
replica; the log of each job's first replica streams to the console and to
``EXPERIMENT/logs/<stage>.log``. A stage whose directory is DONE with the fingerprint this
run would give it (same config, options and inputs) is skipped; a DONE stage with another
fingerprint runs again; an interrupted one resumes from its own checkpoint. A failed job stops
the pipeline with a :class:`StageFailed` naming the stage, the job and its log. Before any job
is submitted, every stage's merged config (file, ``stages.<stage>`` section, profile and study
overrides) and model size are loaded as the stage will load them, every dataset a stage reads
(where this host sees it) is opened, and the experiment directory must take files: a mistake
stops the pipeline with one :class:`PipelineError` line naming the stage and what is wrong,
and nothing runs.

Layout: ``EXPERIMENT/<size>/{pretrain, retrieve-<test>, transfer-<nt|st|ft>, freeze-<st|ft>,
finetune-<strategy>}`` (``retrieve``: the pretrained model's full-catalogue HR@K, NDCG@K and
MRR on the CTR evaluation set's held-out items) and the report (``recsys.report``) in
``EXPERIMENT/report*``.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from recsys.errors import UserError, describe_os_error, one_line
from recsys.pipelines import files, slurm
from recsys.pipelines.profiles import CONTAINER_SCHEDULERS, Profile, load_profile
from recsys.stages.common import StageError, fingerprint, read_stage
from recsys.stages.config import ConfigError, StageConfig, load
from recsys.train.faults import Faults

log = logging.getLogger(__name__)

STRATEGIES = ("NT", "FT", "ST", "FT&SF", "ST&SF")
"""GPSD §2.3: no transfer, full transfer, sparse transfer, and both with sparse freezing."""


BASELINES = ("deepfm", "din")
"""Baseline CTR models the pipeline can run beside GPSD's ranker (NT and ST&SF)."""

DATA_KINDS = {
    "pretrain": "seq",
    "lum_pretrain": "seq",
    "lum_query": "seq",
    "transfer": "ctr",
    "freeze": "ctr",
    "finetune": "ctr",
    "lum_finetune": "ctr",
}
"""The kind of dataset each stage reads (``data.train``, and ``data.valid`` where it
validates)."""

VALIDATES = ("pretrain", "finetune", "lum_pretrain", "lum_finetune")
"""Stages that read ``data.valid`` when it is set."""


STAGE_ERROR = re.compile(r"\berror \(rank \d+\): ")
"""A stage's own error line (``recsys.errors``), not a line of source code in a traceback."""


class PipelineError(UserError, RuntimeError):
    """A stage failed or cannot start; the message names it."""


class StageFailed(PipelineError):
    """A submitted stage's job ended without success; the message names the stage, the job,
    its log and the stage's own error lines."""


RETRIEVE_K = 10
"""K of the ``retrieve`` stage after each pretraining, unless a study says otherwise."""


@dataclass(frozen=True)
class Study:
    """What one pipeline run covers."""

    experiment: str
    """Directory of every stage and the report."""
    data: str
    """Directory holding ``seq/``, ``ctr_train/`` and ``ctr_test/`` (``recsys data ...``)."""
    config: str | None = None
    """Stage config (YAML) every stage reads; ``model.size`` is set per size."""
    strategies: tuple[str, ...] = ("ST&SF",)
    sizes: tuple[str, ...] = ()
    """Model sizes (``L4H64A4``, ...); empty: the config's ``model.size``."""
    overrides: tuple[str, ...] = ()
    """``section.key=value`` given to every stage."""
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()
    freeze_overrides: tuple[str, ...] = ()
    """``section.key=value`` given to the freeze stage (``freeze.dtype=fp16``); their values
    name the freeze stages and the finetunes of frozen tables (``freeze-fp16-st``)."""
    baselines: tuple[str, ...] = ()
    """Baseline CTR models (``deepfm``, ``din``) also run, each with NT and ST&SF."""
    seeds: tuple[int, ...] = ()
    """Seeds (``run.seed``) of whole chains, pretraining included, each under
    ``<size>/seed-<n>/``; empty: one chain with the config's seed, under ``<size>/``."""
    train: str = "ctr_train"
    """The CTR training set, a dataset under ``data`` (``ctr_train_dense``, ...)."""
    test: str = "ctr_test"
    """The CTR evaluation set under ``data`` (``ctr_valid`` when tuning)."""
    tag: str = ""
    """Prefix of the CTR stages' directories (``dense`` → ``finetune-dense-nt``), so that
    studies on other training sets share the pretraining of the same size and seed."""
    gpsd: bool = True
    """Run GPSD's ranker (False: only the baselines)."""
    retrieve_k: int = RETRIEVE_K
    """After each pretraining, a ``retrieve`` stage ranks every ``test`` user's held-out item
    among all items: HR@K, NDCG@K and MRR at this K in the report (0: no such stage)."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise PipelineError(f"strategies {unknown}: choose among {', '.join(STRATEGIES)}")
        if self.retrieve_k < 0:
            raise PipelineError(
                f"retrieve_k must be >= 0 (0: no retrieve stage), got {self.retrieve_k}"
            )
        wrong = [b for b in self.baselines if b not in BASELINES]
        if wrong:
            raise PipelineError(f"baselines {wrong}: choose among {', '.join(BASELINES)}")
        check_sizes(self.sizes)


def check_sizes(sizes: tuple[str, ...]) -> None:
    """Each of ``sizes`` is ``L<layers>H<width>A<heads>`` of a tower that can be built."""
    from recsys.models.tower import NAME, TowerConfig

    for size in sizes:
        if not NAME.fullmatch(size):
            raise PipelineError(
                f"sizes: {size!r} is not of the form L<layers>H<width>A<heads>, e.g. L4H64A4"
            )
        try:
            TowerConfig.from_name(size)
        except ValueError as err:
            raise PipelineError(f"sizes: {size!r}: {err}") from None


def join(data: str, name: str) -> str:
    """The dataset ``name`` under ``data``, a directory or a URI (``s3://bucket/data``)."""
    if "://" in data:
        return f"{data.rstrip('/')}/{name}"
    return str(Path(data) / name)


def slug(strategy: str) -> str:
    """``ST&SF`` → ``st_sf`` (directory names)."""
    return strategy.lower().replace("&", "_")


@dataclass
class Step:
    """One stage to run: its component, options and config overrides."""

    stage: str
    out: Path
    options: dict[str, Any]
    """Stage options as the stage records them in its fingerprint."""
    arguments: list[str]
    """Component arguments besides overrides and job shape."""
    overrides: list[str]
    inputs: Callable[[StageConfig], dict[str, str | None]]
    """The stage's inputs as the stage names them, from its resolved config."""
    size: str = ""
    strategy: str = ""
    config: str | None = None
    skipped: bool = field(default=False)
    name: str = ""
    """The stage's name in logs: ``<size>[-seed-<n>]-<directory>``."""
    logs: Path = Path("logs")
    """Directory of the stage logs (``EXPERIMENT/logs``)."""
    resolved: StageConfig | None = field(default=None, repr=False, compare=False)
    """The config the stage will load, once :func:`check_configs` has read it."""


def chains(study: Any) -> Iterator[tuple[str, Path, list[str]]]:
    """The chains of stages of a study (GPSD's or LUM's), one per size and seed: the size,
    its directory ``EXPERIMENT/SIZE[/seed-N]`` and the overrides every stage of it gets."""
    sizes = study.sizes or (load(study.config, study.overrides).model.size,)
    for size in sizes:
        for seed in study.seeds or (None,):
            root = Path(study.experiment) / size
            common = [*study.overrides, f"model.size={size}"]
            if seed is not None:
                root, common = root / f"seed-{seed}", [*common, f"run.seed={seed}"]
            yield size, root, common


def pretraining(stage: str, out: Path, study: Any, common: list[str], seq: str, size: str) -> Step:
    """A chain's pretraining (``pretrain`` or ``lum_pretrain``) on the ``seq`` dataset."""
    return Step(
        stage,
        out,
        {},
        [],
        [*common, *study.pretrain_overrides, f"data.train={seq}"],
        lambda c: {"train": seq, "valid": c.data.valid},
        size,
    )


def retrieval(root: Path, study: Study, common: list[str], model: str, test: str, size: str):
    """A chain's ``retrieve`` step: the pretrained model's top K over the whole catalogue for
    the users of the CTR evaluation set, ranking their held-out items (``retrieve-<test>``:
    arms evaluated on other sets keep their own)."""
    k = study.retrieve_k
    return Step(
        "retrieve",
        root / f"retrieve-{study.test}",
        {"k": k, "exclude_seen": True},
        ["--model", model, "--data", test, "--k", str(k)],
        list(common),
        lambda c: {"model": model, "data": test},
        size,
    )


def plan(study: Study) -> list[Step]:
    """The steps of ``study`` in the order they run."""
    seq, train, test = (join(study.data, n) for n in ("seq", study.train, study.test))
    steps: list[Step] = []
    for size, root, common in chains(study):
        pretrain = root / "pretrain"
        if study.baselines or any(s != "NT" for s in study.strategies if study.gpsd):
            steps.append(pretraining("pretrain", pretrain, study, common, seq, size))
            if study.retrieve_k:
                steps.append(retrieval(root, study, common, str(pretrain), test, size))
        models = [("gpsd", study.strategies)] if study.gpsd else []
        models += [(arch, ("NT", "ST&SF")) for arch in study.baselines]
        for arch, strategies in models:
            steps += _ctr_steps(
                root, size, arch, strategies, study, str(pretrain), train, test, common
            )
    return placed(steps, Path(study.experiment), study.config)


def placed(steps: list[Step], experiment: Path, config: str | None) -> list[Step]:
    """``steps`` with the study's stage config, their names in logs
    (``<size>[-seed-<n>]-<directory>``) and the experiment's log directory."""
    return [
        replace(
            s,
            config=config,
            name="-".join(s.out.relative_to(experiment).parts),
            logs=experiment / "logs",
        )
        for s in steps
    ]


def _ctr_steps(
    root: Path,
    size: str,
    arch: str,
    strategies: tuple[str, ...],
    study: Study,
    pretrain: str,
    train: str,
    test: str,
    common: list[str],
) -> list[Step]:
    """Transfer, freeze and finetune steps of one CTR model at one size (and seed)."""
    prefix = (f"{study.tag}-" if study.tag else "") + ("" if arch == "gpsd" else f"{arch}-")
    # Arms that differ only in how they freeze share their transfers and unfrozen finetunes.
    values = [o.partition("=")[2].replace("_", "-") for o in study.freeze_overrides]
    frozen_prefix = "".join(f"{v}-" for v in values) + prefix
    ctr = [*common, f"data.train={train}"]
    if arch != "gpsd":
        ctr.append(f"model.arch={arch}")
    steps = []
    transfers = {s.split("&")[0] for s in strategies}
    for kind in [k for k in ("NT", "FT", "ST") if k in transfers]:
        pretrained = None if kind == "NT" else pretrain
        steps.append(
            Step(
                "transfer",
                root / f"transfer-{prefix}{slug(kind)}",
                {"strategy": kind},
                ["--strategy", kind] + (["--pretrained", pretrained] if pretrained else []),
                ctr,
                lambda c, p=pretrained: {"train": train, "pretrained": p},
                size,
                kind,
            )
        )
    for kind in [k for k in ("FT", "ST") if f"{k}&SF" in strategies]:
        source = str(root / f"transfer-{prefix}{slug(kind)}")
        steps.append(
            Step(
                "freeze",
                root / f"freeze-{frozen_prefix}{slug(kind)}",
                {"tables": "all"},
                ["--init", source],
                [*ctr, *study.freeze_overrides],
                lambda c, s=source: {"train": train, "init": s},
                size,
                f"{kind}&SF",
            )
        )
    for strategy in strategies:
        kind, frozen = strategy.split("&")[0], strategy.endswith("&SF")
        named = frozen_prefix if frozen else prefix
        init = str(root / f"{'freeze' if frozen else 'transfer'}-{named}{slug(kind)}")
        steps.append(
            Step(
                "finetune",
                root / f"finetune-{named}{slug(strategy)}",
                {},
                ["--init", init],
                [*ctr, *study.finetune_overrides, f"data.valid={test}"],
                lambda c, i=init: {"train": train, "valid": test, "init": i},
                size,
                strategy,
            )
        )
    return steps


def expected_fingerprint(step: Step) -> str:
    config = step.resolved or load(step.config, step.overrides, step.stage)
    return fingerprint(step.stage, step.options, config, step.inputs(config))


def is_done(step: Step) -> bool:
    """DONE with the fingerprint this run would give the stage."""
    if not (step.out / "DONE").exists():
        return False
    try:
        return read_stage(step.out)["fingerprint"] == expected_fingerprint(step)
    except (OSError, ValueError, KeyError, StageError):  # unreadable: run the stage again
        return False


COMPILE_CACHE = "compile-cache"
"""``EXPERIMENT/compile-cache``: the compiled towers' cache every stage of a study shares."""
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def component_args(step: Step, profile: Profile, force: bool) -> list[str]:
    args = ["-j", profile.j, "--max_retries", str(profile.max_restarts)]
    if profile.resource:
        args += ["--h", profile.resource]
    for key in ("cpu", "gpu", "memMB"):
        if getattr(profile, key) is not None:
            args += [f"--{key}", str(getattr(profile, key))]
    if profile.image and profile.scheduler not in ("local_cwd", "local_docker", "slurm"):
        args += ["--image", profile.image]
    # Slurm jobs get the venv's environment from sbatch's own (see recsys.pipelines.slurm).
    env = dict(profile.env if profile.scheduler == "slurm" else profile.job_env())
    # One Inductor cache for the study (recsys.train.compiling): each graph compiles once.
    env.setdefault(COMPILE_CACHE_ENV, str(step.logs.parent / COMPILE_CACHE))
    if any("," in v for v in env.values()):
        raise PipelineError(f"profile {profile.name!r}: job environment values cannot hold ','")
    if env:
        args += ["--env", ",".join(f"{k}={v}" for k, v in env.items())]
    if step.config:
        args += ["--config", step.config]
    args += ["--out", str(step.out), *step.arguments]
    if force:
        args += ["--force", "True"]
    return [*args, *step.overrides]


def _stream(runner, handle: str, role: str, path: Path, console: TextIO | None) -> None:
    with path.open("a") as out:
        try:
            for line in runner.log_lines(handle, role, k=0, should_tail=True):
                out.write(line if line.endswith("\n") else line + "\n")
                out.flush()
                if console is not None:
                    console.write(line if line.endswith("\n") else line + "\n")
        except (OSError, RuntimeError, ValueError) as err:  # logs never fail the pipeline
            out.write(f"[pipeline] log streaming stopped: {err}\n")


def _writer(out: TextIO, console: TextIO | None) -> Callable[[str], None]:
    def write(line: str) -> None:
        out.write(line)
        out.flush()
        if console is not None:
            console.write(line)

    return write


def _wait_slurm(handle: str, step: Step, profile: Profile, log_path: Path, console) -> str:
    """Follow a Slurm job's first replica's stderr into ``log_path`` until the bounded wait
    (recsys.pipelines.slurm) ends; the final state's name."""
    done = threading.Event()
    with log_path.open("a") as out:
        path = slurm.log_path(handle, step.stage)
        follower = threading.Thread(
            target=slurm.follow, args=(path, done, _writer(out, console)), daemon=True
        )
        follower.start()
        try:
            state = slurm.wait(
                handle,
                max_pending_s=profile.max_pending_s,
                partition=profile.scheduler_args.get("partition"),
            )
        except slurm.SlurmError as err:
            raise PipelineError(
                f"stage {step.stage} ({step.size}-{step.out.name}): {err}"
            ) from None
        except BaseException:  # interrupted: a job left behind would write into the study
            slurm.cancel(handle)
            raise
        finally:
            done.set()
            follower.join(timeout=30)
    return state.name


def appdef(step: Step, args: list[str]):
    """The stage's AppDef from its component file, as ``torchx run`` would build it."""
    from torchx.specs.builders import materialize_appdef
    from torchx.specs.finder import get_component

    component = get_component(files.component(step.stage))
    return materialize_appdef(component.fn, args)


def run_step(step: Step, profile: Profile, runner, console: TextIO | None = sys.stdout) -> str:
    """Submit one stage, stream its log, wait; the job handle. PipelineError if it fails."""
    from torchx.specs import AppState

    force = (step.out / "DONE").exists()  # finished with other inputs or config: redo
    app = appdef(step, component_args(step, profile, force))
    logs = step.logs
    logs.mkdir(parents=True, exist_ok=True)
    name = step.name or f"{step.size}-{step.out.name}"
    log_path = logs / f"{name}.log"
    if profile.scheduler == "slurm":  # one that no node can hold would pend forever
        resource = app.roles[0].resource
        try:
            slurm.check_fits(
                resource.cpu, resource.memMB, resource.gpu, profile.scheduler_args.get("partition")
            )
        except slurm.SlurmError as err:
            raise PipelineError(f"stage {step.stage} ({name}) not submitted: {err}") from None
    try:
        with slurm.submit_environment(profile.venv_env() if profile.scheduler == "slurm" else {}):
            handle = runner.run(app, profile.scheduler, cfg=dict(profile.scheduler_args))
    except subprocess.CalledProcessError as err:  # sbatch & co. print their reason on stderr
        raise PipelineError(
            f"stage {step.stage} ({name}): {profile.scheduler} refused the job: {err}"
        ) from None
    log.info("%s: submitted %s", name, handle)
    if profile.scheduler == "slurm":  # TorchX 0.7.0 cannot follow cancelled Slurm jobs
        state = _wait_slurm(handle, step, profile, log_path, console)
    else:
        streamer = threading.Thread(
            target=_stream, args=(runner, handle, step.stage, log_path, console), daemon=True
        )
        streamer.start()
        status = runner.wait(handle, wait_interval=1)
        streamer.join(timeout=30)
        state = status.state.name if status is not None else "UNKNOWN"
    if state != AppState.SUCCEEDED.name:
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        # A stage states its error in one line; otherwise show the end of the log.
        reasons = list(dict.fromkeys(line for line in lines if STAGE_ERROR.search(line)))
        raise StageFailed(
            f"stage {step.stage} ({name}) failed: job {handle} ended {state}; log: {log_path}\n"
            + "\n".join(reasons[:3] or lines[-15:])
        )
    return handle


def run(
    study: Study,
    profile: str | Profile = "local_cwd",
    profiles_path: str | Path | None = None,
    console: TextIO | None = sys.stdout,
) -> list[Step]:
    """Run every step of ``study`` that is not DONE; the steps, with ``skipped`` set."""
    return run_steps(plan(study), study.experiment, profile, profiles_path, console)


def run_steps(
    steps: list[Step],
    experiment: str,
    profile: str | Profile = "local_cwd",
    profiles_path: str | Path | None = None,
    console: TextIO | None = sys.stdout,
) -> list[Step]:
    """Check every one of ``steps`` (of any pipeline), then run those not DONE, in order."""
    chosen = profile if isinstance(profile, Profile) else load_profile(profile, profiles_path)
    apply_profile(steps, chosen)
    configs = check_configs(steps)
    check_data(steps, configs, chosen)
    check_experiment(experiment)
    return submit(steps, experiment, chosen, console)


def apply_profile(steps: list[Step], profile: Profile) -> None:
    """The profile's stage arguments before each step's overrides (the study's win)."""
    for step in steps:
        step.overrides = [*profile.stage_args, *step.overrides]


def _refused(step: Step, problem: str) -> PipelineError:
    return PipelineError(f"stage {step.stage} ({step.name}): {problem}; no job was submitted")


def check_configs(steps: list[Step]) -> list[StageConfig]:
    """The config each step's stage will load (its file, its ``stages.<stage>`` section and
    its overrides), checked as the stage checks it at its start, model size included."""
    from recsys.models.build import tower

    configs = []
    for step in steps:
        try:
            config = load(step.config, step.overrides, step.stage)
        except ConfigError as err:  # named with the config file unless the message names it
            named = not step.config or str(err).startswith(str(step.config))
            raise _refused(step, str(err) if named else f"config {step.config}: {err}") from None
        try:
            tower(config.model)
        except ValueError as err:
            raise _refused(step, f"model.size={config.model.size}: {err}") from None
        step.resolved = config  # read once: the fingerprint before submitting uses it
        configs.append(config)
    return configs


def check_data(steps: list[Step], configs: list[StageConfig], profile: Profile) -> None:
    """Every dataset a stage will read exists, of the kind it reads, with a readable
    ``dataset.json``; a plan file (``plan.file``) reads as one, made for the profile's ranks.
    Jobs of container schedulers and URIs (``s3://``) see storage this host may not: those
    are left to the stages."""
    if profile.scheduler in CONTAINER_SCHEDULERS:
        return
    seen: set[tuple[str, str]] = set()
    for step, config in zip(steps, configs, strict=True):
        _check_datasets(step, config, seen)
        _check_plan_file(step, config, profile, seen)


def _check_datasets(step: Step, config: StageConfig, seen: set[tuple[str, str]]) -> None:
    from recsys.stages.build import dataset_meta

    kind = DATA_KINDS.get(step.stage)
    read = [("data.train", config.data.train)]
    if step.stage in VALIDATES:
        read.append(("data.valid", config.data.valid))
    for key, path in read:
        if kind is None or not path or "://" in path or (path, kind) in seen:
            continue
        try:
            dataset_meta(path, kind, key)
        except StageError as err:  # names the key itself
            raise _refused(step, str(err)) from None
        except (UserError, OSError) as err:
            raise _refused(step, f"{key}: {one_line(err)}") from None
        seen.add((path, kind))


def _check_plan_file(
    step: Step, config: StageConfig, profile: Profile, seen: set[tuple[str, str]]
) -> None:
    from recsys.plan import planfile

    path = config.plan.file
    if not path or "://" in path or (path, "plan") in seen:
        return
    try:
        doc = planfile.read(path)
    except (UserError, OSError) as err:
        raise _refused(step, f"plan.file: {one_line(err)}") from None
    ranks = profile.nnodes * profile.nproc_per_node
    if doc["cluster"]["world_size"] != ranks:
        raise _refused(
            step,
            f"plan.file {path} was made for {doc['cluster']['world_size']} ranks; profile "
            f"{profile.name!r} runs {ranks} (-j {profile.j}): plan again with "
            f"--world-size {ranks}",
        )
    seen.add((path, "plan"))


def check_experiment(experiment: str | Path) -> None:
    """The experiment directory exists or can be made, and takes files."""
    path = Path(experiment)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, a file"
        raise PipelineError(f"experiment directory {path} {where}; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = describe_os_error(err).removeprefix(f"{path}: ")
        raise PipelineError(f"experiment directory {path} cannot be written: {reason}") from None


def submit(
    steps: list[Step], experiment: str, profile: Profile, console: TextIO | None = sys.stdout
) -> list[Step]:
    """Run every one of ``steps`` that is not DONE, in order, on ``profile``."""
    from torchx.runner import get_runner

    faults = Faults(experiment, rank=0)  # `stage` faults stop the pipeline itself
    finished = 0
    with get_runner() as runner:
        for step in steps:
            if is_done(step):
                step.skipped = True
                log.info("%s: done with the same inputs and config, skipped", step.name)
                continue
            run_step(step, profile, runner, console)
            finished += 1
            faults.after_stage(finished)
    return steps
