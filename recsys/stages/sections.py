"""What a stage can be told: the typed sections of its config, their defaults and their checks.

This module owns the schema of a stage config: one frozen dataclass per concern, each field
with its type, its one default and a docstring under it (``recsys config show`` prints them),
each section checking its own ranges in ``__post_init__`` and :class:`StageConfig` the
settings of two sections that must fit each other. ``optim`` and ``run`` are the training
code's own settings (:class:`recsys.train.optim.OptimConfig`,
:class:`recsys.train.trainer.RunConfig`), handed to it as they are. A default of None that a
docstring calls derived is filled in where the data is known (``OptimConfig.fitted``).
Reading files and overrides is :mod:`recsys.stages.config`'s job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from recsys.checks import positive, require
from recsys.distributed.planning import SHARDING_TYPES
from recsys.models.sparse import FROZEN_DTYPES
from recsys.models.tower import TowerConfig
from recsys.train.optim import OptimConfig
from recsys.train.trainer import RunConfig

ARCHS = ("gpsd", "deepfm", "din")


@dataclass(frozen=True)
class ModelSection:
    """The model a stage builds."""

    size: str = "L4H64A4"
    """``L<layers>H<width>A<heads>`` (GPSD's naming)."""
    max_len: int = 50
    """Most recent behaviour events kept per sequence (GPSD's code keeps 50 on MovieLens)."""
    negatives: int = 4096
    """Uniform negatives per sequence in pretraining (GPSD: 4,096)."""
    causal: bool = True
    """Causal attention; False for bidirectional."""
    dropout: float = 0.0
    """Dropout of the attention weights while training (0: none)."""
    arch: str = "gpsd"
    """The CTR model: ``gpsd`` (the Transformer ranker), or the baselines ``deepfm`` and
    ``din`` (their tables as wide as the size's width, so pretrained tables transfer)."""

    def __post_init__(self) -> None:
        _size(self.size)
        # Pretraining predicts each event from those before it: one event leaves no target.
        require(self.max_len >= 2, "max_len", ">= 2", self.max_len)
        require(self.negatives >= 1, "negatives", ">= 1", self.negatives)
        require(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        require(self.arch in ARCHS, "arch", f"one of {', '.join(ARCHS)}", self.arch)


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
    """The datasets a stage reads and how they are batched."""

    train: str = ""
    """Training dataset (a ``seq`` dataset for pretraining, ``ctr`` for finetuning)."""
    valid: str | None = None
    """Dataset evaluated after every epoch (None: none)."""
    batch_size: int = 256
    """Rows per batch on each rank."""
    workers: int = 0
    """Data-loader worker processes per rank."""
    shuffle: bool = True
    """Shuffle the training rows every epoch (row groups, then rows within a buffer; seeded
    by ``run.seed``); evaluation reads in file order."""
    skip_bad_row_groups: bool = False
    """Skip row groups that cannot be read or hold invalid values, counting their rows
    (``train_skipped_rows`` in each epoch's metrics), instead of stopping the job."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        rule = ">= 0 (0: read in the training process)"
        require(self.workers >= 0, "workers", rule, self.workers)


@dataclass(frozen=True)
class PlanSection:
    """Where the tables go."""

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
            require(known, f"sharding_types.{table}", rule, kinds)


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
        require(positive(temperature), "temperature", "a finite number > 0", temperature)
        require(self.negatives >= 0, "negatives", ">= 0", self.negatives)
        require(self.pack >= 0, "pack", ">= 0 (0: one user per row)", self.pack)
        sizes = {len(v) for v in self.queries.values()}
        rule = "conditions that each give the same number (>= 1) of values"
        require(len(sizes) <= 1 and 0 not in sizes, "queries", rule, self.queries)


@dataclass(frozen=True)
class FreezeSection:
    """How the ``freeze`` stage stores the tables it freezes."""

    dtype: str = "fp32"
    """fp32 (as trained), fp16 (half the memory; finetuning reads the rounded values) or int8
    (row-wise codes with an fp16 scale and bias: (dim + 4) / (4 dim) of the memory)."""

    def __post_init__(self) -> None:
        require(
            self.dtype in FROZEN_DTYPES, "dtype", f"one of {', '.join(FROZEN_DTYPES)}", self.dtype
        )


RECORDED_UNSET = {"warmup_steps": 100, "total_steps": 1000}
"""What a stage's record holds for a schedule length the config leaves to the data: the
numbers every finished stage has recorded for it (their fingerprints depend on them)."""


@dataclass(frozen=True)
class StageConfig:
    """A stage's whole config: each section handed only to the part that uses it."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    plan: PlanSection = field(default_factory=PlanSection)
    lum: LumSection = field(default_factory=LumSection)
    freeze: FreezeSection = field(default_factory=FreezeSection)

    def __post_init__(self) -> None:
        least = 2 * self.model.max_len  # LUM's tokens: a condition and an item per event
        if self.lum.pack and self.lum.pack < least:
            raise ValueError(
                f"lum.pack: must be 0 or at least 2 × model.max_len = {least} to hold one "
                f"user, got {self.lum.pack}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The record of this config (stage.json, fingerprints): every section's settings,
        written as they have always been written, so that a stage finished before a setting
        existed keeps its fingerprint."""
        out = dataclasses.asdict(self)
        if self.lum == LumSection():  # GPSD's stages: their record (and fingerprint) as before
            out.pop("lum")
        if self.freeze == FreezeSection():  # likewise for tables frozen as they were trained
            out.pop("freeze")
        if not self.run.cpu_bf16:  # the same for runs in fp32, as before the option
            out["run"].pop("cpu_bf16")
        if self.run.bf16 == "auto":  # kept out of records made before the option
            out["run"].pop("bf16")
        if self.run.log_every == 10:  # how often to log, not what
            out["run"].pop("log_every")
        if self.run.compile == "auto":  # how fast, not what: kept out of earlier records
            out["run"].pop("compile")
        if self.run.nonfinite == "stop":  # the default keeps earlier stages' fingerprints
            out["run"].pop("nonfinite")
        for key, recorded in RECORDED_UNSET.items():
            if out["optim"][key] is None:
                out["optim"][key] = recorded
        return out


SECTIONS = tuple(f.name for f in dataclasses.fields(StageConfig))
