"""Exact top-K items and exact target ranks over an item table sharded by rows.

This module owns scoring users against the whole catalogue where the item table lives: each
rank scores the rows of the table it holds (:func:`catalogue`: its row-wise or table-wise
shards, or, for a table every rank holds whole, its 1/world share of the rows), keeps its own
top K per user, and the ranks' top Ks are gathered and merged (:func:`retrieve`). The target
of a user (the held-out next item) is ranked on the same shards: 1 + the number of candidate
items scoring strictly higher, summed over the ranks in one all-reduce. Nothing here knows
models or data: users come in as vectors, ``seen`` as padded id lists (-1: none), targets as
ids (-1: none).

Which items compete, per user:

- only known items, ids ``[0, known)``: the rows after them are reserved (unknown and
  padding, ``recsys.data.vocab``) and are never returned or counted;
- with ``exclude_seen``, the ids of ``seen`` are left out of the top K, and out of the count
  above the target, except the target itself, which is always ranked (a repeated item can be
  a hit);
- ties: an item scoring exactly the target's score is not above it (rank 1 + strictly
  higher); in a top K, equal scores come in the order ``torch.topk`` gives.

Why count instead of handing every score to a retrieval metric: torchmetrics' retrieval
metrics take every item's score per query, which would gather the whole catalogue's scores
for every user on one rank; a count per user per rank is one integer, and the rank it sums
to gives HR@K, NDCG@K and MRR exactly (:func:`ranking_metrics`). The tests check both agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from recsys.distributed.env import collective_device, summed_over_ranks

CHUNK_ROWS = 65_536
"""Item rows scored at once: [users, CHUNK_ROWS] scores are the largest tensor."""


class ShardingNotSupported(ValueError):
    """The item table is split by columns: no rank holds whole rows to score."""


@dataclass(frozen=True)
class Catalogue:
    """The known item rows this rank scores."""

    rows: list[tuple[int, torch.Tensor]]
    """(first id, rows [n, dim]) per block; the blocks of all ranks cover ``[0, known)`` once."""
    known: int
    dim: int


def catalogue(table: torch.Tensor, known: int) -> Catalogue:
    """This rank's share of the known rows of ``table``: the local shards of a sharded table
    (the ``ShardedTensor`` of its state dict: row-wise, table-wise, table-row-wise), or a
    1/world slice of the rows of a table every rank holds whole (data-parallel). A table
    split by columns (column-wise) is refused: :class:`ShardingNotSupported`."""
    rank, world = _rank_world()
    if not hasattr(table, "local_shards"):
        dim = table.shape[1]
        share = math.ceil(known / world)
        first, end = min(rank * share, known), min((rank + 1) * share, known)
        return Catalogue([(first, table[first:end])], known, dim)
    dim = table.size()[1]
    blocks = []
    for shard in table.local_shards():
        (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        if c0 != 0 or nc != dim:
            raise ShardingNotSupported(
                f"the item table is split by columns (a shard holds columns {c0}..{c0 + nc - 1} "
                f"of {dim}); score it row-wise or table-wise (plan.sharding_types)"
            )
        end = min(r0 + nr, known)
        if end > r0:
            blocks.append((r0, shard.tensor[: end - r0]))
    return Catalogue(blocks, known, dim)


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def scores(users: torch.Tensor, rows: torch.Tensor, scoring: str, temperature: float):
    """[U, n] scores as the generative model scores the next item (``dot`` or ``cosine``,
    divided by ``temperature``)."""
    users, rows = users.float(), rows.float()
    if scoring == "cosine":
        users, rows = F.normalize(users, dim=-1), F.normalize(rows, dim=-1)
    return users @ rows.T / temperature


def pair_scores(users: torch.Tensor, rows: torch.Tensor, scoring: str, temperature: float):
    """[U] scores of user i with row i, as :func:`scores` gives them."""
    users, rows = users.float(), rows.float()
    if scoring == "cosine":
        users, rows = F.normalize(users, dim=-1), F.normalize(rows, dim=-1)
    return (users * rows).sum(-1) / temperature


@dataclass(frozen=True)
class Retrieved:
    """This rank's users' answers."""

    ids: torch.Tensor
    """[U, K] item ids, best first; -1 past a user's candidates."""
    scores: torch.Tensor
    """[U, K] their scores; -inf past a user's candidates."""
    ranks: torch.Tensor
    """[U] the target's rank (1 = best); 0 where there is no target or it is no known item."""


def _excluded(seen: torch.Tensor, first: int, end: int, keep: torch.Tensor | None):
    """(user, column) pairs of ``seen`` ids inside rows ``[first, end)``, ``keep`` [U] left in."""
    inside = (seen >= first) & (seen < end)
    if keep is not None:
        inside &= seen != keep[:, None]
    users, where = inside.nonzero(as_tuple=True)
    return users, seen[users, where] - first


