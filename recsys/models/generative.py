"""GPSD's generative pretraining model: predict the next item of behaviour sequences.

Each position's input is the sum of its item and side-feature embeddings (GPSD §2.1). The
tower's output at position t scores the item at t + 1 against K negatives drawn uniformly
from the whole item table, shared by every position of a sequence (sampled softmax without
logQ correction, as in GPSD's code), all looked up in the same item table as the inputs (tied
embeddings). Side features of the next event are predicted with a full softmax over their
vocabulary. Losses are averaged over real (not padded) targets and summed with weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys.models.sparse import SparseArch, SparseConfig, TableSpec, padded, summed
from recsys.models.tower import Tower, TowerConfig

ITEM_TABLE = "item"


@dataclass(frozen=True)
class GenerativeConfig:
    """The pretraining model."""

    tower: TowerConfig
    items: int
    """Rows of the item table."""
    side_features: dict[str, int] = field(default_factory=dict)
    """Side feature → vocabulary size (each its own table, named like the feature)."""
    negatives: int = 4096
    """K uniform negatives per sequence (GPSD: 4,096)."""
    side_weights: dict[str, float] = field(default_factory=dict)
    """Weight of each side feature's loss (default 1)."""
    scoring: str = "dot"
    """``dot`` or ``cosine`` similarity between tower output and item embeddings."""
    temperature: float = 1.0
    """Scores are divided by it (GPSD's code: cosine / 0.05)."""
    remove_accidental_hits: bool = False
    """Ignore negatives equal to the target (GPSD's code keeps them)."""
    frozen: tuple[str, ...] = ()
    item_keys: int | None = None
    """Ids that stand for items, ``[0, item_keys)``, among which negatives are drawn (the
    rows after them are reserved: ``recsys.data.vocab``); None: every row."""

    def __post_init__(self) -> None:
        if self.scoring not in ("dot", "cosine"):
            raise ValueError(f"scoring must be dot or cosine, got {self.scoring!r}")
        if self.negatives < 1 or self.temperature <= 0:
            raise ValueError("negatives must be >= 1 and temperature > 0")
        if self.item_keys is not None and not 1 <= self.item_keys <= self.items:
            raise ValueError(f"item_keys must lie in [1, items], got {self.item_keys}")

    @property
    def drawn(self) -> int:
        """Negatives are drawn uniformly from ``[0, drawn)``."""
        return self.items if self.item_keys is None else self.item_keys

    def sparse(self) -> SparseConfig:
        d = self.tower.hidden
        tables = [TableSpec(ITEM_TABLE, self.items, d, ("item", "negative_item"))]
        tables += [TableSpec(name, rows, d, (name,)) for name, rows in self.side_features.items()]
        return SparseConfig(tuple(tables), self.frozen)


class GenerativeOutput(NamedTuple):
    # A NamedTuple, not a dataclass: DistributedDataParallel finds the tensors of a model's
    # output by pytree traversal, and its gradient sync relies on finding them.
    loss: torch.Tensor
    item_loss: torch.Tensor
    side_losses: dict[str, torch.Tensor]
    hits: torch.Tensor
    """Targets whose score beats every negative."""
    targets: torch.Tensor
    """Number of real targets."""


