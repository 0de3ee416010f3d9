"""Schedule shape, parameter split, and the fused table optimizer."""

from __future__ import annotations

import itertools

import pytest

from recsys.models.ctr import CTRConfig, CTRModel
from recsys.models.tower import TowerConfig
from recsys.train.optim import OptimConfig, dense_optimizer, dense_parameters, lr_factor


def test_warmup_then_cosine_to_ten_percent() -> None:
    config = OptimConfig(warmup_steps=10, total_steps=110)
    factors = [lr_factor(s, config) for s in range(130)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(factors[:10]))  # warm-up rises
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert factors[110] == pytest.approx(0.1) and factors[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))  # then never rises


def test_dense_optimizer_leaves_tables_out_and_follows_the_schedule() -> None:
    model = CTRModel(CTRConfig(TowerConfig.from_name("L1H16A2"), 50, {"category": 5}))
    names = set(dense_parameters(model))
    assert names and not any(n.startswith("sparse.") for n in names)
    assert "segment" in names and "head.0.weight" in names
    config = OptimConfig(lr=1e-2, warmup_steps=4, total_steps=20)
    optimizer, schedule = dense_optimizer(model, config)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["weight_decay"] == 0.1
    rates = []
    for _ in range(6):
        rates.append(group["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])


def test_bad_config_is_named() -> None:
    with pytest.raises(ValueError, match="sparse optimizer must be one of"):
        OptimConfig(sparse="sgd")
    with pytest.raises(ValueError, match="min_lr_ratio must lie in"):
        OptimConfig(min_lr_ratio=2.0)


def test_unset_schedule_lengths_are_fitted_to_the_run() -> None:
    unset = OptimConfig()
    assert (unset.warmup_steps, unset.total_steps) == (None, None)
    assert (unset.fitted(150).warmup_steps, unset.fitted(150).total_steps) == (15, 150)
    assert (unset.fitted(5000).warmup_steps, unset.fitted(5000).total_steps) == (100, 5000)
    assert unset.fitted(1).warmup_steps == 0  # a one-step run: no warm-up
    given = OptimConfig(warmup_steps=3, total_steps=30)
    assert given.fitted(150) == given
    assert OptimConfig(total_steps=30).fitted(150).warmup_steps == 15  # 10% of the run
    model = CTRModel(CTRConfig(TowerConfig.from_name("L1H16A2"), 50, {"category": 5}))
    with pytest.raises(ValueError, match="the schedule's lengths are unset"):
        dense_optimizer(model, unset)