def local_top_k(
    users: torch.Tensor,
    block: Catalogue,
    k: int,
    seen: torch.Tensor,
    targets: torch.Tensor,
    *,
    scoring: str = "dot",
    temperature: float = 1.0,
    target_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over this rank's rows: each user's top ``k`` (scores, ids; -inf / -1 where there are
    fewer) without ``seen`` ids (an empty ``seen`` [U, 0] excludes nothing), and, given
    ``target_scores`` [U], how many candidates score strictly higher than it (the target
    itself never counted)."""
    n = len(users)
    best = torch.full((n, k), -math.inf, device=users.device)
    best_ids = torch.full((n, k), -1, dtype=torch.long, device=users.device)
    above = torch.zeros(n, dtype=torch.long, device=users.device)
    for first, rows in block.rows:
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS]
            lo, hi = first + start, first + start + len(chunk)
            s = scores(users, chunk, scoring, temperature)
            if target_scores is not None:
                counted = s.clone()
                u, c = _excluded(seen, lo, hi, targets)
                counted[u, c] = -math.inf
                own = (targets >= lo) & (targets < hi)
                counted[own.nonzero(as_tuple=True)[0], targets[own] - lo] = -math.inf
                above += (counted > target_scores[:, None]).sum(1)
            u, c = _excluded(seen, lo, hi, None)
            s[u, c] = -math.inf
            top, where = s.topk(min(k, s.shape[1]), dim=1)
            merged = torch.cat([best, top], 1)
            ids = torch.cat([best_ids, where + lo], 1)
            best, pick = merged.topk(k, dim=1)
            best_ids = ids.gather(1, pick)
    best_ids[best == -math.inf] = -1
    return best, best_ids, above


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (of the same shape), on the collective device."""
    if not dist.is_initialized():
        return [tensor]
    local = tensor.to(collective_device())
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [t.to(tensor.device) for t in out]


def _padded(tensor: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    extra = rows - len(tensor)
    return (
        torch.cat([tensor, tensor.new_full((extra, *tensor.shape[1:]), fill)]) if extra else tensor
    )


def retrieve(
    users: torch.Tensor,
    block: Catalogue,
    k: int,
    seen: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    *,
    scoring: str = "dot",
    temperature: float = 1.0,
) -> Retrieved:
    """Each of this rank's users' top ``k`` known items over every rank's rows, and their
    targets' ranks. Collective: every rank calls it, with any number of users (0 too).

    users [U, dim]; seen [U, L] ids to exclude (-1: padding; None: none); targets [U] (-1:
    none). Every rank gets every rank's users (all-gathered), scores them against its rows,
    and the ranks' top ``k`` are gathered and merged; above-target counts are all-reduced."""
    n, device = len(users), users.device
    seen = torch.full((n, 0), -1, dtype=torch.long, device=device) if seen is None else seen
    targets = torch.full((n,), -1, dtype=torch.long, device=device) if targets is None else targets
    sizes = torch.tensor([n, seen.shape[1]], device=device)
    shapes = _gathered(sizes)
    most, longest = (int(max(int(s[i]) for s in shapes)) for i in (0, 1))
    seen = torch.cat([seen, seen.new_full((n, longest - seen.shape[1]), -1)], 1)
    every = [
        torch.cat(_gathered(_padded(t, most, fill)))
        for t, fill in ((users.float(), 0.0), (seen.long(), -1), (targets.long(), -1))
    ]
    all_users, all_seen, all_targets = every
    # The target's score, from the rank holding its row (the others add zero).
    target_scores = torch.zeros(len(all_users), device=device)
    owned = torch.zeros(len(all_users), dtype=torch.long, device=device)
    for first, rows in block.rows:
        mine = (all_targets >= first) & (all_targets < first + len(rows))
        at = mine.nonzero(as_tuple=True)[0]
        if len(at):
            row = rows[all_targets[at] - first]
            target_scores[at] = pair_scores(all_users[at], row, scoring, temperature)
            owned[at] = 1
    target_scores, owned = summed_over_ranks(target_scores), summed_over_ranks(owned)
    top, ids, above = local_top_k(
        all_users,
        block,
        k,
        all_seen,
        all_targets,
        scoring=scoring,
        temperature=temperature,
        target_scores=target_scores,
    )
    above = summed_over_ranks(above)
    rank, _ = _rank_world()
    mine = slice(rank * most, rank * most + n)
    merged = torch.cat([t[mine] for t in _gathered(top)], 1)
    merged_ids = torch.cat([t[mine] for t in _gathered(ids)], 1)
    best, pick = merged.topk(k, dim=1)
    best_ids = merged_ids.gather(1, pick)
    best_ids[best == -math.inf] = -1
    ranks = torch.where(owned[mine] > 0, above[mine] + 1, 0)
    return Retrieved(best_ids, best, ranks)


def ranking_metrics(ranks: torch.Tensor, k: int) -> dict[str, float]:
    """Sums over users of HR@K (rank <= K), NDCG@K (1 / log2(rank + 1) within K, one relevant
    item) and reciprocal rank; rank 0 (no known target) counts as a miss everywhere. Divide by
    ``users`` for the means."""
    ranks = ranks.double()
    hit = (ranks >= 1) & (ranks <= k)
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks + 1), 0.0)
    rr = torch.where(ranks >= 1, 1.0 / ranks.clamp(min=1), 0.0)
    return {
        f"hr@{k}": float(hit.sum()),
        f"ndcg@{k}": float(ndcg.sum()),
        "mrr": float(rr.sum()),
        "users": float(len(ranks)),
    }
