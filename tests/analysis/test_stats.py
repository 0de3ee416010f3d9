"""Error bars and power-law fits on numbers with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys.analysis.stats import EXPONENT_BOUNDS, auc_standard_error, fit_power_law, mean_std


def test_hanley_mcneil_at_chance_has_its_closed_form() -> None:
    # At AUC 0.5: Q1 = 1/3, Q2 = 1/3, so var = (1/4 + (m + n − 2)/12) / (m·n).
    m = n = 282
    expected = math.sqrt((0.25 + (m + n - 2) / 12) / (m * n))
    assert auc_standard_error(0.5, m, n) == pytest.approx(expected, rel=1e-12)


def test_hanley_mcneil_matches_the_spread_of_auc_over_resampled_test_sets() -> None:
    # Scores of positives ~ N(1, 1), negatives ~ N(0, 1): AUC = Φ(1/√2) ≈ 0.760.
    rng = np.random.default_rng(0)
    m = n = 282
    aucs = []
    for _ in range(400):
        scores = torch.from_numpy(np.concatenate([rng.normal(1, 1, m), rng.normal(0, 1, n)]))
        labels = torch.cat([torch.ones(m, dtype=torch.long), torch.zeros(n, dtype=torch.long)])
        aucs.append(float(binary_auroc(scores, labels)))
    spread = float(np.std(aucs, ddof=1))
    assert auc_standard_error(float(np.mean(aucs)), m, n) == pytest.approx(spread, rel=0.15)


def test_mean_std_is_the_sample_deviation() -> None:
    assert mean_std([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1))
    assert mean_std([0.75]) == (0.75, 0.0)


def test_power_law_fit_recovers_its_asymptote() -> None:
    n = np.array([1.3e4, 5e4, 2.1e5, 8.5e5, 3.4e6])
    law = fit_power_law(list(n), list(0.7097 - 0.9 * n**-0.25))
    assert law is not None
    assert law.asymptote == pytest.approx(0.7097, abs=2e-3)
    assert law.exponent == pytest.approx(0.25, rel=0.1) and law.rmse < 1e-4


def test_no_rising_law_through_falling_points_or_too_few_sizes() -> None:
    assert fit_power_law([1e4, 1e5, 1e6], [0.70, 0.68, 0.65]) is None
    assert fit_power_law([1e4, 1e4, 1e5], [0.60, 0.61, 0.65]) is None


def test_the_report_says_what_a_fitted_law_cannot_show() -> None:
    from recsys.report import law_caveat

    low, high = EXPONENT_BOUNDS
    assert law_caveat(None) == ""
    assert law_caveat({"asymptote": 0.71, "scale": 0.9, "exponent": 0.25}) == ""
    assert "grows like log N" in law_caveat({"asymptote": 30.0, "scale": 30.0, "exponent": low})
    assert "no power law" in law_caveat({"asymptote": 0.9, "scale": 1.0, "exponent": high})
    assert "above 1" in law_caveat({"asymptote": 1.03, "scale": 1.2, "exponent": 0.18})
