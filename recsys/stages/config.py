"""A stage's configuration: a YAML file plus ``section.key=value`` overrides → typed sections.

This module owns reading what a stage is told. A stage config has seven sections, each handed
only to the part that uses it (their schema: :mod:`recsys.stages.sections`):

```yaml
model: {size: L4H64A4, max_len: 50, negatives: 4096}   # ModelSection
data:  {train: data/ml100k/seq, valid: null, batch_size: 256}  # DataSection
optim: {lr: 0.001, sparse: rowwise_adagrad}             # recsys.train.optim.OptimConfig
run:   {epochs: 1, checkpoint_every: 0, seed: 0}        # recsys.train.trainer.RunConfig
plan:  {sharding_types: {item: [row_wise]}}             # PlanSection
lum:   {temperature: 0.05, queries: {liked: [0, 1]}}    # LumSection (LUM's stages only)
freeze: {dtype: fp16}                                   # FreezeSection (the freeze stage)
```

plus optionally ``stages: {pretrain: {run: {epochs: 20}}, finetune: {...}}``: sections that
apply to one stage only, over the shared ones. A config is read once per process, in order:

1. the file, as strict YAML (:mod:`recsys.yamltext`: a key given twice is refused with both
   lines), its sections and their keys checked against the schema (every ``stages.<stage>``
   too, so a mistake in any stage shows at the first);
2. the ``stages.<stage>`` sections over the shared ones, then the overrides in order, each
   replacing the whole value of its ``section.key``; values of overrides are parsed as YAML
   (``optim.lr=3e-4``, ``run.max_steps=null``, ``plan.sharding_types={item: [table_wise]}``;
   ``plan=PATH`` is short for ``plan.file=PATH``);
3. OmegaConf's structured configs check every value against its field's type and build each
   section's dataclass, whose own range checks run then, and :class:`StageConfig` checks the
   settings that must fit each other.

Every mistake is a :class:`ConfigError` of one line naming the key, raised before a stage
writes anything. A value is taken as written: OmegaConf's conversions of other types (the
text ``'true'`` or the number 1 to a bool, a number to a string) are refused; a whole number,
or a number that YAML 1.1 reads as text (``3e-4``), is a float where a float is due.

Why OmegaConf: its structured configs are this interface (typed dataclasses, YAML values,
dotted ``section.key=value`` overrides, values checked against each field's type), and it is
widely used and kept. tyro, the other candidate, parses ``--section.key value`` command lines
into dataclasses: its file and override syntax would be new to our users, and its errors are
made for a terminal, not one line. Two things stay here because OmegaConf does them otherwise:
a mapping-valued key given again replaces its mapping (OmegaConf's merge would merge
``plan.sharding_types`` with its default, and a stage's fingerprint would change with it), and
errors name the key in one line (OmegaConf's messages span several).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recsys import yamltext
from recsys.checks import shown
from recsys.errors import UserError
from recsys.stages import STAGES
from recsys.stages.sections import (
    SECTIONS,
    DataSection,
    FreezeSection,
    LumSection,
    ModelSection,
    PlanSection,
    StageConfig,
)
from recsys.train.optim import OptimConfig
from recsys.train.trainer import RunConfig

__all__ = [
    "SECTIONS",
    "ConfigError",
    "DataSection",
    "FreezeSection",
    "LumSection",
    "ModelSection",
    "OptimConfig",
    "PlanSection",
    "RunConfig",
    "StageConfig",
    "field_type",
    "from_dict",
    "load",
    "parse_override",
    "section_class",
]


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


def section_class(name: str) -> type:
    """The dataclass of section ``name``."""
    return typing.get_type_hints(StageConfig)[name]


def field_type(cls: type, name: str) -> str:
    """The type of field ``name`` of dataclass ``cls`` as written, in YAML's words (``null``)."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    text = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return text.replace("None", "null")


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
    layers = [_sections(raw), per_stage.get(stage, {}) if stage else {}]
    layers += [_override(text) for text in overrides]
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:  # a key given again replaces its whole value
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return _typed(merged)


def from_dict(raw: dict[str, Any]) -> StageConfig:
    """A config from ``{section: {key: value}}`` (as in a file, or a stage.json's record,
    whose schedule lengths read as set)."""
    return _typed(_sections(raw))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if key == "plan" and sep:  # plan=plan.json, the plan file's short form
        key = "plan.file"
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    value = yamltext.parse(raw, f"override {text!r}", ConfigError) if raw else ""
    return key.split("."), value


def _override(text: str) -> dict[str, dict[str, Any]]:
    keys, value = parse_override(text)
    if len(keys) != 2:
        raise ConfigError(f"override {text!r}: expected exactly section.key")
    return _sections({keys[0]: {keys[1]: value}})


