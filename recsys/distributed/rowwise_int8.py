"""Frozen tables stored int8 row-wise, their rows split over the ranks, looked up by all-to-all.

TorchRec 1.9.2 shards no int8 table for training (``scripts/frozen_int8_probe.py``), so this
module owns one for frozen tables, which are only read: each rank keeps a contiguous block
of a table's rows (``ceil(rows / world)`` rows, the split DTensor's ``Shard(0)`` makes) as
uint8 codes with an fp16 scale and bias per row (FBGEMM's row-wise layout: a row is
``codes × scale + bias``), and a lookup sends each id to the rank that holds its row and the
dequantized row back (two all-to-alls, as TorchRec's row-wise sharding does). Its state dict
holds DTensors over the job's ranks, so that DCP saves each rank's block and loads a
checkpoint into any world size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

LEVELS = 255
"""The codes run from 0 to this."""


def block_rows(rows: int, world: int) -> int:
    """Rows each rank holds (the last ones may hold fewer, or none)."""
    return math.ceil(rows / world)


def local_rows(rows: int, rank: int, world: int) -> range:
    """The rows of the full table rank ``rank`` of ``world`` holds."""
    block = block_rows(rows, world)
    return range(min(rows, rank * block), min(rows, (rank + 1) * block))


def quantize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows [n, d] → uint8 codes [n, d] and fp16 (scale, bias) [n, 2]: each row's range
    cut into 255 steps, every value within half a step of its row (a constant row: scale 0,
    every code 0). The bias is rounded down to fp16 and the scale up, so that no value falls
    outside the codes' range; values beyond fp16's range are refused."""
    low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    bias = low.half()
    bias = torch.where(bias.float() > low, torch.nextafter(bias, bias.new_tensor(-math.inf)), bias)
    step = (high - bias.float()) / LEVELS
    scale = step.half()
    scale = torch.where(
        scale.float() < step, torch.nextafter(scale, scale.new_tensor(math.inf)), scale
    )
    if not (torch.isfinite(bias).all() and torch.isfinite(scale).all()):
        raise ValueError(
            "an int8 row's scale or bias is not a finite fp16 number: the table holds values "
            "beyond fp16's range (±65,504) or not finite; store it fp32 or fp16 instead"
        )
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale.float()))
    codes = ((rows - bias.float()) / safe).round().clamp(0, LEVELS).to(torch.uint8)
    return codes, torch.cat([scale, bias], 1)


