"""Embedding tables as TorchRec modules, addressed by table name, trainable or frozen.

This module owns the sparse part of every model: one ``EmbeddingCollection`` of sequence
tables (jagged lookups, no pooling) and optionally one ``EmbeddingBagCollection`` of pooled
tables, each split in two: trainable tables, and frozen tables whose output is detached so
that they receive no gradient (and, with the optimizer applied to trainable tables only, no
optimizer state), stored in fp32, fp16 or int8 (``FROZEN_DTYPES``). One table serves several
features: the item table serves the input sequence, the targets, the sampled negatives and
the CTR candidate, which ties input and output embeddings. Tables are built on the device
given (``meta`` for sharding: nothing is allocated until ``DistributedModelParallel`` places
the shards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    JaggedTensor,
    KeyedJaggedTensor,
    PoolingType,
)
from torchrec.modules.embedding_configs import DataType

from recsys.distributed.rowwise_int8 import RowWiseInt8Collection

FROZEN_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8}
"""How a frozen table may be stored (``freeze.dtype``): TorchRec's fused CPU and GPU kernels
read fp16 tables and return fp32 lookups; int8 sequence tables (row-wise codes with an fp16
scale and bias) are ``recsys.distributed.rowwise_int8``'s, which TorchRec does not shard for
training. Trainable tables stay fp32."""


@dataclass(frozen=True)
class TableSpec:
    """One embedding table."""

    name: str
    """Transfer, freezing and plans address the table by this name."""
    rows: int
    dim: int
    features: tuple[str, ...]
    """KJT keys looked up in this table."""
    pooling: str = "none"
    """``none`` (sequence lookups, EmbeddingCollection) or ``sum`` / ``mean`` (pooled,
    EmbeddingBagCollection)."""
    init_std: float = 0.02
    """Weights start uniform with this standard deviation, whatever the table's size
    (TorchRec's default, ±√(1/rows), would make a 4M-row item table ~200× smaller than a
    100-row category table, and the summed input all category)."""

    def __post_init__(self) -> None:
        if self.rows < 1 or self.dim < 1:
            raise ValueError(f"table {self.name!r}: rows and dim must be >= 1")
        if self.pooling not in ("none", "sum", "mean"):
            raise ValueError(f"table {self.name!r}: pooling must be none, sum or mean")
        if not self.features:
            raise ValueError(f"table {self.name!r} serves no feature")


@dataclass(frozen=True)
class SparseConfig:
    """The tables of a model and which of them are frozen."""

    tables: tuple[TableSpec, ...]
    frozen: tuple[str, ...] = ()
    """Names of tables whose weights stay fixed (GPSD's sparse freezing, "SF")."""
    frozen_dtype: str = "fp32"
    """How the frozen tables are stored: one of :data:`FROZEN_DTYPES`."""

    def __post_init__(self) -> None:
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(
                f"frozen tables are stored as one of {', '.join(FROZEN_DTYPES)}, "
                f"got {self.frozen_dtype!r}"
            )
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names repeat: {names}")
        features = [f for t in self.tables for f in t.features]
        if len(set(features)) != len(features):
            raise ValueError(f"a feature is served by two tables: {features}")
        unknown = sorted(set(self.frozen) - set(names))
        if unknown:
            raise ValueError(f"frozen tables {unknown} do not exist; tables: {names}")

    def table(self, name: str) -> TableSpec:
        return next(t for t in self.tables if t.name == name)


def _init(table: TableSpec) -> dict[str, float]:
    # Uniform(-a, a) has standard deviation a / √3. TorchRec applies these bounds both to
    # unsharded tables and to the shards it allocates.
    bound = table.init_std * 3**0.5
    return {"weight_init_min": -bound, "weight_init_max": bound}


# Attribute name of each collection (the module paths that plans and checkpoints see).
COLLECTIONS = {
    (False, False): "sequence",
    (False, True): "sequence_frozen",
    (True, False): "pooled",
    (True, True): "pooled_frozen",
}


class SparseArch(nn.Module):
    """KJT → ``{feature: JaggedTensor}`` (sequence tables) and ``{feature: Tensor [B, dim]}``
    (pooled tables)."""

    def __init__(self, config: SparseConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self._features: dict[str, list[str]] = {}
        for (pooled, frozen), attribute in COLLECTIONS.items():
            specs = [
                t
                for t in config.tables
                if (t.pooling != "none") == pooled and (t.name in config.frozen) == frozen
            ]
            if not specs:
                continue
            stored = {"data_type": FROZEN_DTYPES[config.frozen_dtype]} if frozen else {}
            if frozen and config.frozen_dtype == "int8":
                if pooled:
                    raise ValueError("frozen pooled tables are stored fp32 or fp16, not int8")
                tables = [(t.name, t.rows, t.dim, t.features) for t in specs]
                setattr(self, attribute, RowWiseInt8Collection(tables, device))
                self._features[attribute] = [f for t in specs for f in t.features]
                continue
            if pooled:
                module = EmbeddingBagCollection(
                    device=device,
                    tables=[
                        EmbeddingBagConfig(
                            name=t.name,
                            num_embeddings=t.rows,
                            embedding_dim=t.dim,
                            feature_names=list(t.features),
                            pooling=PoolingType[t.pooling.upper()],
                            **_init(t),
                            **stored,
                        )
                        for t in specs
                    ],
                )
            else:
                module = EmbeddingCollection(
                    device=device,
                    tables=[
                        EmbeddingConfig(
                            name=t.name,
                            num_embeddings=t.rows,
                            embedding_dim=t.dim,
                            feature_names=list(t.features),
                            **_init(t),
                            **stored,
                        )
                        for t in specs
                    ],
                )
            if frozen:
                module.requires_grad_(False)
            setattr(self, attribute, module)
            self._features[attribute] = [f for t in specs for f in t.features]

    def forward(
        self, features: KeyedJaggedTensor
    ) -> tuple[dict[str, JaggedTensor], dict[str, torch.Tensor]]:
        sequences: dict[str, JaggedTensor] = {}
        pooled: dict[str, torch.Tensor] = {}
        keys = features.keys()
        for (is_pooled, frozen), attribute in COLLECTIONS.items():
            if attribute not in self._features:
                continue
            wanted = self._features[attribute]
            missing = [f for f in wanted if f not in keys]
            if missing:
                # Sharded collections fix their input layout at the first call: every call
                # must bring every feature (an empty one where there is nothing to look up).
                raise KeyError(f"features {missing} are missing from the batch (it has {keys})")
            subset = features.permute([keys.index(f) for f in wanted])
            out = getattr(self, attribute)(subset)
            if is_pooled:
                for name in wanted:
                    value = out[name]
                    pooled[name] = value.detach() if frozen else value
            else:
                for name in wanted:
                    jagged = out[name]
                    if frozen:  # no gradient flows into a frozen table
                        jagged = JaggedTensor(
                            values=jagged.values().detach(), lengths=jagged.lengths()
                        )
                    sequences[name] = jagged
        return sequences, pooled


def summed(sequences: dict[str, JaggedTensor], names: list[str]) -> JaggedTensor:
    """Per-position sum of aligned lookups (e.g. item + category embeddings of each event)."""
    first = sequences[names[0]]
    values = first.values()
    for name in names[1:]:
        if not torch.equal(sequences[name].lengths(), first.lengths()):
            raise ValueError(
                f"feature {name!r} is not aligned with {names[0]!r}: their lists differ in length"
            )
        values = values + sequences[name].values()
    return JaggedTensor(values=values, lengths=first.lengths())


def padded_positions(lengths: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid mask [B, length] of right-padded rows of these lengths, and the flat indices
    (into B · length) of its True positions in row-major order, which is jagged order."""
    valid = torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]
    return valid, valid.view(-1).nonzero().squeeze(1)


def padded(jagged: JaggedTensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A jagged [B, *, ...] tensor as right-padded [B, length, ...] (zeros) and its valid mask
    [B, length]; ``length`` defaults to the longest list."""
    lengths = jagged.lengths()
    if length is None:
        length = int(lengths.max()) if lengths.numel() else 0
    valid, where = padded_positions(lengths, length)
    values = jagged.values()
    out = values.new_zeros((len(lengths) * length, *values.shape[1:]))
    # One row copy per value; its gradient is one gather (a masked scatter's is a masked
    # select over the whole padded tensor).
    return out.index_copy(0, where, values).view(len(lengths), length, *values.shape[1:]), valid