def _read(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of the config file ``path`` (an empty file: no settings)."""
    raw = yamltext.read(path, ConfigError, "a config is YAML text")
    return _mapping(raw, str(path), "sections at the top")


def _mapping(value: Any, where: str, of: str) -> dict[Any, Any]:
    """``value`` as a mapping of ``of`` (None, an empty entry: an empty one), or a
    ConfigError naming ``where``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of {of}, got {shown(value)}")
    return value


def _per_stage(raw: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """The ``stages`` section: stage name → its sections (every stage's, not only the one
    loaded, so a mistake in any of them shows at the first stage)."""
    per_stage = _mapping(raw, "stages", "stage names")
    unknown = sorted(set(per_stage) - set(STAGES), key=str)
    if unknown:
        raise ConfigError(f"stages: unknown stages {unknown}; stages: {list(STAGES)}")
    return {stage: _sections(v, f"stages.{stage}") for stage, v in per_stage.items()}


def _sections(raw: Any, where: str = "") -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` (at the top, or under ``where``: ``stages.pretrain``):
    known section names, each a mapping of its known keys; copied, so merging leaves ``raw``
    as it is."""
    raw = _mapping(raw, where or "config", "sections")
    unknown = sorted(set(raw) - set(SECTIONS), key=str)
    prefix = f"{where}." if where else ""
    if unknown:
        said = f"{where}: " if where else ""
        raise ConfigError(f"{said}unknown config sections {unknown}; known: {sorted(SECTIONS)}")
    out = {}
    for name, values in raw.items():
        values = _mapping(values, f"{prefix}{name}", "keys")
        known = {f.name for f in dataclasses.fields(section_class(name))}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise ConfigError(f"{prefix}{name}: unknown keys {unknown}; known: {sorted(known)}")
        out[name] = dict(values)
    return out


def _typed(raw: dict[str, dict[str, Any]]) -> StageConfig:
    """The typed config of checked ``{section: {key: value}}``; the rest are defaults."""
    sections = {name: _section(name, raw.get(name, {})) for name in SECTIONS}
    try:
        return StageConfig(**sections)
    except ValueError as err:  # settings of two sections, the message naming both keys
        raise ConfigError(str(err)) from None


def _section(name: str, values: dict[str, Any]) -> Any:
    """Section ``name``'s dataclass with ``values`` set, checked by OmegaConf and by itself."""
    cls = section_class(name)
    node = OmegaConf.structured(cls)
    OmegaConf.set_readonly(node, False)  # a frozen dataclass's node: read-only until set
    for key, value in values.items():
        where = f"{name}.{key}"
        try:
            OmegaConf.update(node, key, _literal(value), merge=False)
            kept = OmegaConf.select(node, key, throw_on_missing=True)
            kept = OmegaConf.to_container(kept, resolve=True) if OmegaConf.is_config(kept) else kept
        except OmegaConfBaseException:
            kept = _REFUSED
        if kept is _REFUSED or not _as_written(value, kept):
            raise ConfigError(f"{where}: expected {field_type(cls, key)}, got {shown(value)}")
    try:
        return OmegaConf.to_object(node)
    except ValueError as err:  # the section's own check, its message starting with the key
        raise ConfigError(f"{name}.{err}") from None


_REFUSED = object()
"""What OmegaConf kept of a value it refused."""


def _literal(value: Any) -> Any:
    """``value`` escaped so that OmegaConf keeps it as written: ``${...}`` is no
    interpolation and ``???`` no missing value. (A fingerprint must not depend on the
    environment of the process that computes it, nor on another setting's value.)"""
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    if not isinstance(value, str):
        return value
    if re.fullmatch(r"\\*\?\?\?", value):  # OmegaConf drops one leading backslash
        return "\\" + value
    # Before ${, each backslash doubled and one more: OmegaConf reads them back as written.
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)


def _as_written(given: Any, kept: Any) -> bool:
    """Whether OmegaConf kept ``given`` as written: the same types all the way down, except
    that a whole number, or a number YAML 1.1 reads as text (``3e-4``), may become a float."""
    if isinstance(given, dict):
        return isinstance(kept, dict) and all(
            k in kept and _as_written(v, kept[k]) for k, v in given.items()
        )
    if isinstance(given, list | tuple):
        return isinstance(kept, list | tuple) and all(map(_as_written, given, kept))
    if isinstance(kept, float):
        return type(given) in (float, int, str)
    if isinstance(given, str):  # (OmegaConf keeps an escaped ``???`` as a str of its own)
        return isinstance(kept, str)
    return type(given) is type(kept)
