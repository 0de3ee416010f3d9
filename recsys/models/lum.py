"""LUM's user model: next-condition-item prediction over condition/item token pairs.

LUM ("Unlocking Scaling Law in Industrial Recommendation Systems with a Three-step Paradigm
based Large User Model", §4.1–4.2) turns each event into two tokens, a *condition* token
(the context the item was met in: scenario, behaviour type, rating level, category...) and
the *item* token, so a behaviour sequence reads ``c1, i1, c2, i2, ...``. This module owns:

- the token encoder: per token type, the embeddings of its features (TorchRec tables)
  concatenated and projected linearly to the model width (§4.1.2);
- next-condition-item prediction: the tower's output at each condition token predicts the
  item that follows, with InfoNCE over in-batch negatives (every other target of the batch,
  repeats of the same item masked) and optionally K shared uniform negatives, at a
  temperature (§4.1.3). Items are scored by their embedding in the item table (tied with the
  input; the paper scores the item token's encoder embedding — the table embedding lets
  sampled negatives go without side features);
- packing: several users' token sequences in one row of the tower, with block-diagonal
  causal attention and positions restarting per user, so users never attend to each other;
- the group query (§4.2): a user's history and N query conditions in one pass, each query
  attending to the history and itself only, at the position right after the history — the
  same outputs as N separate queries with the prefix computed once.

KJT keys: ``item``, one per item side feature (``category``), one per condition feature;
every list aligned with ``item``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from recsys.models.sparse import SparseArch, SparseConfig, TableSpec
from recsys.models.tower import Tower, TowerConfig

ITEM_TABLE = "item"


@dataclass(frozen=True)
class LUMConfig:
    tower: TowerConfig
    items: int
    side_features: dict[str, int] = field(default_factory=dict)
    """Features of the item token besides its id → vocabulary size."""
    conditions: dict[str, int] = field(default_factory=lambda: {"condition": 2})
    """Features of the condition token → vocabulary size (at least one)."""
    negatives: int = 0
    """Shared uniform negatives per batch besides the in-batch ones (0: in-batch only)."""
    temperature: float = 0.05
    """Cosine similarities are divided by it."""
    frozen: tuple[str, ...] = ()
    pack: int = 0
    """Tokens per packed row when training (0: one user per row)."""
    item_keys: int | None = None
    """Ids that stand for items, ``[0, item_keys)``, among which negatives are drawn (the
    rows after them are reserved: ``recsys.data.vocab``); None: every row."""

    def __post_init__(self) -> None:
        if not self.conditions:
            raise ValueError("LUM needs at least one condition feature")
        overlap = set(self.conditions) & ({ITEM_TABLE} | set(self.side_features))
        if overlap:
            raise ValueError(f"condition features {sorted(overlap)} are also item features")
        if self.negatives < 0 or self.temperature <= 0:
            raise ValueError("negatives must be >= 0 and temperature > 0")
        if self.item_keys is not None and not 1 <= self.item_keys <= self.items:
            raise ValueError(f"item_keys must lie in [1, items], got {self.item_keys}")

    @property
    def drawn(self) -> int:
        """Negatives are drawn uniformly from ``[0, drawn)``."""
        return self.items if self.item_keys is None else self.item_keys

    def sparse(self) -> SparseConfig:
        d = self.tower.hidden
        tables = [TableSpec(ITEM_TABLE, self.items, d, ("item", "negative_item"))]
        tables += [TableSpec(n, rows, d, (n,)) for n, rows in self.side_features.items()]
        tables += [TableSpec(n, rows, d, (n,)) for n, rows in self.conditions.items()]
        return SparseConfig(tuple(tables), self.frozen)


class LUMOutput(NamedTuple):
    loss: torch.Tensor
    hits: torch.Tensor
    """Targets scored above every negative."""
    targets: torch.Tensor


class Packed(NamedTuple):
    """Token sequences of several users laid out in rows of the tower."""

    rows: torch.Tensor
    """[N] row of each token (tokens in user order, then position order)."""
    columns: torch.Tensor
    """[N] column of each token in its row."""
    shape: tuple[int, int]
    """(rows, columns) of the packed batch."""
    positions: torch.Tensor
    """[rows, columns] rotary position of each slot (restarting at 0 for each user)."""
    segments: torch.Tensor
    """[rows, columns] which user of the row a slot holds (-1: padding)."""


def pack(lengths: torch.Tensor, capacity: int) -> Packed:
    """Place sequences of ``lengths`` tokens into rows of ``capacity`` tokens, in order, a new
    row when the next one does not fit (each must fit alone)."""
    lengths_list = [int(n) for n in lengths.tolist()]
    if any(n > capacity for n in lengths_list):
        raise ValueError(f"a sequence of {max(lengths_list)} tokens exceeds the row of {capacity}")
    row_of, start_of, row, used = [], [], 0, 0
    for n in lengths_list:
        if used + n > capacity and used:
            row, used = row + 1, 0
        row_of.append(row)
        start_of.append(used)
        used += n
    rows = (row + 1) if lengths_list else 0
    device = lengths.device
    counts = lengths.to(device)
    token_row = torch.repeat_interleave(torch.tensor(row_of, device=device), counts)
    first = torch.repeat_interleave(torch.tensor(start_of, device=device), counts)
    offsets = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(
        offsets, counts
    )
    columns = first + local
    width = max((s + n for s, n in zip(start_of, lengths_list, strict=True)), default=0)
    positions = torch.zeros(rows, width, dtype=torch.long, device=device)
    positions[token_row, columns] = local
    segments = torch.full((rows, width), -1, dtype=torch.long, device=device)
    user = torch.repeat_interleave(torch.arange(len(lengths_list), device=device), counts)
    segments[token_row, columns] = user
    return Packed(token_row, columns, (rows, width), positions, segments)


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T]: a token sees the earlier tokens of its own user (and padding itself)."""
    t = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    valid = segments[:, None, :] >= 0
    eye = torch.eye(t, dtype=torch.bool, device=segments.device)
    return ((same & causal & valid) | eye)[:, None]


