"""The TorchX ``AppDef`` of a stage: ``torchrun -m recsys.stages.<stage>`` on NNODES×NPROC.

This module owns what every stage component in ``components/`` shares, so that each component
file is a typed signature of the stage's own options, its docstring and one call of
:func:`stage_app`: the options of every stage (:class:`StageFiles`: ``--config``, ``--out``,
``--force``) and of every job (:class:`Job`: ``-j``, ``-h``, cpu/gpu/memMB, image, env,
max_retries, mounts), which :func:`stage_component` adds to each component's signature and
``--help``, and the torchrun role. That role runs ``python -m
recsys.distributed.torchrun`` (torchrun, with a failed job told in one line) on every host,
with the job's rendezvous, resources, environment, mounts and restart policy:
``max_retries`` is both TorchX's retries of the role and torchrun's ``--max_restarts`` (after
a worker dies, torchrun restarts all of the job's workers, which resume from the last
checkpoint; local schedulers ignore TorchX's own retries). When no image is given (local_cwd
and Slurm run the working tree) and TorchX itself runs from a virtual environment, the job's
Python is that environment's, so that ``.venv/bin/torchx run -s local_cwd ...`` works
without activating anything. It does not choose a scheduler nor submit.
"""

from __future__ import annotations

import inspect
import os
import shlex
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torchx.specs as specs
from torchx.components.dist import parse_nnodes
from torchx.specs import AppDef, builders  # AppDef: also the components' return type
from torchx.util.types import decode_optional

from recsys.stages import STAGES

RDZV_PORT = 29500
"""The c10d store's port on the first host of a multi-host job (one host: a free port)."""


@dataclass(frozen=True)
class StageFiles:
    """What every stage is told besides its own options: its config, its directory and
    whether to run over a finished one (passed on to the stage after its own options)."""

    config: str | None = field(default=None, metadata={"help": "YAML stage config"})
    out: str = field(
        default="",
        metadata={"help": "the stage's directory (checkpoint/, weights/, stage.json, DONE)"},
    )
    force: bool = field(default=False, metadata={"help": "run again over a finished stage"})


def default_out(stage: str) -> str:
    """A stage's directory when ``--out`` is not given."""
    return f"runs/{stage}"


@dataclass(frozen=True)
class Job:
    """Where a stage runs and how big it is: the options every stage component shares, with
    their defaults and their ``--help`` lines."""

    j: str = field(
        default="1x2",
        metadata={"help": "NNODESxNPROC, hosts × processes per host (e.g. 1x2, 4x8)"},
    )
    h: str | None = field(
        default=None,
        metadata={"help": "TorchX named resource of one host (e.g. aws_p4d.24xlarge); "
                  "overrides cpu/gpu/memMB"},
    )  # fmt: skip
    cpu: int = field(default=2, metadata={"help": "CPUs per host"})
    gpu: int = field(default=0, metadata={"help": "GPUs per host"})
    memMB: int = field(default=8192, metadata={"help": "memory per host in MB"})  # sic: TorchX
    image: str = field(
        default="",
        metadata={"help": "container image holding the project (kubernetes); empty: the "
                  "working tree"},
    )  # fmt: skip
    env: dict[str, str] | None = field(
        default=None, metadata={"help": "extra environment variables, e.g. OMP_NUM_THREADS=4"}
    )
    max_retries: int = field(
        default=0,
        metadata={"help": "restarts after a failure, each resuming from the last checkpoint: "
                  "torchrun restarts all workers in place; schedulers that retry whole jobs "
                  "(Slurm requeue, Volcano) do so on top"},
    )  # fmt: skip
    mounts: list[str] | None = field(
        default=None,
        metadata={"help": "storage mounted into every container (container schedulers), "
                  "e.g. type=bind,src=/data,dst=/data[,readonly] or type=volume,src=PVC,dst=/runs"},
    )  # fmt: skip

    def shape(self) -> tuple[int, int, str, int]:
        """(min hosts, hosts, torchrun's ``--nnodes``, processes per host), or one line and
        exit code 2: ``torchx run`` shows a traceback for any other error of a component."""
        try:
            min_nodes, max_nodes, per_node, nnodes = parse_nnodes(self.j)
        except ValueError:
            raise SystemExit(
                f"error: --j {self.j!r}: expected NNODESxNPROC_PER_NODE, e.g. 2x8"
            ) from None
        if min(min_nodes, max_nodes, per_node) < 1:
            raise SystemExit(f"error: --j {self.j!r}: nodes and processes per node must be >= 1")
        return min_nodes, max_nodes, nnodes, per_node

    def resource(self) -> specs.Resource:
        """One host's resource: the named one, else cpu/gpu/memMB; an unknown name is one line
        and exit code 2."""
        if self.h is None:
            return specs.resource(cpu=self.cpu, gpu=self.gpu, memMB=self.memMB)
        try:
            return specs.resource(h=self.h)
        except KeyError:
            raise SystemExit(
                f"error: --h {self.h!r}: not a named resource of TorchX (e.g. aws_p4d.24xlarge, "
                "or one registered by an entry point)"
            ) from None


