"""Ranking metrics over all ranks: AUC, logloss, NE, calibration, gAUC, hit rate.

This module owns what is measured and how it is combined over ranks: CTR metrics keep each
rank's logits, labels and users and gather them when computed (a rank may have none), and
pretraining metrics are torchmetrics sums, so a job on N ranks reports exactly what one
process would on the same samples. States are checkpointed, so a run resumed mid-epoch
reports the epoch's metrics as if it had not stopped.

- AUC: exact, tie-aware (torchmetrics' ``binary_auroc`` without thresholds); NaN (undefined)
  when every sample has the same label (torchmetrics would say 0.0), so a stage refuses it;
  NE and calibration are NaN then too (no click rate to normalise by or compare with).
- logloss: mean binary cross-entropy of the predicted probabilities.
- NE (normalized entropy): the logloss over the entropy of the samples' click rate p,
  −(p log p + (1 − p) log(1 − p)), so 1.0 is what predicting p everywhere scores and lower is
  better (He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook", 2014);
  TorchRec's ``compute_ne`` normalises it.
- calibration: the sum of predicted probabilities over the number of positives (predicted
  over actual CTR; 1.0 is calibrated), TorchRec's ``compute_calibration``.
- gAUC: the AUC of each user's samples, averaged over users weighted by their number of
  samples; users whose samples all share one label have no AUC and are left out (the usual
  definition, e.g. in DIN's and GPSD's reports).
- hit rate: for pretraining, the share of next-item targets scored above every sampled
  negative.

A NaN or infinite value is never dropped: one non-finite logit makes AUC, logloss, NE,
calibration and gAUC NaN (sorting would otherwise rank a NaN as the highest score, and a
sigmoid makes an infinite logit a valid probability), and their count is reported as
``nonfinite_logits``; a non-finite pretraining loss makes the mean loss non-finite
(torchmetrics would drop NaNs with a warning).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.functional.classification import binary_auroc
from torchrec.metrics.calibration import compute_calibration
from torchrec.metrics.ne import compute_ne

log = logging.getLogger(__name__)

KEEP_NAN = float("nan")
"""torchmetrics' ``nan_strategy`` that keeps a NaN (it replaces NaNs with this value)."""
PENDING = 256
"""Steps a pretraining metric keeps on the device before it adds them up."""


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


