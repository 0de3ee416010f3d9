"""A stage's configuration: a YAML file plus ``section.key=value`` overrides → typed sections.

This module owns reading and checking what a stage is told. A stage config has six
sections, each handed only to the part that uses it:

```yaml
model: {size: L4H64A4, max_len: 50, negatives: 4096}   # ModelSection
data:  {train: data/ml100k/seq, valid: null, batch_size: 256}  # DataSection
optim: {lr: 0.001, sparse: rowwise_adagrad}             # recsys.train.optim.OptimConfig
run:   {epochs: 1, checkpoint_every: 0, seed: 0}        # RunSection
plan:  {sharding_types: {item: [row_wise]}}             # PlanSection
lum:   {temperature: 0.05, queries: {liked: [0, 1]}}    # LumSection (LUM's stages only)
```

plus optionally ``stages: {pretrain: {run: {epochs: 20}}, finetune: {...}}``: sections that
apply to one stage only, over the shared ones. Unknown sections or keys, and values of the
wrong type, are errors naming them. Values of overrides are parsed as YAML
(``optim.lr=3e-4``, ``run.max_steps=null``, ``plan.sharding_types={item: [table_wise]}``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recsys.errors import UserError
from recsys.train.optim import OptimConfig

ARCHS = ("gpsd", "deepfm", "din")


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ModelSection:
    size: str = "L4H64A4"
    """``L<layers>H<width>A<heads>`` (GPSD's naming)."""
    max_len: int = 50
    """Most recent behaviour events kept per sequence (GPSD's code keeps 50 on MovieLens)."""
    negatives: int = 4096
    """Uniform negatives per sequence in pretraining (GPSD: 4,096)."""
    causal: bool = True
    """Causal attention; False for bidirectional."""
    dropout: float = 0.0
    arch: str = "gpsd"
    """The CTR model: ``gpsd`` (the Transformer ranker), or the baselines ``deepfm`` and
    ``din`` (their tables as wide as the size's width, so pretrained tables transfer)."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")


@dataclass(frozen=True)
class DataSection:
    train: str = ""
    """Training dataset (a ``seq`` dataset for pretraining, ``ctr`` for finetuning)."""
    valid: str | None = None
    """Dataset evaluated after every epoch (None: none)."""
    batch_size: int = 256
    """Rows per batch on each rank."""
    workers: int = 0
    """Data-loader worker processes per rank."""
    shuffle: bool = True
    skip_bad_row_groups: bool = False
    """Skip row groups that cannot be read or hold invalid values, counting their rows
    (``train_skipped_rows`` in each epoch's metrics), instead of stopping the job."""


@dataclass(frozen=True)
class RunSection:
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many steps (None: after ``epochs``)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep: int = 2
    """Checkpoints kept."""
    resume: bool = True
    """Continue from the stage's latest checkpoint when there is one (False: start over)."""
    seed: int = 0
    record_samples: bool = False
    """Audit: write each training step's dataset row ids to ``DIR/samples/rank<r>.jsonl``."""
    cpu_bf16: bool = False
    """bf16 autocast of the forward pass on CPU too (always on CUDA): ~1.4x faster CTR
    steps on CPUs with bf16 matrix units (AMX), slower without them (``recsys doctor``
    tells)."""
    nonfinite: str = "stop"
    """A step whose loss or dense gradient norm is NaN or infinite: ``stop`` the run with
    one line naming the step, rank and value (no checkpoint, no DONE), or ``skip`` the step
    (no update) and count it (``train_nonfinite_steps``)."""


@dataclass(frozen=True)
class PlanSection:
    sharding_types: dict[str, list[str]] = field(default_factory=lambda: {"item": ["row_wise"]})
    """Allowed sharding types per table name, handed to TorchRec's planner."""
    file: str | None = None
    """A plan written by ``recsys plan --out`` (docs/plan.md): used as it is instead of
    planning; it must match the model's tables and the job's world size and device.
    ``plan=PATH`` on the command line is short for ``plan.file=PATH``."""


@dataclass(frozen=True)
class LumSection:
    """LUM's three steps (``lum_pretrain``, ``lum_query``, ``lum_finetune``)."""

    temperature: float = 0.05
    """InfoNCE temperature of next-condition-item prediction (cosine similarities / it)."""
    negatives: int = 0
    """Shared uniform negatives per batch besides the in-batch ones."""
    pack: int = 0
    """Tokens per packed row of users in pretraining (0: one user per row); at least twice
    ``model.max_len``."""
    queries: dict[str, list[int]] = field(default_factory=dict)
    """The N query conditions of step 2: condition feature → N values (aligned lists);
    empty: every value of the dataset's condition feature (there must be one)."""
    features: str | None = None
    """Step 3: the ``lum_query`` stage whose outputs feed the ranker (None: the ranker
    alone)."""
    direct: bool = True
    """Step 3: the N outputs themselves as features of the ranker's head."""
    matching: bool = True
    """Step 3: the cosine similarity of each output with the candidate's item embedding."""

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.negatives < 0 or self.pack < 0:
            raise ValueError("temperature must be > 0, negatives and pack >= 0")
        sizes = {len(v) for v in self.queries.values()}
        if len(sizes) > 1 or 0 in sizes:
            raise ValueError(f"queries must give the same number (>= 1) of values: {self.queries}")


@dataclass(frozen=True)
class StageConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunSection = field(default_factory=RunSection)
    plan: PlanSection = field(default_factory=PlanSection)
    lum: LumSection = field(default_factory=LumSection)
    given: frozenset[str] = frozenset()
    """``section.key`` names set by the file or overrides (the rest are defaults)."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("given")
        if self.lum == LumSection():  # GPSD's stages: their record (and fingerprint) as before
            out.pop("lum")
        if not self.run.cpu_bf16:  # the same for runs in fp32, as before the option
            out["run"].pop("cpu_bf16")
        if self.run.nonfinite == "stop":  # the default keeps earlier stages' fingerprints
            out["run"].pop("nonfinite")
        return out


def _check(value: Any, kind: Any, where: str) -> Any:
    """``value`` as type ``kind`` (ints widen to floats, lists to tuples), or a ConfigError."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if kind in (int, float, str, bool):
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_check(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check(v, typing.get_args(kind)[0], where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_kind, value_kind = typing.get_args(kind)
        return {
            _check(k, key_kind, where): _check(v, value_kind, f"{where}.{k}")
            for k, v in value.items()
        }
    raise ConfigError(f"{where}: unsupported type {kind}")


def _section(cls: type, values: dict[str, Any], name: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown keys {unknown}; known: {sorted(known)}")
    checked = {k: _check(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**checked)
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if key == "plan" and sep:  # plan=plan.json, the plan file's short form
        key = "plan.file"
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key.split("."), value


STAGE_NAMES = (
    "pretrain",
    "transfer",
    "freeze",
    "finetune",
    "evaluate",
    "lum_pretrain",
    "lum_query",
    "lum_finetune",
)


def load(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    stage: str | None = None,
) -> StageConfig:
    """The config of ``path`` (None: all defaults) for ``stage``, with ``overrides`` applied
    in order. A file may hold a ``stages`` section whose ``stages.<stage>`` sections are
    merged over the shared ones (e.g. more epochs for pretraining than for finetuning)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot be read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top")
    per_stage = raw.pop("stages", None) or {}
    unknown = sorted(set(per_stage) - set(STAGE_NAMES))
    if unknown:
        raise ConfigError(f"stages: unknown stages {unknown}; stages: {list(STAGE_NAMES)}")
    raw = {k: dict(v or {}) for k, v in raw.items()}
    for section, values in (per_stage.get(stage) or {}).items() if stage else ():
        if not isinstance(values, dict):
            raise ConfigError(f"stages.{stage}.{section}: expected a mapping of keys")
        raw.setdefault(section, {}).update(values)
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) != 2:
            raise ConfigError(f"override {text!r}: expected exactly section.key")
        raw.setdefault(keys[0], {})[keys[1]] = value
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> StageConfig:
    """A config from ``{section: {key: value}}`` (as in a file, or a stage.json's record)."""
    sections = {f.name: f for f in dataclasses.fields(StageConfig) if f.name != "given"}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config sections {unknown}; known: {sorted(sections)}")
    hints = typing.get_type_hints(StageConfig)
    built = {name: _section(hints[name], raw.get(name) or {}, name) for name in sections}
    given = frozenset(f"{s}.{k}" for s, values in raw.items() for k in values or {})
    return StageConfig(**built, given=given)