def dequantize(codes: torch.Tensor, scale_bias: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, d] and fp16 (scale, bias) [n, 2] → fp32 rows [n, d]."""
    scale_bias = scale_bias.float()
    return codes.float() * scale_bias[:, :1] + scale_bias[:, 1:]


class RowWiseInt8Table(nn.Module):
    """One frozen table of ``rows`` × ``dim``: this rank's block of its rows, int8, and the
    lookup of any of its ids (every rank of the job calls ``forward`` together)."""

    def __init__(
        self,
        rows: int,
        dim: int,
        rank: int | None = None,
        world: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        joined = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if joined else 0)
        self.world = world if world is not None else (dist.get_world_size() if joined else 1)
        self.rows, self.dim = rows, dim
        self.block = block_rows(rows, self.world)
        self.start = local_rows(rows, self.rank, self.world).start
        held = len(local_rows(rows, self.rank, self.world))
        # Plain attributes, not buffers: DDP, which wraps a model's dense part, would sync
        # buffers from rank 0, and every rank's block differs (``_apply`` moves them).
        self.codes = torch.zeros(held, dim, dtype=torch.uint8, device=device)
        self.scale_bias = torch.zeros(held, 2, dtype=torch.float16, device=device)
        self.register_state_dict_post_hook(_as_dtensors)
        self.register_load_state_dict_pre_hook(_from_dtensors)

    def _apply(self, fn, recurse=True):  # to(), to_empty(), cuda(): the blocks too
        # Moved, never cast: a model's .float() or .to(bfloat16) keeps the stored dtypes.
        self.codes = fn(self.codes).to(torch.uint8)
        self.scale_bias = fn(self.scale_bias).to(torch.float16)
        return super()._apply(fn, recurse)

    def mesh(self):
        """The job's ranks as a DeviceMesh (made once: making one may be a collective)."""
        if getattr(self, "_mesh", None) is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.codes.device.type, (self.world,))
        return self._mesh

    @torch.no_grad()
    def set_rows(self, full_or_block: torch.Tensor) -> None:
        """Quantize fp32 rows into this rank's block: the full table [rows, dim], or this
        rank's block of it."""
        held = len(self.codes)
        block = full_or_block
        if len(full_or_block) == self.rows and held != self.rows:
            block = full_or_block[self.start : self.start + held]
        if tuple(block.shape) != (held, self.dim):
            raise ValueError(
                f"rows of shape {list(full_or_block.shape)}: expected the table "
                f"[{self.rows}, {self.dim}] or this rank's block [{held}, {self.dim}]"
            )
        codes, scale_bias = quantize(block.float())
        self.codes.copy_(codes)
        self.scale_bias.copy_(scale_bias)

    def float_target(self) -> tuple[torch.Tensor, torch.Tensor]:
        """An fp32 tensor DCP can read the whole fp32 table into, holding only this rank's
        block (a DTensor of the table's shape over the ranks), and that block."""
        block = torch.empty(len(self.codes), self.dim, device=self.codes.device)
        if self.world == 1:
            return block, block
        from torch.distributed.tensor import DTensor, Shard

        shape = torch.Size([self.rows, self.dim])
        target = DTensor.from_local(
            block, self.mesh(), [Shard(0)], run_check=False, shape=shape, stride=(self.dim, 1)
        )
        return target, block

    def _bad_ids(self, ids: torch.Tensor) -> str:
        wrong = ids[(ids < 0) | (ids >= self.rows)]
        return (
            f"{len(wrong):,} ids outside the int8 table's {self.rows:,} rows "
            f"(e.g. {wrong[:3].tolist()})"
        )

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows [len(ids), dim] of the table's ids (any rank's rows)."""
        ids = ids.long()
        bad = bool(((ids < 0) | (ids >= self.rows)).any()) if len(ids) else False
        if self.world == 1:
            if bad:
                raise ValueError(self._bad_ids(ids))
            return dequantize(self.codes[ids], self.scale_bias[ids])
        owner = torch.div(ids, self.block, rounding_mode="floor").clamp(0, self.world - 1)
        order = torch.argsort(owner, stable=True)
        # Each rank's counts for every rank, and whether it was asked for ids the table does
        # not have: every rank learns it in the same exchange and stops, none waits.
        counts = torch.bincount(owner, minlength=self.world)
        sent = torch.stack([counts, torch.full_like(counts, int(bad))], 1)  # [world, 2]
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent)
        if bool(received[:, 1].any()):
            raise ValueError(
                self._bad_ids(ids)
                if bad
                else f"another rank looked up ids the int8 table of {self.rows:,} rows does "
                "not have (its error names them)"
            )
        send, receive = sent[:, 0].tolist(), received[:, 0].tolist()
        asked = ids.new_empty(sum(receive))
        dist.all_to_all_single(asked, ids[order], receive, send)
        local = asked - self.start
        rows = dequantize(self.codes[local], self.scale_bias[local])
        back = rows.new_empty(len(ids), self.dim)
        dist.all_to_all_single(back, rows, send, receive)
        out = torch.empty_like(back)
        out[order] = back
        return out


def _as_dtensors(module: RowWiseInt8Table, state_dict: dict, prefix: str, local_metadata) -> None:
    """The blocks in the state dict: DTensors of the full tables over the job's ranks (a
    world of one: the tensors themselves)."""
    for name, width in (("codes", module.dim), ("scale_bias", 2)):
        local = getattr(module, name)
        if module.world > 1:
            from torch.distributed.tensor import DTensor, Shard

            local = DTensor.from_local(
                local,
                module.mesh(),
                [Shard(0)],
                run_check=False,
                shape=torch.Size([module.rows, width]),
                stride=(width, 1),
            )
        state_dict[prefix + name] = local


def _from_dtensors(
    module: RowWiseInt8Table,
    state_dict,
    prefix,
    local_metadata,
    strict,
    missing,
    unexpected,
    errors,
) -> None:
    """Take the blocks out of a state dict being loaded (DCP loads into them in place; a
    plain state dict of full tables is cut to this rank's block)."""
    for name in ("codes", "scale_bias"):
        key = prefix + name
        if key not in state_dict:
            if strict:
                missing.append(key)
            continue
        value = state_dict.pop(key)
        if hasattr(value, "to_local"):
            value = value.to_local()
        mine = getattr(module, name)
        if value.shape[0] == module.rows and len(mine) != module.rows:
            value = value[module.start : module.start + len(mine)]
        if value.dtype != mine.dtype or value.shape != mine.shape:  # never cast, never broadcast
            raise ValueError(
                f"{key}: {value.dtype} {list(value.shape)} cannot load into the int8 table's "
                f"{mine.dtype} {list(mine.shape)} (freeze quantizes fp32 tables)"
            )
        if value.data_ptr() != mine.data_ptr():
            mine.copy_(value)


def int8_tables(model: nn.Module) -> dict[str, RowWiseInt8Table]:
    """The int8 frozen tables of ``model``, by table name."""
    return {
        name: table
        for module in model.modules()
        if isinstance(module, RowWiseInt8Collection)
        for name, table in module.tables.items()
    }


class RowWiseInt8Collection(nn.Module):
    """Frozen sequence tables stored int8, by name: a KJT of their features → ``{feature:
    JaggedTensor}``, as a TorchRec ``EmbeddingCollection`` answers (every rank calls it)."""

    def __init__(self, tables: list[tuple[str, int, int, tuple[str, ...]]], device=None) -> None:
        """``tables``: (name, rows, dim, features) each. Inside a job a table holds only its
        rank's block, so it is allocated at once even when the model is built on ``meta``;
        outside one (planning) it stays where ``device`` says."""
        super().__init__()
        joined = dist.is_available() and dist.is_initialized()
        if device is not None and torch.device(device).type == "meta" and joined:
            device = None
        self.tables = nn.ModuleDict(
            {name: RowWiseInt8Table(rows, dim, device=device) for name, rows, dim, _ in tables}
        )
        self.features = {name: list(features) for name, _, _, features in tables}

    def forward(self, features) -> dict:
        from torchrec import JaggedTensor

        out = {}
        for name, table in self.tables.items():
            values = [features[f].values() for f in self.features[name]]
            rows = table(torch.cat(values)).split([len(v) for v in values])
            for feature, part in zip(self.features[name], rows, strict=True):
                out[feature] = JaggedTensor(values=part, lengths=features[feature].lengths())
        return out
