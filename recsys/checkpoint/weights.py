"""Model weights under stable names, saved and loaded through DCP: what one stage hands on.

Names do not depend on how a model is wrapped or sharded, nor on which collection holds a
table (frozen tables live in their own collection):

- ``table/<name>``: each embedding table (a ``ShardedTensor`` on a sharded model);
- ``dense/<path>``: every other state-dict entry (``tower.blocks.0.ffn.w1.weight``, ...).

Because the files are DCP checkpoints, weights saved by N ranks under one plan load into M
ranks under another. Like a checkpoint, ``weights/`` holds a ``manifest.json`` of its files'
checksums, written after every rank has saved and verified before every load (the ranks
split the reading), so a damaged file is named instead of loaded.

This module also owns a table's digest: a 64-bit sum over every element of its bits times an
odd multiplier of the element's position in the full table, so each rank adds up its own
shards and the digest is the same for any sharding plan and world size, and any change to any
element changes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from recsys.checkpoint.manager import CheckpointError, agree, check, read, record, write
from recsys.distributed.env import collective_device
from recsys.distributed.rowwise_int8 import int8_tables
from recsys.distributed.shards import local_shards

TABLE_KEY = re.compile(r"(?:^|\.)sparse\.\w+\.embedding(?:_bag)?s\.(\w+)\.weight$")
INT8_KEY = re.compile(r"(?:^|\.)sparse\.\w+\.tables\.(\w+)\.(codes|scale_bias)$")
"""An int8 frozen table's codes and its scale and bias (``recsys.distributed.rowwise_int8``)."""


def named_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{stable name: tensor}`` aliasing the model's own weights (an int8 table's codes are
    ``table/<name>``, its scale and bias ``table/<name>/scale_bias``)."""
    out = {}
    for key, value in model.state_dict().items():
        if match := TABLE_KEY.search(key):
            out[f"table/{match[1]}"] = value
        elif match := INT8_KEY.search(key):
            out[f"table/{match[1]}" + ("" if match[2] == "codes" else "/scale_bias")] = value
        else:
            out[f"dense/{key}"] = value
    return out


def _metadata(path: str | Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    # Unpickling damaged bytes raises nearly anything (UnpicklingError, EOFError, KeyError).
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable weights checkpoint: {err}") from err


def _saved(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The names, full shapes and dtypes of the weights saved at ``path`` (one read)."""
    return {
        name: (tuple(entry.size), entry.properties.dtype)
        for name, entry in _metadata(path).state_dict_metadata.items()
        if hasattr(entry, "size")
    }


def saved_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The names and full shapes of the weights saved at ``path``."""
    return {name: shape for name, (shape, _) in _saved(path).items()}


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Every weight of ``model`` to ``path`` with their manifest (every rank calls it); a
    failure (a full disk) is the same CheckpointError on every rank."""
    path = Path(path)
    weights = named_weights(model)
    bad = agree(_nonfinite(weights))  # collective: every rank refuses, or none
    if bad:
        raise CheckpointError(
            f"{path}: not saved: {bad} holds NaN or infinite values (training diverged; "
            "lower optim.lr or optim.sparse_lr, or keep run.nonfinite=stop to stop at the step)"
        )
    write(weights, path, f"{path}: cannot save the weights")
    error = record(path)  # collective: after every rank has written its files
    if error:
        raise CheckpointError(error)


ROWS_AT_ONCE = 1 << 16
"""Rows of a table checked at a time (its bool mask stays small, whatever the table)."""


@torch.no_grad()
def _nonfinite(weights: dict[str, torch.Tensor]) -> str | None:
    """The first weight (of this rank's shards) holding a NaN or an infinity, or None."""
    for name, value in sorted(weights.items()):
        if hasattr(value, "to_local"):  # a DTensor: this rank's block
            value = value.to_local()
        parts = (
            [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]
        )
        for part in parts:
            if not part.is_floating_point():
                continue
            for rows in part.split(ROWS_AT_ONCE) if part.dim() else [part]:
                if not bool(torch.isfinite(rows).all()):
                    return name
    return None


