"""Scheduler profiles from ``torchx.yaml``: where a job runs and how big it is.

This module owns reading and validating the ``profiles`` section of ``torchx.yaml`` against
TorchX itself (known scheduler, that scheduler's run options and their types, named
resources), so that a typo fails before any job is submitted. It does not submit jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = Path("torchx.yaml")


class ProfileError(ValueError):
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
    image: str | None = None
    """Container image for container schedulers; local schedulers use the working tree."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables of every process."""
    max_restarts: int = 0
    """How often torchrun restarts all workers after one fails."""
    stage_args: tuple[str, ...] = ()
    """Config overrides (``section.key=value``) given to every stage run on this profile,
    before the pipeline's own (e.g. ``data.workers=4`` on hosts with cores to spare)."""

    @property
    def j(self) -> str:
        """The job shape as TorchX's ``-j`` argument, ``NNODESxNPROC``."""
        return f"{self.nnodes}x{self.nproc_per_node}"


def load_profiles(path: str | Path = DEFAULT_PATH) -> dict[str, Profile]:
    """Every profile of ``path``, validated."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(
            f"{path}: no such file (scheduler profiles live in torchx.yaml at the repository root)"
        )
    with path.open() as f:
        document = yaml.safe_load(f) or {}
    profiles = document.get("profiles") if isinstance(document, dict) else None
    if not isinstance(profiles, dict) or not profiles:
        raise ProfileError(f"{path}: expected a mapping 'profiles: {{NAME: {{...}}}}'")
    return {name: _profile(path, name, body) for name, body in profiles.items()}


def load_profile(name: str, path: str | Path = DEFAULT_PATH) -> Profile:
    """The profile called ``name``; the error lists the profiles that exist."""
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"{path}: no profile {name!r}; profiles: {sorted(profiles)}")
    return profiles[name]


def _profile(path: Path, name: str, body: Any) -> Profile:
    where = f"{path}: profile {name!r}"
    if not isinstance(body, dict):
        raise ProfileError(f"{where}: expected a mapping of settings")
    known = {f.name for f in fields(Profile)} - {"name"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    if "scheduler" not in body:
        raise ProfileError(f"{where}: 'scheduler' is required")
    for key in ("nnodes", "nproc_per_node", "max_restarts"):
        value = body.get(key, 0 if key == "max_restarts" else 1)
        low = 0 if key == "max_restarts" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ProfileError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
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
