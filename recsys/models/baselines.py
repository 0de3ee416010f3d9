"""DeepFM and DIN on the same sparse tables as the CTR model, so that the same transfer and
freezing apply to them (GPSD Table 6 applies ST&SF to both).

Both read the candidate's embeddings and the user's history; DeepFM mean-pools the history
into fields, DIN weighs each past event by its relevance to the candidate (Zhou et al.,
KDD'18). Differences from the original papers, kept for simplicity and stated here: DeepFM's
first-order term is a linear layer over the field vectors (no separate 1-wide tables); DIN
sums each event's item and side embeddings instead of concatenating them and uses ReLU
instead of Dice. Transferring pretrained tables needs ``dim`` equal to the pretrained
model's width (transfer checks shapes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys.models.ctr import CTROutput, bce, candidate_tokens, ctr_tables, with_extra
from recsys.models.sparse import SparseArch, SparseConfig


@dataclass(frozen=True)
class BaselineConfig:
    items: int
    side_features: dict[str, int] = field(default_factory=dict)
    dim: int = 64
    hidden: tuple[int, ...] = (256, 128)
    """Sizes of the MLP layers."""
    frozen: tuple[str, ...] = ()
    frozen_dtype: str = "fp32"
    """How the frozen tables are stored (``recsys.models.sparse.FROZEN_DTYPES``)."""
    extra: int = 0
    """Dense features per sample fed to the MLP beside the fields (LUM's step 3); 0: none."""

    def sparse(self) -> SparseConfig:
        return SparseConfig(
            tuple(ctr_tables(self.items, self.side_features, self.dim)),
            self.frozen,
            self.frozen_dtype,
        )


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DeepFM(nn.Module):
    """Fields: the candidate token and the mean of the history tokens, per feature; logit =
    FM second-order interactions + MLP over the concatenated fields."""

    def __init__(self, config: BaselineConfig, sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.sparse = SparseArch(config.sparse(), sparse_device)
        fields = 2 * (1 + len(config.side_features))
        self.linear = nn.Linear(fields * config.dim, 1)  # first order, over the field vectors
        self.deep = mlp([fields * config.dim + config.extra, *config.hidden, 1])

    def forward(
        self,
        features: KeyedJaggedTensor,
        labels: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> CTROutput:
        sequences, _ = self.sparse(features)
        fields = []
        for name in ["item", *self.config.side_features]:
            history, valid, candidate = candidate_tokens(
                {
                    "history_item": sequences[f"history_{name}"],
                    "candidate_item": sequences[f"candidate_{name}"],
                },
                [],
            )
            count = valid.sum(1, keepdim=True).clamp(min=1)
            fields += [candidate, history.sum(1) / count]
        stacked = torch.stack(fields, dim=1)  # [B, F, D]
        fm = 0.5 * (stacked.sum(1).square() - stacked.square().sum(1)).sum(-1)
        flat = stacked.flatten(1)
        deep = self.deep(with_extra(flat, extra, self.config.extra))
        logits = self.linear(flat).squeeze(-1) + fm + deep.squeeze(-1)
        return CTROutput(logits, bce(logits, labels))


class DIN(nn.Module):
    """Each past event weighted by an MLP of [event, candidate, event − candidate,
    event ⊙ candidate]; the weighted sum and the candidate go through an MLP."""

    def __init__(self, config: BaselineConfig, sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.sparse = SparseArch(config.sparse(), sparse_device)
        d = config.dim
        self.attention = mlp([4 * d, 36, 1])
        self.deep = mlp([2 * d + config.extra, *config.hidden, 1])

    def forward(
        self,
        features: KeyedJaggedTensor,
        labels: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> CTROutput:
        sequences, _ = self.sparse(features)
        history, valid, candidate = candidate_tokens(sequences, list(self.config.side_features))
        c = candidate[:, None, :].expand_as(history)
        weights = self.attention(torch.cat([history, c, history - c, history * c], -1))
        weights = weights.squeeze(-1).masked_fill(~valid, 0.0)
        interest = (weights[..., None] * history).sum(1)
        joined = with_extra(torch.cat([interest, candidate], -1), extra, self.config.extra)
        logits = self.deep(joined).squeeze(-1)
        return CTROutput(logits, bce(logits, labels))
