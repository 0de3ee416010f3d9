"""Scheduler profiles from ``torchx.yaml``: where a job runs and how big it is.

This module owns reading and validating the ``profiles`` section of ``torchx.yaml`` against
TorchX itself (known scheduler, that scheduler's run options and their types, named
resources), so that a typo fails before any job is submitted, and the environment a profile
gives its jobs (``venv``: the project's virtual environment activated on the nodes). It does
not submit jobs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from recsys import yamltext
from recsys.errors import UserError
from recsys.pipelines import files

CONTAINER_SCHEDULERS = ("kubernetes", "kubernetes_mcad", "local_docker", "aws_batch", "gcp_batch")
"""Schedulers that run a container image, not the working tree: a profile must name one."""


class ProfileError(UserError, ValueError):
    """A profile in torchx.yaml is missing or wrong; the message names file, profile and key."""


@dataclass(frozen=True)
class Profile:
    """One scheduler profile."""

    name: str
    """The profile's key under ``profiles``."""
    scheduler: str
    """A TorchX scheduler name: local_cwd, slurm, kubernetes, ..."""
    scheduler_args: dict[str, Any] = field(default_factory=dict)
    """Run options of the scheduler (``torchx runopts SCHEDULER`` lists them)."""
    nnodes: int = 1
    """Hosts per job."""
    nproc_per_node: int = 1
    """Processes (ranks) per host."""
    resource: str | None = None
    """A TorchX named resource describing one host, such as ``aws_p4d.24xlarge``."""
    cpu: int | None = None
    """CPUs per host when no ``resource`` is named (None: the component's default)."""
    gpu: int | None = None
    """GPUs per host when no ``resource`` is named."""
    memMB: int | None = None  # TorchX's spelling, as in the components
    """Memory per host in MB when no ``resource`` is named."""
    image: str | None = None
    """Container image for container schedulers; local schedulers use the working tree."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables of every process."""
    max_restarts: int = 0
    """How often torchrun restarts all workers after one fails."""
    stage_args: tuple[str, ...] = ()
    """Config overrides (``section.key=value``) given to every stage run on this profile,
    before the pipeline's own (e.g. ``data.workers=4`` on hosts with cores to spare)."""
    venv: str | None = None
    """The project's virtual environment as the nodes see it (a shared filesystem), made
    absolute against torchx.yaml's directory: jobs get its ``bin`` first on PATH, VIRTUAL_ENV,
    and PYTHONPATH set to the repository (the directory of torchx.yaml)."""
    max_pending_s: int = 600
    """Slurm: a job pending longer than this is cancelled (one that can never start at once)."""
    repo: str | None = None
    """The directory of the torchx.yaml this profile came from (set by the loader)."""

    @property
    def j(self) -> str:
        """The job shape as TorchX's ``-j`` argument, ``NNODESxNPROC``."""
        return f"{self.nnodes}x{self.nproc_per_node}"

    def venv_env(self, path: str | None = None) -> dict[str, str]:
        """What ``venv`` sets up: its bin first on PATH (before ``path``, default this
        process's PATH), VIRTUAL_ENV, PYTHONPATH=the repository; empty without a venv."""
        if not self.venv:
            return {}
        venv = Path(self.venv)
        tail = os.environ.get("PATH", "") if path is None else path
        env = {"PATH": f"{venv / 'bin'}:{tail}" if tail else str(venv / "bin")}
        env["VIRTUAL_ENV"] = str(venv)
        if self.repo is not None:
            env["PYTHONPATH"] = self.repo
        return env

    def job_env(self, path: str | None = None) -> dict[str, str]:
        """Every process's environment: ``env`` and what ``venv`` sets up."""
        return {**self.env, **self.venv_env(path)}


