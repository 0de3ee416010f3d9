"""AUC of samples that are all one class is undefined (NaN), not 0.0, so a stage refuses it."""

from __future__ import annotations

import math

import torch

from recsys.train.metrics import CTRMetrics


def test_auc_of_one_class_is_nan() -> None:
    for label in (0.0, 1.0):
        metrics = CTRMetrics()
        logits = torch.tensor([0.3, -1.0, 2.0, 0.5])
        metrics.update(logits, torch.full((4,), label), torch.tensor([1, 2, 3, 4]))
        results = metrics.compute()
        assert math.isnan(results["auc"]), (label, results)
        assert math.isnan(results["gauc"])
        assert math.isnan(results["ne"]) and math.isnan(results["calibration"])
        assert math.isfinite(results["logloss"])
        assert results["samples"] == 4.0


def test_auc_of_both_classes_is_unchanged() -> None:
    metrics = CTRMetrics()
    metrics.update(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]), torch.tensor([1, 1]))
    assert metrics.compute()["auc"] == 1.0
