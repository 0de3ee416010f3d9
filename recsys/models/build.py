"""Building a model from its settings and a dataset's vocabularies, on the meta device.

This module owns turning a stage config's ``model`` (and ``lum``) settings into a model: the
tower's shape, one table per vocabulary of the dataset (``item`` and the side features,
LUM's condition features too), the CTR architecture ``model.arch`` names. The tables are
built on the meta device, so that they cost no memory until they are sharded; the dense
part on the current device. Training stages build their models here, and ``recsys plan``
builds the same ones to plan them. It does not read datasets (callers hand it their
:class:`DatasetMeta`), place, shard or train.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from recsys.data.schema import DatasetMeta
from recsys.errors import UserError
from recsys.models.baselines import DIN, BaselineConfig, DeepFM
from recsys.models.ctr import CTRConfig, CTRModel
from recsys.models.generative import GenerativeConfig, GenerativeModel
from recsys.models.lum import LUM, LUMConfig
from recsys.models.tower import TowerConfig

META = torch.device("meta")


class ModelSettings(Protocol):
    """What the builders read of a stage config's ``model`` section."""

    size: str
    max_len: int
    negatives: int
    causal: bool
    dropout: float
    arch: str


class LumSettings(Protocol):
    """What :func:`lum_model` reads of a stage config's ``lum`` section."""

    temperature: float
    negatives: int
    pack: int


class ModelInputError(UserError, RuntimeError):
    """A dataset cannot give the model it is asked for; the message says what it lacks."""


def tower(model: ModelSettings) -> TowerConfig:
    # One more position than the history: the CTR model appends the candidate token.
    return TowerConfig.from_name(
        model.size, max_len=model.max_len + 1, causal=model.causal, dropout=model.dropout
    )


def side_features(meta: DatasetMeta) -> dict[str, int]:
    return {name: meta.vocab[name] for name in meta.side_features}


def generative_model(model: ModelSettings, meta: DatasetMeta) -> GenerativeModel:
    config = GenerativeConfig(
        tower(model),
        meta.vocab["item"],
        side_features=side_features(meta),
        negatives=model.negatives,
        item_keys=meta.keys("item"),
    )
    return GenerativeModel(config, sparse_device=META)


def ctr_model(
    model: ModelSettings,
    meta: DatasetMeta,
    frozen: tuple[str, ...] = (),
    extra: int = 0,
    frozen_dtype: str = "fp32",
) -> nn.Module:
    """The CTR model ``model.arch`` names, its tables sized by the dataset's vocabularies
    (``extra``: dense features per sample its head takes, LUM's step 3; ``frozen_dtype``:
    how the ``frozen`` tables are stored)."""
    frozen_tables = {"frozen": frozen, "frozen_dtype": frozen_dtype}
    if model.arch == "gpsd":
        config = CTRConfig(
            tower(model), meta.vocab["item"], side_features(meta), **frozen_tables, extra=extra
        )
        return CTRModel(config, sparse_device=META)
    width = tower(model).hidden
    baseline = BaselineConfig(
        meta.vocab["item"], side_features(meta), dim=width, **frozen_tables, extra=extra
    )
    return {"deepfm": DeepFM, "din": DIN}[model.arch](baseline, sparse_device=META)


def recorded_ctr_model(model: ModelSettings, meta: DatasetMeta, record: dict) -> nn.Module:
    """The CTR model whose tables a finished stage's ``record`` froze (``frozen``), stored as
    it stored them (``frozen_dtype``; fp32 in records that predate it)."""
    frozen = tuple(record.get("frozen", ()))
    return ctr_model(model, meta, frozen, frozen_dtype=record.get("frozen_dtype", "fp32"))


def lum_model(model: ModelSettings, lum: LumSettings, meta: DatasetMeta) -> LUM:
    """LUM's user model for a ``seq`` dataset with condition features: two tokens per event,
    so the tower covers twice ``model.max_len`` positions and the query after them."""
    if not meta.conditions:
        raise ModelInputError(
            "the dataset declares no condition features (dataset.json 'conditions'); LUM "
            "needs one (e.g. MovieLens' 'liked', recsys data synth --conditions K)"
        )
    config = LUMConfig(
        TowerConfig.from_name(
            model.size,
            max_len=max(2 * model.max_len + 1, lum.pack),
            causal=True,
            dropout=model.dropout,
        ),
        meta.vocab["item"],
        side_features=side_features(meta),
        conditions={name: meta.vocab[name] for name in meta.conditions},
        negatives=lum.negatives,
        temperature=lum.temperature,
        pack=lum.pack,
        item_keys=meta.keys("item"),
    )
    return LUM(config, sparse_device=META)
