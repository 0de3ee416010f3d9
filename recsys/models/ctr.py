"""GPSD's CTR model: the behaviour sequence plus the candidate item, scored by an MLP head.

The candidate token (item + side-feature embeddings) is appended after the user's history;
a segment embedding tells history (0) from candidate (1). The tower's output at the candidate
position goes through Linear(d, 4d) → ReLU → Linear(4d, 1) to a logit, trained with binary
cross-entropy (GPSD §2.2). Table and tower names equal the generative model's, so pretrained
parameters transfer by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import JaggedTensor, KeyedJaggedTensor

from recsys.models.generative import ITEM_TABLE
from recsys.models.sparse import (
    SparseArch,
    SparseConfig,
    TableSpec,
    padded,
    padded_positions,
    summed,
)
from recsys.models.tower import Tower, TowerConfig


def ctr_tables(items: int, side_features: dict[str, int], dim: int) -> list[TableSpec]:
    """The tables every CTR-style model (this one and the baselines) looks up."""
    tables = [TableSpec(ITEM_TABLE, items, dim, ("history_item", "candidate_item"))]
    tables += [
        TableSpec(name, rows, dim, (f"history_{name}", f"candidate_{name}"))
        for name, rows in side_features.items()
    ]
    return tables


@dataclass(frozen=True)
class CTRConfig:
    tower: TowerConfig
    items: int
    side_features: dict[str, int] = field(default_factory=dict)
    frozen: tuple[str, ...] = ()
    frozen_dtype: str = "fp32"
    """How the frozen tables are stored (``recsys.models.sparse.FROZEN_DTYPES``)."""
    extra: int = 0
    """Dense features per sample fed to the head beside the tower's output (LUM's step 3:
    a user model's outputs); 0: none."""

    def sparse(self) -> SparseConfig:
        return SparseConfig(
            tuple(ctr_tables(self.items, self.side_features, self.tower.hidden)),
            self.frozen,
            self.frozen_dtype,
        )


class CTROutput(NamedTuple):
    # A NamedTuple, not a dataclass: DistributedDataParallel finds the tensors of a model's
    # output by pytree traversal, and its gradient sync relies on finding them.
    logits: torch.Tensor
    """[B] scores before the sigmoid."""
    loss: torch.Tensor | None = None
    """Mean binary cross-entropy when labels were given."""


def candidate_tokens(
    sequences: dict, sides: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """History tokens [B, T, D] with their valid mask, and candidate tokens [B, D]."""
    history, candidate = _summed_events(sequences, sides)
    return *padded(history), candidate.values()


def _summed_events(sequences: dict, sides: list[str]) -> tuple[JaggedTensor, JaggedTensor]:
    """Each history event's and each candidate's item + side-feature embeddings, summed;
    exactly one candidate per sample."""
    history = summed(sequences, ["history_item", *(f"history_{s}" for s in sides)])
    candidate = summed(sequences, ["candidate_item", *(f"candidate_{s}" for s in sides)])
    if not bool((candidate.lengths() == 1).all()):
        raise ValueError("every sample needs exactly one candidate item")
    return history, candidate


def tower_tokens(
    sequences: dict, sides: list[str], segment: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's input [B, T + 1, D]: each row's history (segment 0), its candidate right
    after its last event (segment 1), zeros after; and each row's history length [B]."""
    history, candidate = _summed_events(sequences, sides)
    lengths = history.lengths()
    b, t = len(lengths), (int(lengths.max()) if lengths.numel() else 0) + 1
    _, where = padded_positions(lengths, t)
    at = torch.arange(b, device=lengths.device) * t + lengths
    values = torch.cat([history.values() + segment[0], candidate.values() + segment[1]])
    tokens = values.new_zeros(b * t, values.shape[1])
    return tokens.index_copy(0, torch.cat([where, at]), values).view(b, t, -1), lengths


def with_extra(x: torch.Tensor, extra: torch.Tensor | None, width: int) -> torch.Tensor:
    """``x`` [B, D] with the ``width`` extra dense features of each sample appended (the
    model was built for them: ``extra`` must be given exactly then)."""
    if (extra is None) != (width == 0):
        raise ValueError(
            f"the model takes {width} extra features per sample; got "
            f"{'none' if extra is None else tuple(extra.shape)}"
        )
    if extra is None:
        return x
    if extra.shape != (x.shape[0], width):
        raise ValueError(
            f"extra features of shape {tuple(extra.shape)}, expected {(x.shape[0], width)}"
        )
    return torch.cat([x, extra.to(x.dtype)], -1)


def bce(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    return None if labels is None else F.binary_cross_entropy_with_logits(logits, labels)


class CTRModel(nn.Module):
    """CTR batches (KJT keys ``history_*`` and ``candidate_*``) → :class:`CTROutput`."""

    def __init__(
        self,
        config: CTRConfig,
        sparse_device: torch.device | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        d = config.tower.hidden
        self.sparse = SparseArch(config.sparse(), sparse_device)
        # Zero at first: a transferred tower starts from the function it was pretrained to be.
        self.segment = nn.Parameter(torch.zeros(2, d, device=device))
        self.tower = Tower(config.tower).to(device)
        self.head = nn.Sequential(
            nn.Linear(d + config.extra, 4 * d), nn.ReLU(), nn.Linear(4 * d, 1)
        ).to(device)

    def forward(
        self,
        features: KeyedJaggedTensor,
        labels: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> CTROutput:
        sequences, _ = self.sparse(features)
        tokens, lengths = tower_tokens(sequences, list(self.config.side_features), self.segment)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        hidden = self.tower(tokens, positions <= lengths[:, None], at=lengths)
        logits = self.head(with_extra(hidden, extra, self.config.extra))
        logits = logits.squeeze(-1)
        return CTROutput(logits, bce(logits, labels))
