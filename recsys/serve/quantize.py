"""An embedding table as an exported model stores it: fp32, fp16, or int8 row by row.

This module owns the storage types of a served table and their lookups. ``int8`` keeps each
row as 8-bit codes with its own scale and offset (fp32), so that a row's error is bounded by
its own range rather than the table's: ``weight = q.float() * scale + offset``, at most
``(max - min) / 510`` from the trained value. FBGEMM's inference tables keep a scale and bias
per int8 row too (``rounded_row_size_in_bytes`` in fbgemm_gpu's
``split_table_batched_embeddings_ops_inference.py`` adds their bytes to every row). A lookup
gathers the stored rows first and dequantizes only those, inside the graph: the artifact
holds no fp32 copy of a table. It does not choose which rows are reserved or zeroed
(:mod:`recsys.serve.export` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = ("fp32", "fp16", "int8")
"""Storage types of ``recsys export --dtype``."""

LEVELS = 255
"""int8 codes span -128..127: 255 steps between a row's minimum and maximum."""


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` [rows, dim] as int8 codes [rows, dim], scales and offsets [rows, 1] (fp32)
    with ``codes.float() * scale + offset`` the nearest of 256 levels between each row's
    minimum and maximum. A constant row (all zeros: a reserved row) comes back exactly."""
    weight = weight.detach().float()
    low = weight.amin(dim=1, keepdim=True)
    high = weight.amax(dim=1, keepdim=True)
    scale = (high - low) / LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant row: codes -128
    codes = torch.round((weight - low) / scale).clamp(0, LEVELS) - 128
    return codes.to(torch.int8), scale, low + 128 * scale


class ServedTable(nn.Module):
    """ids (any shape) → fp32 embeddings (that shape + [dim]), from a table stored as
    ``dtype`` in buffers (an exported program's constants)."""

    def __init__(self, weight: torch.Tensor, dtype: str) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"table type {dtype!r}: must be one of {', '.join(DTYPES)}")
        self.dtype = dtype
        weight = weight.detach().float().contiguous()
        if dtype == "int8":
            codes, scale, offset = quantize_rows(weight)
            self.register_buffer("weight", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("offset", offset)
        else:
            stored = weight.half() if dtype == "fp16" else weight
            self.register_buffer("weight", stored.clone())

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def nbytes(self) -> int:
        """Bytes the stored table takes (codes, scales and offsets)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantized(self) -> torch.Tensor:
        """The whole table in fp32, as lookups see it."""
        return self(torch.arange(self.rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).float()
        if self.dtype != "int8":
            return rows
        return rows * F.embedding(ids, self.scale) + F.embedding(ids, self.offset)
