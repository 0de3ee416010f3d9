"""This rank's shards of sharded embedding tables, addressed by table name.

A sharded table's state-dict entry is a ``ShardedTensor`` whose local shards alias the fused
kernel's weights: reading them reads the model, writing them writes it. This module owns
listing them with where each sits in the full table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from recsys.distributed.rowwise_int8 import int8_tables

_TABLE = re.compile(r"(?:^|\.)sparse\.\w+\.embedding(?:_bag)?s\.(\w+)\.weight$")
"""A table's state-dict key (the same rule as ``recsys.checkpoint.weights``)."""


@dataclass(frozen=True)
class LocalShard:
    table: str
    tensor: torch.Tensor
    """Aliases the model's weights."""
    rows: slice
    cols: slice
    """Where the shard sits in the full table."""


def local_shards(model: nn.Module) -> list[LocalShard]:
    """Every local shard of every sharded table of ``model`` (after DistributedModelParallel);
    an int8 table's block is two, its codes (columns 0..dim) and its scale and bias (columns
    dim, dim + 1)."""
    shards = []
    for table, block in int8_tables(model).items():
        rows = slice(block.start, block.start + len(block.codes))
        shards.append(LocalShard(table, block.codes, rows, slice(0, block.dim)))
        shards.append(LocalShard(table, block.scale_bias, rows, slice(block.dim, block.dim + 2)))
    for key, value in model.state_dict().items():
        if not hasattr(value, "local_shards"):
            continue  # dense parameters and buffers
        table = key.split(".")[-2]  # "...embeddings.<table>.weight"
        for shard in value.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shards.append(LocalShard(table, shard.tensor, slice(r0, r0 + nr), slice(c0, c0 + nc)))
    return shards


@torch.no_grad()
def load_full_tables(model: nn.Module, tables: dict[str, torch.Tensor]) -> None:
    """Give the sharded tables of ``model`` the weights of full (unsharded) tables, by name."""
    for shard in local_shards(model):
        if shard.table in tables:
            shard.tensor.copy_(tables[shard.table][shard.rows, shard.cols])


@torch.no_grad()
def zero_rows(model: nn.Module, rows: dict[str, list[int]]) -> None:
    """Zero the given rows of tables by name: in this rank's shards of a sharded table (the
    rows a shard holds), in the whole of a table every rank keeps."""
    for shard in local_shards(model):
        for row in rows.get(shard.table, ()):
            if shard.rows.start <= row < shard.rows.stop:
                shard.tensor[row - shard.rows.start].zero_()
    for key, value in model.state_dict().items():
        found = _TABLE.search(key)
        if found and found[1] in rows and not hasattr(value, "local_shards"):
            value[rows[found[1]]] = 0.0