def sampled_softmax_loss(
    hidden: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    valid: torch.Tensor,
    *,
    scoring: str = "dot",
    temperature: float = 1.0,
    accidental: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the positive against shared negatives, and the hit count.

    hidden, positive: [B, T, D]; negatives: [B, K, D]; valid: [B, T]; accidental: [B, T, K]
    True where a negative equals the target (masked out).
    """
    if scoring == "cosine":
        hidden, positive = F.normalize(hidden, dim=-1), F.normalize(positive, dim=-1)
        negatives = F.normalize(negatives, dim=-1)
    if not bool(valid.any()):
        # No target here (e.g. only one-event sequences): a zero that keeps the graph, so
        # that data-parallel ranks still exchange gradients.
        return hidden.sum() * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
    pos = (hidden * positive).sum(-1) / temperature  # [B, T]
    # [B, T, K] is the one large tensor; the loss never copies it (no concatenation with the
    # positive, no masked selection): -log softmax = logaddexp(pos, logsumexp(neg)) - pos.
    neg = torch.einsum("btd,bkd->btk", hidden, negatives) / temperature
    if accidental is not None:
        neg = neg.masked_fill(accidental, float("-inf"))
    best_negative, _ = neg.max(-1)
    per_target = torch.logaddexp(pos, torch.logsumexp(neg, -1)) - pos
    loss = per_target[valid].mean()
    hits = (pos > best_negative)[valid].sum()
    return loss, hits


class GenerativeModel(nn.Module):
    """Seq batches (KJT keys ``item`` and each side feature) → :class:`GenerativeOutput`."""

    def __init__(
        self,
        config: GenerativeConfig,
        sparse_device: torch.device | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.sparse = SparseArch(config.sparse(), sparse_device)
        self.tower = Tower(config.tower).to(device)
        self.side_heads = nn.ModuleDict(
            {
                name: nn.Linear(config.tower.hidden, rows, device=device)
                for name, rows in config.side_features.items()
            }
        )

    def forward(self, features: KeyedJaggedTensor) -> GenerativeOutput:
        config = self.config
        batch = features.stride()
        given = features.values()  # int32 or int64 ids: negatives of the same type keep it
        negatives = torch.randint(
            0, config.drawn, (batch * config.negatives,), device=given.device, dtype=given.dtype
        )
        # Each distinct negative is looked up once (all in the first row): B × K draws from a
        # table of fewer rows repeat most ids, and every lookup crosses the sharded tables'
        # all-to-all twice (forward, backward). Gathering by the inverse index gives the same
        # vectors, and its backward sums each id's gradients as the table's would.
        distinct, inverse = torch.unique(negatives, return_inverse=True)
        lengths = torch.zeros(batch, dtype=torch.long, device=negatives.device)
        lengths[:1] = len(distinct)
        sampled = KeyedJaggedTensor.from_lengths_sync(
            keys=["negative_item"], values=distinct, lengths=lengths
        )
        sequences, _ = self.sparse(KeyedJaggedTensor.concat([features, sampled]))
        sides = list(config.side_features)
        tokens, valid = padded(summed(sequences, ["item", *sides]))
        hidden = self.tower(tokens, valid)[:, :-1]
        items, _ = padded(sequences["item"], tokens.shape[1])
        ids, _ = padded(features["item"], tokens.shape[1])
        target_valid = valid[:, 1:]
        negative_emb = sequences["negative_item"].values()[inverse]
        negative_emb = negative_emb.view(batch, config.negatives, -1)
        accidental = None
        if config.remove_accidental_hits:
            accidental = ids[:, 1:, None] == negatives.view(batch, 1, config.negatives)
        item_loss, hits = sampled_softmax_loss(
            hidden,
            items[:, 1:],
            negative_emb,
            target_valid,
            scoring=config.scoring,
            temperature=config.temperature,
            accidental=accidental,
        )
        side_losses = {}
        for name in sides:
            side_ids, _ = padded(features[name], tokens.shape[1])
            logits = self.side_heads[name](hidden[target_valid])
            side_losses[name] = (
                F.cross_entropy(logits, side_ids[:, 1:][target_valid].long())
                if len(logits)
                else logits.sum() * 0.0
            )
        loss = item_loss + sum(config.side_weights.get(n, 1.0) * v for n, v in side_losses.items())
        return GenerativeOutput(loss, item_loss, side_losses, hits, target_valid.sum())

    def user_vectors(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """[B, hidden]: the tower's output at each row's last event, the vector that scores
        the next item (``forward`` scores the item at t + 1 with the output at t). A row without
        events gets an output that means nothing (callers skip such rows). The sparse lookup
        is collective on a sharded model."""
        batch = features.stride()
        given = features.values()
        nothing = KeyedJaggedTensor.from_lengths_sync(
            keys=["negative_item"],
            values=given[:0],
            lengths=torch.zeros(batch, dtype=torch.long, device=given.device),
        )
        sequences, _ = self.sparse(KeyedJaggedTensor.concat([features, nothing]))
        events = summed(sequences, ["item", *self.config.side_features])
        # One position at least: a batch of empty rows gives outputs, which the caller drops.
        longest = int(events.lengths().max()) if events.lengths().numel() else 0
        tokens, valid = padded(events, max(1, longest))
        last = features["item"].lengths().long() - 1
        return self.tower(tokens, valid, at=last.clamp(min=0))