def load_profiles(path: str | Path | None = None) -> dict[str, Profile]:
    """Every profile of ``path`` (default: the project's torchx.yaml), validated."""
    path = files.profiles() if path is None else Path(path)
    if not path.is_file():
        raise ProfileError(
            f"{path}: no such file (scheduler profiles live in torchx.yaml: in RECSYS_HOME, the "
            "checkout the package is imported from, or <environment>/share/recsys)"
        )
    document = yamltext.read(path, ProfileError) or {}
    profiles = document.get("profiles") if isinstance(document, dict) else None
    if not isinstance(profiles, dict) or not profiles:
        raise ProfileError(f"{path}: expected a mapping 'profiles: {{NAME: {{...}}}}'")
    return {name: _profile(path, name, body) for name, body in profiles.items()}


def load_profile(name: str, path: str | Path | None = None) -> Profile:
    """The profile called ``name``; the error lists the profiles that exist."""
    path = files.profiles() if path is None else Path(path)
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"{path}: no profile {name!r}; profiles: {sorted(profiles)}")
    return profiles[name]


def _profile(path: Path, name: str, body: Any) -> Profile:
    where = f"{path}: profile {name!r}"
    if not isinstance(body, dict):
        raise ProfileError(f"{where}: expected a mapping of settings")
    known = {f.name for f in fields(Profile)} - {"name", "repo"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    if "scheduler" not in body:
        raise ProfileError(f"{where}: 'scheduler' is required")
    lows = {"nnodes": 1, "nproc_per_node": 1, "max_restarts": 0, "cpu": 1, "gpu": 0,
            "memMB": 1, "max_pending_s": 1}  # fmt: skip
    for key, low in lows.items():
        value = body.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ProfileError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
    if body.get("resource") and any(k in body for k in ("cpu", "gpu", "memMB")):
        raise ProfileError(f"{where}: give either resource or cpu/gpu/memMB, not both")
    if body.get("scheduler") in CONTAINER_SCHEDULERS and not body.get("image"):
        raise ProfileError(
            f"{where}: the {body['scheduler']} scheduler runs a container image: set 'image' "
            "to one holding the project (Dockerfile and docs/clusters.md say how to build it)"
        )
    venv = body.get("venv")
    if venv is not None and (not isinstance(venv, str) or not venv):
        raise ProfileError(f"{where}: venv must be a path to a virtual environment")
    env = body.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ProfileError(f'{where}: env must map names to strings (quote numbers: "1")')
    stage_args = body.get("stage_args") or []
    if not isinstance(stage_args, list) or not all(isinstance(a, str) for a in stage_args):
        raise ProfileError(f"{where}: stage_args must be a list of 'section.key=value' strings")
    from recsys.stages.config import ConfigError, load

    try:
        load(None, stage_args)
    except ConfigError as err:
        raise ProfileError(f"{where}: stage_args: {err}") from None
    profile = Profile(
        name=name,
        **{
            **body,
            "env": env,
            "scheduler_args": body.get("scheduler_args") or {},
            "stage_args": tuple(stage_args),
            "venv": str((path.parent / venv).absolute()) if venv else None,
            "repo": str(path.parent.absolute()),
        },
    )
    _check_against_torchx(where, profile)
    return profile


def _check_against_torchx(where: str, profile: Profile) -> None:
    from torchx.runner import get_runner
    from torchx.schedulers import get_scheduler_factories
    from torchx.specs import get_named_resources
    from torchx.specs.api import InvalidRunConfigException

    schedulers = get_scheduler_factories()
    if profile.scheduler not in schedulers:
        raise ProfileError(
            f"{where}: unknown scheduler {profile.scheduler!r}; TorchX has {sorted(schedulers)}"
        )
    with get_runner() as runner:
        options = runner.scheduler_run_opts(profile.scheduler)
    names = {name for name, _ in options}
    unknown = sorted(set(profile.scheduler_args) - names)
    if unknown:
        raise ProfileError(
            f"{where}: {profile.scheduler} has no run options {unknown}; it has {sorted(names)}"
        )
    try:
        options.resolve(dict(profile.scheduler_args))
    except InvalidRunConfigException as err:
        raise ProfileError(f"{where}: scheduler_args: {err}") from None
    if profile.resource is not None:
        try:
            get_named_resources(profile.resource)
        except KeyError:
            raise ProfileError(
                f"{where}: unknown named resource {profile.resource!r} (see "
                "torchx.specs.named_resources)"
            ) from None
