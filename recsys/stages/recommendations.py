"""What the ``retrieve`` stage collects on each rank: its users' top K items, their targets'
ranks, the metrics over every rank, and the Parquet part it writes.

This module owns the answers' shape on disk (one row per user: ``user_id``, ``items`` and
``scores`` best first, and with targets ``target_item`` and ``target_rank``, in raw ids when
the model stage carries vocabularies) and the means of HR@K, NDCG@K and MRR over the users of
every rank. Scoring is :mod:`recsys.distributed.topk`'s.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from recsys.data.vocab import USER, Vocabulary
from recsys.distributed.env import summed_over_ranks
from recsys.distributed.topk import Retrieved, ranking_metrics


class Answers:
    """This rank's answers, batch by batch; ``evaluated``: the users have targets."""

    def __init__(self, k: int, evaluated: bool) -> None:
        self.k, self.evaluated = k, evaluated
        self.users: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.ids: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.ranks: list[torch.Tensor] = []
        self.skipped = 0

    def add(
        self, users: torch.Tensor, targets: torch.Tensor, found: Retrieved, skipped: int = 0
    ) -> None:
        """One batch's answers; ``skipped``: its users that could not be asked (no history)."""
        self.users.append(users.cpu().numpy().astype(np.int64))
        self.targets.append(targets.cpu().numpy().astype(np.int64))
        self.ids.append(found.ids.cpu().numpy())
        self.scores.append(found.scores.float().cpu().numpy())
        self.ranks.append(found.ranks.cpu())
        self.skipped += skipped

    def results(self) -> dict[str, float | int]:
        """Over every rank (collective): users, skipped users, K, and with targets the means
        of HR@K, NDCG@K, MRR and how many targets were no known item."""
        ranks = torch.cat(self.ranks) if self.ranks else torch.zeros(0, dtype=torch.long)
        sums = ranking_metrics(ranks, self.k)
        sums["unknown_targets"] = float((ranks == 0).sum())
        sums["skipped_users"] = float(self.skipped)
        names = list(sums)
        total = summed_over_ranks(torch.tensor([sums[n] for n in names], dtype=torch.float64))
        summed = dict(zip(names, total.tolist(), strict=True))
        users = int(summed["users"])
        out: dict[str, float | int] = {"users": users, "k": self.k}
        out["skipped_users"] = int(summed["skipped_users"])
        if self.evaluated:
            for name in (f"hr@{self.k}", f"ndcg@{self.k}", "mrr"):
                out[name] = summed[name] / users if users else float("nan")
            out["unknown_targets"] = int(summed["unknown_targets"])
        return out

    def table(self, vocabularies: dict[str, Vocabulary]) -> pa.Table:
        """This rank's rows; ids raw where ``vocabularies`` has the table (``item``, users)."""
        k = self.k
        users = np.concatenate(self.users) if self.users else np.zeros(0, np.int64)
        ids = np.concatenate(self.ids) if self.ids else np.zeros((0, k), np.int64)
        scores = np.concatenate(self.scores) if self.scores else np.zeros((0, k), np.float32)
        found = ids >= 0  # fewer than K candidates: the rest is -1
        offsets = np.concatenate([[0], np.cumsum(found.sum(1))]).astype(np.int32)
        items = _raw(vocabularies.get("item"), ids[found])
        columns = {
            "user_id": _raw(vocabularies.get(USER), users),
            "items": pa.ListArray.from_arrays(pa.array(offsets), items),
            "scores": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(scores[found], pa.float32())
            ),
        }
        if self.evaluated:
            targets = np.concatenate(self.targets) if self.targets else np.zeros(0, np.int64)
            ranks = torch.cat(self.ranks).numpy() if self.ranks else np.zeros(0, np.int64)
            columns["target_item"] = _raw(vocabularies.get("item"), targets)
            columns["target_rank"] = pa.array(ranks, pa.int64(), mask=ranks == 0)
        return pa.table(columns)


def _raw(vocabulary: Vocabulary | None, ids: np.ndarray) -> pa.Array:
    """Raw keys of dense ``ids``, or the ids themselves without a vocabulary."""
    if vocabulary is None:
        return pa.array(ids, pa.int64())
    return vocabulary.raw(ids)