class LUM(nn.Module):
    """Seq batches with condition features → :class:`LUMOutput`; :meth:`query` for step 2."""

    def __init__(
        self,
        config: LUMConfig,
        sparse_device: torch.device | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.sparse = SparseArch(config.sparse(), sparse_device)
        d = config.tower.hidden
        self.item_proj = nn.Linear(d * (1 + len(config.side_features)), d, device=device)
        self.condition_proj = nn.Linear(d * len(config.conditions), d, device=device)
        self.tower = Tower(config.tower).to(device)

    def _lookup(self, features: KeyedJaggedTensor, negatives: torch.Tensor | None):
        """Item tokens, condition tokens (jagged values [N, d]), the item-table embeddings of
        the items, and of the sampled negatives."""
        if negatives is not None:  # one list, on the first row, shared by the batch
            lengths = torch.zeros(features.stride(), dtype=torch.long)
            lengths[0] = len(negatives)
            sampled = KeyedJaggedTensor.from_lengths_sync(
                keys=["negative_item"], values=negatives, lengths=lengths.to(negatives.device)
            )
            features = KeyedJaggedTensor.concat([features, sampled])
        sequences = self._table_lookup(features)  # no negatives: an empty list
        config = self.config
        items = sequences["item"].values()
        item_tokens = self.item_proj(
            torch.cat([items, *(sequences[n].values() for n in config.side_features)], -1)
        )
        condition_tokens = self.condition_proj(
            torch.cat([sequences[n].values() for n in config.conditions], -1)
        )
        return item_tokens, condition_tokens, items, sequences["negative_item"].values()

    def encode(self, features: KeyedJaggedTensor, pack_to: int | None = None) -> torch.Tensor:
        """The tower's output at every token, [2·events, d] in user order (c1, i1, c2, i2,
        ... per user). ``pack_to``: users packed into rows of that many tokens (default: one
        user per row, padded to the longest)."""
        item_tokens, condition_tokens, _, _ = self._lookup(features, None)
        events = features.lengths()[: features.stride()]
        return self._run(events, item_tokens, condition_tokens, pack_to)

    def _run(self, events, item_tokens, condition_tokens, pack_to):
        """The tower over each user's tokens c1, i1, c2, i2, ... (packed into rows of
        ``pack_to`` tokens, or one user per row); outputs in token order, [2·events, d]."""
        d = item_tokens.shape[-1]
        tokens = torch.stack([condition_tokens, item_tokens], 1).reshape(-1, d)
        lengths = 2 * events
        layout = pack(lengths, pack_to) if pack_to else _one_per_row(lengths)
        x = tokens.new_zeros((*layout.shape, d))
        x[layout.rows, layout.columns] = tokens
        valid = layout.segments >= 0
        if pack_to:
            out = self.tower(
                x, valid, mask=packed_mask(layout.segments), positions=layout.positions
            )
        else:  # right-padded rows of one user: the tower's own (fused causal) attention
            out = self.tower(x, valid)
        return out[layout.rows, layout.columns]

    def forward(self, features: KeyedJaggedTensor, pack_to: int | None = None) -> LUMOutput:
        config = self.config
        pack_to = pack_to if pack_to is not None else (config.pack or None)
        batch = features.stride()
        events = features.lengths()[:batch]
        device = features.values().device
        sampled = (
            # The batch's id type (int32 when the tables fit), so the lookup keeps it.
            torch.randint(
                0, config.drawn, (config.negatives,), device=device, dtype=features.values().dtype
            )
            if config.negatives
            else None
        )
        item_tokens, condition_tokens, items, negative = self._lookup(features, sampled)
        out = self._run(events, item_tokens, condition_tokens, pack_to)
        at_condition = out[0::2]  # every condition token predicts its own event's item
        query = F.normalize(at_condition, dim=-1)
        targets = F.normalize(items, dim=-1)
        ids = features["item"].values()
        scores = query @ targets.T / config.temperature  # [N, N]: in-batch candidates
        # A repeat of the target item elsewhere in the batch is no negative.
        repeat = (ids[:, None] == ids[None, :]) & ~torch.eye(
            len(ids), dtype=torch.bool, device=device
        )
        scores = scores.masked_fill(repeat, float("-inf"))
        if sampled is not None:
            shared = query @ F.normalize(negative, dim=-1).T / config.temperature
            shared = shared.masked_fill(ids[:, None] == sampled[None, :], float("-inf"))
            scores = torch.cat([scores, shared], 1)
        if not len(ids):
            zero = out.sum() * 0.0
            return LUMOutput(zero, torch.zeros((), dtype=torch.long), torch.zeros(()))
        labels = torch.arange(len(ids), device=device)
        loss = F.cross_entropy(scores, labels)
        own = scores.gather(1, labels[:, None])[:, 0]
        others = scores.clone()
        others[labels, labels] = float("-inf")
        hits = (own > others.max(1).values).sum()
        return LUMOutput(loss, hits, torch.tensor(float(len(ids))))

    @torch.no_grad()
    def query(
        self, features: KeyedJaggedTensor, conditions: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Group query: every user's history (``features``) with the same N query conditions
        (``conditions``: feature → [N] ids) → outputs [B, N, d] at the query tokens, each
        query seeing the history and itself only (as N separate queries would)."""
        batch = features.stride()
        events = features.lengths()[:batch]
        item_tokens, condition_tokens, _, _ = self._lookup(features, None)
        n = len(next(iter(conditions.values())))
        query_tokens = self._condition_tokens(conditions)  # [N, d]
        d = item_tokens.shape[-1]
        history = torch.stack([condition_tokens, item_tokens], 1).reshape(-1, d)
        lengths = 2 * events
        t = int(lengths.max()) if batch else 0
        layout = _one_per_row(lengths, t)
        x = history.new_zeros((batch, t + n, d))
        x[layout.rows, layout.columns] = history
        x[:, t:] = query_tokens
        valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
        mask = torch.zeros(batch, 1, t + n, t + n, dtype=torch.bool, device=x.device)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        mask[:, 0, :t, :t] = (causal & valid[:, None, :]) | torch.eye(
            t, dtype=torch.bool, device=x.device
        )
        mask[:, 0, t:, :t] = valid[:, None, :]  # queries see the history ...
        mask[:, 0, t:, t:] = torch.eye(n, dtype=torch.bool, device=x.device)  # ... and themselves
        positions = torch.cat(
            [torch.arange(t, device=x.device).expand(batch, t), lengths[:, None].expand(batch, n)],
            1,
        )
        return self.tower(x, valid, mask=mask, positions=positions)[:, t:]

    def _condition_tokens(self, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        names = list(self.config.conditions)
        missing = sorted(set(names) - set(conditions))
        if missing:
            raise KeyError(f"query conditions lack {missing}; the model's are {names}")
        n = len(conditions[names[0]])
        device = conditions[names[0]].device
        kjt = KeyedJaggedTensor.from_lengths_sync(  # one row of n ids per condition feature
            keys=names,
            values=torch.cat([conditions[k].to(device) for k in names]),
            lengths=torch.full((len(names),), n, dtype=torch.long, device=device),
        )
        sequences = self._table_lookup(kjt)
        return self.condition_proj(torch.cat([sequences[k].values() for k in names], -1))

    def _table_lookup(self, kjt: KeyedJaggedTensor):
        """Embeddings of ``kjt``'s features, the other features of the model given empty."""
        keys = [f for t in self.config.sparse().tables for f in t.features]
        batch = kjt.stride()
        present = set(kjt.keys())
        empty = [k for k in keys if k not in present]
        if empty:
            blank = KeyedJaggedTensor.from_lengths_sync(
                keys=empty,
                values=kjt.values().new_zeros(0),  # the batch's id type
                lengths=torch.zeros(
                    batch * len(empty), dtype=torch.long, device=kjt.values().device
                ),
            )
            kjt = KeyedJaggedTensor.concat([kjt, blank])
        sequences, _ = self.sparse(kjt)
        return sequences

    def item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The item-table embeddings of ``ids`` (step 3's interest matching)."""
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item"], values=ids, lengths=torch.tensor([len(ids)], device=ids.device)
        )
        return self._table_lookup(kjt)["item"].values()


def _one_per_row(lengths: torch.Tensor, width: int | None = None) -> Packed:
    """Each sequence in its own row, right-padded to ``width`` (default: the longest)."""
    batch = len(lengths)
    width = width if width is not None else (int(lengths.max()) if batch else 0)
    counts = lengths
    rows = torch.repeat_interleave(torch.arange(batch, device=lengths.device), counts)
    offsets = torch.cumsum(counts, 0) - counts
    columns = torch.arange(int(counts.sum()), device=lengths.device) - torch.repeat_interleave(
        offsets, counts
    )
    positions = torch.arange(width, device=lengths.device).expand(batch, width).clone()
    segments = torch.full((batch, width), -1, dtype=torch.long, device=lengths.device)
    segments[rows, columns] = rows
    return Packed(rows, columns, (batch, width), positions, segments)
