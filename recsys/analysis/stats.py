"""Error bars and the scaling law of a study's AUCs.

This module owns three computations on plain numbers (no files):

- :func:`auc_standard_error`: the standard error of one AUC on a test set of ``positives``
  and ``negatives`` (Hanley & McNeil, 1982, "The meaning and use of the area under a ROC
  curve", Radiology 143, eq. 2): the sampling error of the test set, which averaging seeds on
  the same test set does not shrink;
- :func:`mean_std`: mean and sample standard deviation over seeds;
- :func:`fit_power_law`: ``AUC(N) = A − B·N^(−α)`` over dense parameter counts ``N``, the form
  of GPSD's Figure 5 (the asymptote ``A`` is its "empirical upper bound of AUC"), fitted by
  least squares: for each ``α`` on a grid, ``A`` and ``B`` are linear and solved exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil's standard error of ``auc`` measured on ``positives`` + ``negatives``
    samples."""
    if positives < 1 or negatives < 1:
        raise ValueError(f"need positives and negatives, got {positives} and {negatives}")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)
    ) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


@dataclass(frozen=True)
class PowerLaw:
    """``AUC(N) = asymptote − scale·N^(−exponent)``."""

    asymptote: float
    scale: float
    exponent: float
    rmse: float
    """Root mean square error of the fit on the points it was fitted to."""

    def __call__(self, n: np.ndarray | float) -> np.ndarray | float:
        return self.asymptote - self.scale * np.power(n, -self.exponent)


EXPONENT_BOUNDS = (1e-3, 2.0)
"""The range of exponents :func:`fit_power_law` searches (400 steps, geometric)."""


def fit_power_law(params: list[float], aucs: list[float]) -> PowerLaw | None:
    """The least-squares power law through ``(params, aucs)`` with a rising curve
    (``scale`` > 0, ``exponent`` in (0, 2]); None with fewer than 3 distinct sizes or when
    no rising law fits (AUC falling with size: the law does not hold)."""
    n = np.asarray(params, dtype=np.float64)
    y = np.asarray(aucs, dtype=np.float64)
    if len(np.unique(n)) < 3:
        return None
    best: PowerLaw | None = None
    for exponent in np.geomspace(*EXPONENT_BOUNDS, 400):
        x = np.power(n, -exponent)
        design = np.stack([np.ones_like(x), -x], axis=1)
        (asymptote, scale), *_ = np.linalg.lstsq(design, y, rcond=None)
        if scale <= 0:
            continue
        rmse = float(np.sqrt(np.mean((design @ [asymptote, scale] - y) ** 2)))
        if best is None or rmse < best.rmse:
            best = PowerLaw(float(asymptote), float(scale), float(exponent), rmse)
    return best
