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
apply to one stage only, over the shared ones. Unknown sections or keys, a key given twice,
values of the wrong type or out of range are errors of one line naming the key, raised here,
before a stage writes anything. Values of overrides are parsed as YAML
(``optim.lr=3e-4``, ``run.max_steps=null``, ``plan.sharding_types={item: [table_wise]}``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys import yamltext
from recsys.distributed.planning import SHARDING_TYPES
from recsys.errors import UserError
from recsys.models.tower import TowerConfig
from recsys.train.optim import OptimConfig

ARCHS = ("gpsd", "deepfm", "din")
NONFINITE = ("stop", "skip")
SEED_LIMIT = 2**31
"""Seeds lie below it: each rank seeds NumPy with ``seed + rank``, which must stay < 2**32."""


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    """``key: must be RULE, got VALUE`` as a ValueError unless ``ok``. A section's checks
    name their own key; :func:`_section` puts the section's name in front."""
    if not ok:
        raise ValueError(f"{key}: must be {rule}, got {_shown(value)}")


def _positive(value: float) -> bool:
    """A finite number > 0 (NaN and infinities are neither)."""
    return math.isfinite(value) and value > 0


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
        _size(self.size)
        # Pretraining predicts each event from those before it: one event leaves no target.
        _require(self.max_len >= 2, "max_len", ">= 2", self.max_len)
        _require(self.negatives >= 1, "negatives", ">= 1", self.negatives)
        _require(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        _require(self.arch in ARCHS, "arch", f"one of {', '.join(ARCHS)}", self.arch)


def _size(name: str) -> None:
    """Refuse a ``model.size`` the tower or the embedding tables cannot take."""
    try:
        tower = TowerConfig.from_name(name)
    except ValueError as err:
        raise ValueError(f"size: {err}") from None
    # Every table is as wide as the model, and FBGEMM's fused tables (TorchRec's kernels,
    # on CPU and GPU) take only widths that are multiples of 4.
    if tower.hidden % 4:
        raise ValueError(
            f"size: width H{tower.hidden} must be a multiple of 4 (the embedding tables are "
            f"as wide as the model), got {name!r}"
        )


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

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _require(
            self.workers >= 0, "workers", ">= 0 (0: read in the training process)", self.workers
        )


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

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "epochs", ">= 1", self.epochs)
        steps = self.max_steps
        _require(steps is None or steps >= 1, "max_steps", ">= 1, or null for no limit", steps)
        every = self.checkpoint_every
        _require(every >= 0, "checkpoint_every", ">= 0 (0: only at the end)", every)
        _require(self.keep >= 1, "keep", ">= 1", self.keep)
        seed_range = f"in [0, {SEED_LIMIT - 1}]"
        _require(0 <= self.seed < SEED_LIMIT, "seed", seed_range, self.seed)
        choices = " or ".join(NONFINITE)
        _require(self.nonfinite in NONFINITE, "nonfinite", choices, self.nonfinite)


@dataclass(frozen=True)
class PlanSection:
    sharding_types: dict[str, list[str]] = field(default_factory=lambda: {"item": ["row_wise"]})
    """Allowed sharding types per table name, handed to TorchRec's planner."""
    file: str | None = None
    """A plan written by ``recsys plan --out`` (docs/plan.md): used as it is instead of
    planning; it must match the model's tables and the job's world size and device.
    ``plan=PATH`` on the command line is short for ``plan.file=PATH``."""

    def __post_init__(self) -> None:
        # The planner gets these as constraints; an empty list leaves a table no placement.
        rule = f"a non-empty list of {', '.join(SHARDING_TYPES)}"
        for table, kinds in self.sharding_types.items():
            known = bool(kinds) and all(kind in SHARDING_TYPES for kind in kinds)
            _require(known, f"sharding_types.{table}", rule, kinds)


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
        temperature = self.temperature
        _require(_positive(temperature), "temperature", "a finite number > 0", temperature)
        _require(self.negatives >= 0, "negatives", ">= 0", self.negatives)
        _require(self.pack >= 0, "pack", ">= 0 (0: one user per row)", self.pack)
        sizes = {len(v) for v in self.queries.values()}
        rule = "conditions that each give the same number (>= 1) of values"
        _require(len(sizes) <= 1 and 0 not in sizes, "queries", rule, self.queries)


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


SECTIONS = tuple(f.name for f in dataclasses.fields(StageConfig) if f.name != "given")


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
        raise ConfigError(f"{where}: expected {kind.__name__}, got {_shown(value)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {_shown(value)}")
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {_shown(value)}")
        return tuple(_check(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {_shown(value)}")
        return [_check(v, typing.get_args(kind)[0], where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
        key_kind, value_kind = typing.get_args(kind)
        return {
            _check(k, key_kind, where): _check(v, value_kind, f"{where}.{k}")
            for k, v in value.items()
        }
    raise ConfigError(f"{where}: unsupported type {kind}")


def _section(cls: type, values: dict[str, Any], name: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise ConfigError(f"{name}: unknown keys {unknown}; known: {sorted(known)}")
    checked = {k: _check(v, hints[k], f"{name}.{k}") for k, v in values.items()}
    try:
        return cls(**checked)
    except ValueError as err:  # a section's own check, its message starting with the key
        raise ConfigError(f"{name}.{err}") from None


def _mapping(value: Any, where: str, of: str) -> dict[Any, Any]:
    """``value`` as a mapping of ``of`` (None, an empty entry: an empty one), or a
    ConfigError naming ``where``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of {of}, got {_shown(value)}")
    return value


def _sections(raw: Any, where: str = "") -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` (at the top, or under ``where``: ``stages.pretrain``):
    known section names, each a mapping of keys; copied, so merging leaves ``raw`` as it is."""
    raw = _mapping(raw, where or "config", "sections")
    unknown = sorted(set(raw) - set(SECTIONS), key=str)
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown config sections {unknown}; known: {sorted(SECTIONS)}")
    prefix = f"{where}." if where else ""
    return {name: dict(_mapping(v, f"{prefix}{name}", "keys")) for name, v in raw.items()}


def _shown(value: Any, most: int = 80) -> str:
    """``repr(value)``, cut to ``most`` characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= most else f"{text[: most - 3]}..."


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML, or a ConfigError of one line naming ``where`` and the position."""
    return yamltext.parse(text, where, ConfigError)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if key == "plan" and sep:  # plan=plan.json, the plan file's short form
        key = "plan.file"
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    value = _parse_yaml(raw, f"override {text!r}") if raw else ""
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


def _read(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of the config file ``path`` (an empty file: no settings)."""
    raw = yamltext.read(path, ConfigError, "a config is YAML text")
    return _mapping(raw, str(path), "sections at the top")


def _per_stage(raw: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """The ``stages`` section: stage name → its sections (every stage's, not only the one
    loaded, so a mistake in any of them shows at the first stage)."""
    per_stage = _mapping(raw, "stages", "stage names")
    unknown = sorted(set(per_stage) - set(STAGE_NAMES), key=str)
    if unknown:
        raise ConfigError(f"stages: unknown stages {unknown}; stages: {list(STAGE_NAMES)}")
    return {stage: _sections(v, f"stages.{stage}") for stage, v in per_stage.items()}


def load(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    stage: str | None = None,
) -> StageConfig:
    """The config of ``path`` (None: all defaults) for ``stage``, with ``overrides`` applied
    in order. A file may hold a ``stages`` section whose ``stages.<stage>`` sections are
    merged over the shared ones (e.g. more epochs for pretraining than for finetuning)."""
    raw = _read(path) if path is not None else {}
    per_stage = _per_stage(raw.pop("stages", None))
    raw = _sections(raw)
    for section, values in per_stage.get(stage, {}).items() if stage else ():
        raw.setdefault(section, {}).update(values)
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) != 2:
            raise ConfigError(f"override {text!r}: expected exactly section.key")
        raw.setdefault(keys[0], {})[keys[1]] = value
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> StageConfig:
    """A config from ``{section: {key: value}}`` (as in a file, or a stage.json's record)."""
    raw = _sections(raw)
    hints = typing.get_type_hints(StageConfig)
    built = {name: _section(hints[name], raw.get(name, {}), name) for name in SECTIONS}
    _check_together(built["model"], built["lum"])
    given = frozenset(f"{s}.{k}" for s, values in raw.items() for k in values)
    return StageConfig(**built, given=given)


def _check_together(model: ModelSection, lum: LumSection) -> None:
    """Settings of two sections that must fit each other."""
    least = 2 * model.max_len  # LUM's tokens: a condition and an item per event
    if lum.pack and lum.pack < least:
        raise ConfigError(
            f"lum.pack: must be 0 or at least 2 × model.max_len = {least} to hold one user, "
            f"got {lum.pack}"
        )