class CTRMetrics:
    """AUC, logloss, NE, calibration and gAUC of one split (train or validation), over every
    rank's samples.

    Each rank keeps its own logits, labels and users; ``compute`` gathers them (any rank may
    have none) and scores the whole split with torchmetrics' exact, tie-aware AUC.
    """

    def __init__(self) -> None:
        self.reset()

    def update(self, logits: torch.Tensor, labels: torch.Tensor, users: torch.Tensor) -> None:
        # Kept where they are (a GPU's memory): copying to the host at each step would
        # wait for the step; compute and state_dict bring them over once.
        self.logits.append(logits.detach().float().flatten())
        self.labels.append(labels.detach().float().flatten())
        self.users.append(users.detach().long().flatten())

    def compute(self) -> dict[str, float]:
        """The metrics over every rank's samples (NaN when no rank has any, or when a logit
        is NaN or infinite: see the module doc)."""
        logits, labels = _gathered(self.logits), _gathered(self.labels)
        users = _gathered(self.users, torch.long)
        nonfinite = int((~torch.isfinite(logits)).sum())
        if len(labels) == 0 or nonfinite:
            return _undefined(len(labels), nonfinite)
        probabilities = torch.sigmoid(logits)
        auc, weight = grouped_auc(probabilities, labels, users)
        logloss = F.binary_cross_entropy_with_logits(logits.double(), labels.double())
        return {
            "auc": _auc(probabilities, labels),
            "logloss": float(logloss),
            **_ne_and_calibration(logloss, probabilities.double(), labels.double()),
            "gauc": float((auc * weight).sum() / weight.sum()) if len(auc) else float("nan"),
            "samples": float(len(labels)),
        }

    def reset(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.users: list[torch.Tensor] = []

    def state_dict(self) -> dict:
        return {
            "logits": _cat(self.logits),
            "labels": _cat(self.labels),
            "users": _cat(self.users, torch.long),
        }

    def load_state_dict(self, state: dict) -> None:
        self.logits, self.labels = [state["logits"]], [state["labels"]]
        self.users = [state["users"]]


def _auc(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact AUC; NaN when the samples are all one class (no positive-negative pair)."""
    positives = int((labels > 0.5).sum())
    if positives in (0, len(labels)):
        log.warning(
            "all %d samples have label %d: AUC is undefined (NaN)", len(labels), labels[0] > 0.5
        )
        return float("nan")
    return float(binary_auroc(probabilities, labels.long(), validate_args=False))


def _ne_and_calibration(
    logloss: torch.Tensor, probabilities: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """NE and calibration of samples with both labels (NaN otherwise: no click rate to
    normalise by, or none to compare with), from their mean cross-entropy ``logloss``."""
    positives = labels.sum()
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return {"ne": float("nan"), "calibration": float("nan")}
    samples = torch.tensor(float(len(labels)), dtype=torch.float64)
    # TorchRec's entropies are in bits; the cross-entropy from the logits is in nats.
    bits = logloss * len(labels) / math.log(2)
    ne = compute_ne(bits, samples, positives, negatives, eta=1e-12)
    return {
        "ne": float(ne),
        "calibration": float(compute_calibration(probabilities.sum(), positives)),
    }


def _undefined(samples: int, nonfinite: int) -> dict[str, float]:
    """CTR metrics that cannot be computed: no samples, or some logits NaN or infinite."""
    nan = float("nan")
    results = {"auc": nan, "logloss": nan, "ne": nan, "calibration": nan, "gauc": nan}
    results["samples"] = float(samples)
    if nonfinite:
        log.warning(
            "%d of %d logits are NaN or infinite: AUC, logloss, NE, calibration, gAUC are NaN",
            nonfinite,
            samples,
        )
        results["nonfinite_logits"] = float(nonfinite)
    return results


def _cat(parts: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The parts in one host tensor."""
    return torch.cat([p.cpu() for p in parts]) if parts else torch.empty(0, dtype=dtype)


def _gathered(parts: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every rank's values, in rank order (a rank may have none)."""
    local = _cat(parts, dtype)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return torch.cat([t.to(dtype) for t in everyone])


class PretrainMetrics:
    """Mean loss and next-item hit rate (target above every sampled negative)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # States on the device the model computes on: updates stay there, and the sync's
        # collectives get tensors the backend takes (nccl takes no CPU tensors).
        self.device = torch.device(device)
        self.loss = MeanMetric(nan_strategy=KEEP_NAN).to(device)
        self.hits = SumMetric().to(device)
        self.targets = SumMetric().to(device)
        for metric in (self.loss, self.hits, self.targets):
            metric.persistent(True)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, loss: torch.Tensor, hits: torch.Tensor, targets: torch.Tensor) -> None:
        """Kept on the device until :meth:`compute` or :meth:`state_dict` (torchmetrics'
        NaN check waits for the device at each update)."""
        self._pending.append((loss.detach(), hits.detach(), targets.detach()))
        if len(self._pending) >= PENDING:
            self._flush()

    def _flush(self) -> None:
        """The pending steps into the metrics, in one update each."""
        if not self._pending:
            return
        # On the metrics' device: a model may give its counts on the host, its loss on a GPU.
        losses, hits, targets = (
            torch.stack([v.float().to(self.device) for v in vs])
            for vs in zip(*self._pending, strict=True)
        )
        self._pending = []
        # A copy for the weight: torchmetrics writes its NaN replacement into it.
        self.loss.update(losses, weight=targets.clone())  # the mean over steps by targets
        self.hits.update(hits)
        self.targets.update(targets)

    def compute(self) -> dict[str, float]:
        self._flush()
        targets = float(self.targets.compute())
        return {
            "loss": float(self.loss.compute()),
            "hit_rate": float(self.hits.compute()) / targets if targets else float("nan"),
        }

    def reset(self) -> None:
        self._pending = []
        for metric in (self.loss, self.hits, self.targets):
            metric.reset()

    def state_dict(self) -> dict:
        """This rank's running sums and its pending steps (not synced: each rank restores its
        own). The pending steps are saved as they are, not added up: a resumed run then adds
        them up in the same groups as an uninterrupted one, to the last bit."""
        state = {
            name: {k: v.clone() for k, v in getattr(self, name).state_dict().items()}
            for name in ("loss", "hits", "targets")
        }
        state["pending"] = [tuple(v.clone() for v in step) for step in self._pending]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore running sums saved on any device onto this metric's device."""
        self._pending = [
            tuple(v.to(self.device) for v in step) for step in state.get("pending", [])
        ]
        for name in ("loss", "hits", "targets"):
            metric = getattr(self, name)
            metric.load_state_dict(state[name])
            metric.to(self.device)