def stage_component(fn: Callable[..., AppDef]) -> Callable[..., AppDef]:
    """A stage component: ``fn`` declares the stage's own options and takes the others as
    ``**job``; TorchX sees (in ``--help`` and when it parses arguments) the stage's
    :class:`StageFiles` and the :class:`Job` options after them, typed, with their defaults
    (``--out``: ``runs/<stage>``) and help lines (a line ``fn`` documents itself wins)."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    shared = [*fields(StageFiles), *fields(Job)]
    hints = {**typing.get_type_hints(StageFiles), **typing.get_type_hints(Job)}
    defaults = {"out": default_out(fn.__name__)}
    added = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                          default=defaults.get(f.name, f.default),
                          annotation=_for_torchx(hints[f.name]))
        for f in shared
    ]  # fmt: skip
    fn.__signature__ = inspect.Signature([*own, *added], return_annotation=AppDef)
    doc = inspect.cleandoc(fn.__doc__ or "")
    documented = {line.split(":")[0].strip() for line in doc.splitlines() if ":" in line}
    lines = [f"    {f.name}: {f.metadata['help']}" for f in shared if f.name not in documented]
    fn.__doc__ = "\n".join([doc, *lines])  # its Args section ends the docstring
    return fn


def _for_torchx(hint: typing.Any) -> typing.Any:
    """TorchX reads ``typing.Optional[X]`` and ``typing.Dict[K, V]``, not ``X | None`` nor
    ``dict[K, V]``."""
    if isinstance(hint, types.UnionType):
        (inner,) = (a for a in typing.get_args(hint) if a is not type(None))
        return typing.Optional[_for_torchx(inner)]  # noqa: UP045
    if typing.get_origin(hint) is dict:
        return typing.Dict[typing.get_args(hint)]  # noqa: UP006
    if typing.get_origin(hint) is list:
        return typing.List[typing.get_args(hint)]  # noqa: UP006
    return hint


def stage_app(
    stage: str, overrides: Sequence[str] = (), job: dict[str, typing.Any] | None = None,
    **options: object,
) -> AppDef:  # fmt: skip
    """The stage's job: ``options`` (the stage's own, as ``--name value`` in their order),
    then its :class:`StageFiles` and ``overrides``, on the :class:`Job`; ``job`` holds the
    values of both (what :func:`stage_component` added)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    job = dict(job or {})
    files = {f.name: job.pop(f.name, f.default) for f in fields(StageFiles)}
    files["out"] = files["out"] or default_out(stage)
    stage_args = [*flags(**options, **files), *overrides]
    role = torchrun_role(stage, stage_args, Job(**job))
    return AppDef(name=f"recsys-{stage}", roles=[role])


def torchrun_role(stage: str, stage_args: list[str], job: Job) -> specs.Role:
    """``bash -c "python -m recsys.distributed.torchrun ... -m recsys.stages.<stage> ARGS"``
    on every host of the job."""
    min_nodes, max_nodes, nnodes, nproc = job.shape()
    resource = job.resource()
    if max_nodes == 1:  # one host: torchrun picks a free port itself
        endpoint: str = "localhost:0"
    else:  # the first host, as each scheduler names it in an environment variable
        endpoint = _Verbatim(f"$${{{specs.macros.rank0_env}:=localhost}}:{RDZV_PORT}")
    python = "python"
    if not job.image and sys.prefix != sys.base_prefix:
        python = sys.executable  # the venv's, so nothing needs activating
    command = [
        *(python, "-m", "recsys.distributed.torchrun", "--max_restarts", str(job.max_retries)),
        *("--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint),
        *("--rdzv_id", specs.macros.app_id, "--nnodes", nnodes, "--nproc_per_node", str(nproc)),
        *("--tee", "3", "--role", ""),
        *("-m", f"recsys.stages.{stage}", *stage_args),
    ]
    env = {"RECSYS_LOG_LEVEL": "INFO", **(job.env or {})}
    env["TORCHX_TRACKING_EXPERIMENT_NAME"] = "default-experiment"  # TorchX's tracker default
    env.setdefault("LOGLEVEL", os.getenv("LOGLEVEL", "WARNING"))  # torchrun's own log level
    return specs.Role(
        name=stage,
        image=job.image or "recsys",
        entrypoint="bash",
        args=["-c", " ".join(w if isinstance(w, _Verbatim) else shlex.quote(w) for w in command)],
        num_replicas=max_nodes,
        min_replicas=min_nodes,
        resource=resource,
        env=env,
        max_retries=job.max_retries,
        port_map={"c10d": RDZV_PORT},
        mounts=specs.parse_mounts(job.mounts) if job.mounts else [],
    )


class _Verbatim(str):
    """A shell word that must reach bash unquoted (it expands a scheduler's variable)."""


def flags(**values: object) -> list[str]:
    """``--name value`` for each option that is set (``True`` flags as ``--name``)."""
    out = []
    for name, value in values.items():
        if value is None or value is False or value == "":
            continue
        flag = "--" + name.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def _bool_argument(text: str) -> str:
    """A component's bool option on the command line: ``True`` or ``False`` (any case).

    TorchX turns exactly "true" (any case) into True and anything else into False; this
    refuses anything else instead of reading it as False."""
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text


_bool_argument.__name__ = "bool"  # what argparse shows: `--force bool`, `invalid bool value`


def _argument_type(parameter: inspect.Parameter) -> Callable[[str], object]:
    if decode_optional(parameter.annotation) is bool:
        return _bool_argument
    return _torchx_argument_type(parameter)


# TorchX 0.7 parses a component's bool options as strings and says so in `--help`
# (`--force str (default: False)`). It looks the argument type up in `builders` each time it
# parses, after it has loaded the component file (which imports this module).
_torchx_argument_type = builders.get_argparse_param_type
if getattr(_torchx_argument_type, "__module__", None) != __name__:
    builders.get_argparse_param_type = _argument_type
