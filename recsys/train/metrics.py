"""Ranking metrics on torchmetrics, synced across ranks: AUC, logloss, gAUC, hit rate.

This module owns what is measured and how it is combined over ranks: every metric keeps
torchmetrics states (gathered from all ranks when computed), so a job on N ranks reports
exactly what one process would on the same samples. States are persistent, so a checkpoint
taken mid-epoch resumes the epoch's metrics.

- AUC: exact, tie-aware (``BinaryAUROC`` without thresholds).
- logloss: mean binary cross-entropy of the predicted probabilities.
- gAUC: the AUC of each user's samples, averaged over users weighted by their number of
  samples; users whose samples all share one label have no AUC and are left out (the usual
  definition, e.g. in DIN's and GPSD's reports).
- hit rate: for pretraining, the share of next-item targets scored above every sampled
  negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities.data import dim_zero_cat


def grouped_auc(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The AUC of each group that has both labels, and the group's number of samples.

    Vectorised over groups: ranks are taken inside each group (ties get their average rank)
    and AUC = (Σ ranks of positives − P(P+1)/2) / (P·N).
    """
    scores, labels, groups = scores.double(), labels.double(), groups.long()
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, then score
    s, y, g = scores[order], labels[order], groups[order]
    n = len(s)
    position = torch.arange(1, n + 1, dtype=torch.float64)
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = g[1:] != g[:-1]
    group_id = torch.cumsum(new_group.long(), 0) - 1
    group_start = position[new_group]
    rank = position - group_start[group_id] + 1  # 1-based rank inside the group
    # Average ranks over runs of equal scores inside a group.
    new_run = new_group.clone()
    new_run[1:] |= s[1:] != s[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    runs = int(run_id[-1]) + 1 if n else 0
    run_sum = torch.zeros(runs, dtype=torch.float64).index_add_(0, run_id, rank)
    run_len = torch.zeros(runs, dtype=torch.float64).index_add_(0, run_id, torch.ones(n).double())
    rank = (run_sum / run_len)[run_id]
    groups_n = int(group_id[-1]) + 1 if n else 0
    positives = torch.zeros(groups_n, dtype=torch.float64).index_add_(0, group_id, y)
    size = torch.zeros(groups_n, dtype=torch.float64).index_add_(
        0, group_id, torch.ones(n).double()
    )
    rank_sum = torch.zeros(groups_n, dtype=torch.float64).index_add_(0, group_id, rank * y)
    negatives = size - positives
    both = (positives > 0) & (negatives > 0)
    auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return auc[both], size[both]


class GroupAUC(Metric):
    """gAUC: per-user AUC averaged with the users' sample counts as weights."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("scores", "labels", "groups"):
            self.add_state(name, default=[], dist_reduce_fx="cat", persistent=True)

    def update(self, scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        self.scores.append(scores.detach().flatten().float())
        self.labels.append(labels.detach().flatten().float())
        self.groups.append(groups.detach().flatten().long())

    def compute(self) -> torch.Tensor:
        auc, weight = grouped_auc(
            dim_zero_cat(self.scores), dim_zero_cat(self.labels), dim_zero_cat(self.groups)
        )
        if len(auc) == 0:
            return torch.tensor(float("nan"))
        return ((auc * weight).sum() / weight.sum()).float()


class LogLoss(Metric):
    """Mean binary cross-entropy of logits against 0/1 labels."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "total",
            default=torch.tensor(0.0, dtype=torch.float64),
            dist_reduce_fx="sum",
            persistent=True,
        )
        self.add_state(
            "count",
            default=torch.tensor(0, dtype=torch.long),
            dist_reduce_fx="sum",
            persistent=True,
        )

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        losses = F.binary_cross_entropy_with_logits(
            logits.detach().double(), labels.detach().double(), reduction="sum"
        )
        self.total += losses
        self.count += labels.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


class CTRMetrics:
    """AUC, logloss and gAUC of one split (train or validation)."""

    def __init__(self) -> None:
        self.auc = BinaryAUROC()
        self.auc.persistent(True)
        self.logloss = LogLoss()
        self.gauc = GroupAUC()

    def update(self, logits: torch.Tensor, labels: torch.Tensor, users: torch.Tensor) -> None:
        probabilities = torch.sigmoid(logits.detach().float())
        self.auc.update(probabilities, labels.long())
        self.logloss.update(logits, labels)
        self.gauc.update(probabilities, labels, users)

    def compute(self) -> dict[str, float]:
        return {
            "auc": float(self.auc.compute()),
            "logloss": float(self.logloss.compute()),
            "gauc": float(self.gauc.compute()),
        }

    def reset(self) -> None:
        for metric in (self.auc, self.logloss, self.gauc):
            metric.reset()

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in ("auc", "logloss", "gauc")}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


class PretrainMetrics:
    """Mean loss and next-item hit rate (target above every sampled negative)."""

    def __init__(self) -> None:
        self.loss = MeanMetric()
        self.hits = SumMetric()
        self.targets = SumMetric()
        for metric in (self.loss, self.hits, self.targets):
            metric.persistent(True)

    def update(self, loss: torch.Tensor, hits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss.update(loss.detach(), weight=targets.detach().float())
        self.hits.update(hits.detach().float())
        self.targets.update(targets.detach().float())

    def compute(self) -> dict[str, float]:
        targets = float(self.targets.compute())
        return {
            "loss": float(self.loss.compute()),
            "hit_rate": float(self.hits.compute()) / targets if targets else float("nan"),
        }

    def reset(self) -> None:
        for metric in (self.loss, self.hits, self.targets):
            metric.reset()