def load_weights(model: nn.Module, path: str | Path, names: Iterable[str]) -> list[str]:
    """Load the weights ``names`` saved at ``path`` into ``model`` (resharding as needed).

    Every name must exist on both sides with the same shape; otherwise a CheckpointError
    lists each one that is missing or differs. A damaged file (missing, truncated, its
    checksum changed) or one DCP cannot read is a CheckpointError naming it. Every rank calls
    it. Returns the names loaded."""
    names = sorted(names)
    mine = named_weights(model)
    check(path)  # collective: the ranks split the checksums and agree on the verdict
    saved = _saved(path)
    problems = []
    for name in names:
        if name not in mine:
            problems.append(f"{name}: not in the model being loaded")
        elif name not in saved:
            problems.append(f"{name}: not saved in {path}")
        elif tuple(mine[name].shape) != saved[name][0]:
            problems.append(
                f"{name}: saved with shape {list(saved[name][0])}, the model has "
                f"{list(mine[name].shape)}"
            )
        elif saved[name][1].is_floating_point != mine[name].dtype.is_floating_point:
            # Values would be cast, not quantized: an int8 table takes fp32 rows through freeze.
            problems.append(
                f"{name}: saved as {saved[name][1]}, the model holds {mine[name].dtype} (an "
                "int8 frozen table is quantized from fp32 by the freeze stage only)"
            )
    if problems:
        raise CheckpointError(
            f"{path}: cannot load {len(problems)} weight(s) into this model; was it built with "
            f"another model section (size, arch, max_len)? Use the same: {'; '.join(problems)}"
        )
    if names:
        read({n: mine[n] for n in names}, path)
    return names


def load_quantized(model: nn.Module, path: str | Path) -> list[str]:
    """Quantize the fp32 tables saved at ``path`` into ``model``'s int8 frozen tables, each
    rank reading only its block of rows (every rank calls it); the names loaded. The other
    weights load with :func:`load_weights` (without the int8 tables' names)."""
    tables = {f"table/{name}": table for name, table in int8_tables(model).items()}
    if not tables:
        return []
    saved = _saved(path)
    problems = []
    for name, t in tables.items():
        shape, dtype = saved.get(name, ((), None))
        if shape != (t.rows, t.dim) or dtype is None or not dtype.is_floating_point:
            problems.append(f"{name}: saved as {dtype} {list(shape)}, expected float "
                            f"[{t.rows}, {t.dim}]")  # fmt: skip
    if problems:
        raise CheckpointError(f"{path}: cannot quantize into int8 tables: {'; '.join(problems)}")
    targets = {name: t.float_target() for name, t in tables.items()}
    read({name: target for name, (target, _) in targets.items()}, path)
    for name, (_, block) in targets.items():
        tables[name].set_rows(block)
    return sorted(tables)


MASK = (1 << 64) - 1


@torch.no_grad()
def _partial(tensor: torch.Tensor, rows: slice, cols: slice, width: int) -> int:
    # The elements' own bits (fp32, a frozen table's fp16, an int8 table's codes).
    integer = {4: torch.int32, 2: torch.int16, 1: torch.int8}[tensor.element_size()]
    bits = tensor.detach().contiguous().view(integer).to(torch.int64)
    r = torch.arange(rows.start, rows.stop, dtype=torch.int64)[:, None]
    c = torch.arange(cols.start, cols.stop, dtype=torch.int64)[None, :]
    position = r * width + c
    # 2·position + 1 is odd, so invertible modulo 2^64: changing one element always changes
    # the sum. int64 arithmetic wraps around, which is exactly arithmetic modulo 2^64.
    return int((bits * (position * 2 + 1)).sum()) & MASK


def table_digests(model: nn.Module, tables: Iterable[str]) -> dict[str, str]:
    """A digest per named table, the same for any plan or world size (collective)."""
    wanted = set(tables)
    widths = {
        match[1]: int(value.metadata().size[1]) if hasattr(value, "metadata") else value.shape[1]
        for key, value in model.state_dict().items()
        if (match := TABLE_KEY.search(key)) and match[1] in wanted
    }
    # int8 tables: codes, then scale and bias, in each row
    widths |= {n: t.dim + 2 for n, t in int8_tables(model).items() if n in wanted}
    missing = sorted(wanted - set(widths))
    if missing:
        raise ValueError(f"tables {missing} are not in the model")
    names = sorted(wanted)
    sums = [0] * len(names)
    for shard in local_shards(model):
        if shard.table in wanted:
            i = names.index(shard.table)
            part = _partial(shard.tensor, shard.rows, shard.cols, widths[shard.table])
            sums[i] = (sums[i] + part) & MASK
    # Sum over ranks modulo 2^64, in two 32-bit halves (exact in int64 under gloo and nccl).
    parts = torch.tensor(
        [[s & 0xFFFFFFFF, s >> 32] for s in sums], dtype=torch.int64, device=collective_device()
    )
    if dist.is_initialized() and parts.numel():
        dist.all_reduce(parts)
    out = {}
    for name, (low, high) in zip(names, parts.tolist(), strict=True):
        out[name] = f"{((high << 32) + low) & MASK:016x}"
    return out
