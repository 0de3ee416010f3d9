"""The CTR model's forward on dense padded ids, in plain torch: what ``recsys export`` traces.

This module owns the served model, :class:`ServedCTR`: the same computation as
:class:`recsys.models.ctr.CTRModel` on tensors instead of a ``KeyedJaggedTensor``, with its
tables as buffers (:class:`recsys.serve.quantize.ServedTable`) instead of TorchRec modules.
Inputs, for ``T`` tables in :attr:`ServedCTR.tables` order (``item`` first, then the side
features):

- ``history`` int64 [B, T, L]: each sample's history, oldest first, right-padded with each
  table's padding id (a position is real where its item id is not the item padding id);
- ``candidate`` int64 [B, T]: the candidate item and its side features.

Output: float32 [B], the click probability (the sigmoid of the CTR model's logit).

As in training, each event is the sum of its item and side-feature embeddings plus the
history segment embedding, the candidate (plus the candidate segment embedding) goes right
after the last real event, and the tower's output there goes through the MLP head. The tower
is the training model's own :class:`recsys.models.tower.Tower`, plain torch operations that
``torch.export`` traces. It does not read checkpoints or vocabularies
(:mod:`recsys.serve.export`).
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.models.ctr import CTRModel
from recsys.models.tower import Tower
from recsys.serve.quantize import ServedTable


class RightPaddedTower(Tower):
    """The training tower for inputs whose real positions come first in every row.

    :meth:`Tower.attention_mask` checks whether every row is right-padded to choose plain
    causal attention; that check reads the data, which ``torch.export`` cannot trace. Here
    every row is right-padded by construction (history, then the candidate, then padding), so
    a causal tower takes the branch training takes on such rows: no mask, causal attention.
    """

    def attention_mask(self, valid: torch.Tensor) -> torch.Tensor | None:
        if self.config.causal:
            return None
        return super().attention_mask(valid)


class ServedCTR(nn.Module):
    """``(history [B, T, L], candidate [B, T])`` → click probability [B] (see the module
    doc)."""

    def __init__(
        self,
        tables: dict[str, ServedTable],
        padding: dict[str, int],
        segment: torch.Tensor,
        tower: Tower,
        head: nn.Module,
    ) -> None:
        super().__init__()
        self.tables = list(tables)
        self.lookups = nn.ModuleDict(tables)
        self.padding = padding
        self.register_buffer("segment", segment.detach().clone())
        self.tower = RightPaddedTower(tower.config)
        self.tower.load_state_dict(tower.state_dict())
        self.head = head

    @classmethod
    def from_model(
        cls,
        model: CTRModel,
        tables: dict[str, torch.Tensor],
        padding: dict[str, int],
        dtype: str,
    ) -> ServedCTR:
        """The served form of a trained ``model`` whose full ``tables`` (by name, ``item``
        first) are given, stored as ``dtype``."""
        served = {name: ServedTable(weight, dtype) for name, weight in tables.items()}
        return cls(served, padding, model.segment, model.tower, model.head).eval()

    def forward(self, history: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        b, _, length = history.shape
        events = sum(self.lookups[n](history[:, i]) for i, n in enumerate(self.tables))
        item = sum(self.lookups[n](candidate[:, i]) for i, n in enumerate(self.tables))
        real = history[:, 0] != self.padding[self.tables[0]]  # [B, L]
        lengths = real.sum(1)
        events = torch.where(real[..., None], events + self.segment[0], 0.0)
        tokens = torch.cat([events, events.new_zeros(b, 1, events.shape[-1])], 1)
        positions = torch.arange(length + 1, device=history.device)[None, :]
        at = positions == lengths[:, None]  # the candidate right after the last event
        tokens = torch.where(at[..., None], (item + self.segment[1])[:, None], tokens)
        hidden = self.tower(tokens, positions <= lengths[:, None], at=lengths)
        return torch.sigmoid(self.head(hidden).squeeze(-1))
