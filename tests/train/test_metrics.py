"""Metrics against plain reference computations on fixed data, and across 2 ranks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from recsys.distributed.env import distributed
from recsys.distributed.launch import run_on_ranks
from recsys.train.metrics import CTRMetrics, PretrainMetrics, grouped_auc

SCORES = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.5, 0.5, 0.2, 0.7, 0.1, 0.6, 0.4, 0.4])
LABELS = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
USERS = torch.tensor([3, 3, 3, 3, 8, 8, 8, 1, 1, 5, 5, 5])  # user 5: positives only


def pairwise_auc(scores: list[float], labels: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def reference_gauc() -> float:
    total, weight = 0.0, 0
    for user in USERS.unique().tolist():
        mask = user == USERS
        labels = LABELS[mask].tolist()
        if 0 < sum(labels) < len(labels):
            total += len(labels) * pairwise_auc(SCORES[mask].tolist(), labels)
            weight += len(labels)
    return total / weight


def logits(scores: torch.Tensor) -> torch.Tensor:
    return torch.log(scores / (1 - scores))


def test_auc_logloss_gauc_equal_references() -> None:
    metrics = CTRMetrics()
    metrics.update(logits(SCORES[:5]), LABELS[:5], USERS[:5])
    metrics.update(logits(SCORES[5:]), LABELS[5:], USERS[5:])
    result = metrics.compute()
    assert result["auc"] == pytest.approx(pairwise_auc(SCORES.tolist(), LABELS.tolist()))
    expected_logloss = (
        -sum(
            math.log(s) if y else math.log(1 - s)
            for s, y in zip(SCORES.tolist(), LABELS.tolist(), strict=True)
        )
        / 12
    )
    assert result["logloss"] == pytest.approx(expected_logloss, rel=1e-5)
    assert result["gauc"] == pytest.approx(reference_gauc(), rel=1e-6)
    # NE: the logloss over the entropy of the click rate (7 of 12); calibration: predicted
    # clicks over actual ones
    rate = 7 / 12
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert result["ne"] == pytest.approx(expected_logloss / entropy, rel=1e-5)
    assert result["calibration"] == pytest.approx(sum(SCORES.tolist()) / 7, rel=1e-5)


def test_a_constant_prediction_of_the_click_rate_has_ne_one_and_is_calibrated() -> None:
    metrics = CTRMetrics()
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    metrics.update(torch.full((4,), math.log(0.25 / 0.75)), labels, torch.arange(4))
    result = metrics.compute()
    assert result["ne"] == pytest.approx(1.0, rel=1e-9)
    assert result["calibration"] == pytest.approx(1.0, rel=1e-9)


def test_grouped_auc_skips_one_label_users_and_handles_ties() -> None:
    auc, weight = grouped_auc(SCORES, LABELS, USERS)
    assert weight.tolist() == [2.0, 4.0, 3.0]  # users 1, 3, 8; user 5 has no negative
    assert auc.tolist() == pytest.approx(
        [1.0, pairwise_auc([0.9, 0.8, 0.8, 0.3], [1, 0, 1, 0]), 0.75]
    )


def test_metric_state_survives_a_checkpoint() -> None:
    first = CTRMetrics()
    first.update(logits(SCORES[:6]), LABELS[:6], USERS[:6])
    resumed = CTRMetrics()
    resumed.load_state_dict(first.state_dict())
    resumed.update(logits(SCORES[6:]), LABELS[6:], USERS[6:])
    whole = CTRMetrics()
    whole.update(logits(SCORES), LABELS, USERS)
    assert resumed.compute() == whole.compute()


def test_pretrain_hit_rate() -> None:
    metrics = PretrainMetrics()
    metrics.update(torch.tensor(2.0), torch.tensor(3), torch.tensor(10))
    metrics.update(torch.tensor(1.0), torch.tensor(5), torch.tensor(30))
    result = metrics.compute()
    assert result["hit_rate"] == pytest.approx(8 / 40)
    assert result["loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)


def _split_over_ranks() -> list[dict[str, float]]:
    with distributed("cpu") as env:
        results = []
        # Row 5 splits user 8 across the ranks; then one rank has no samples at all; then
        # neither has any.
        for cut in (5, 12, 0):
            rows = slice(0, cut) if env.rank == 0 else slice(cut, 12 if cut else 0)
            metrics = CTRMetrics()
            if rows.stop > rows.start:
                metrics.update(logits(SCORES[rows]), LABELS[rows], USERS[rows])
            results.append(metrics.compute())
        return results


@pytest.mark.dist
def test_two_ranks_report_what_one_process_does() -> None:
    single = CTRMetrics()
    single.update(logits(SCORES), LABELS, USERS)
    expected = single.compute()
    for split, one_empty, empty in run_on_ranks(_split_over_ranks, world_size=2):
        assert split == pytest.approx(expected, rel=1e-6)
        assert one_empty == pytest.approx(expected, rel=1e-6)
        assert empty["samples"] == 0
        assert all(math.isnan(v) for k, v in empty.items() if k != "samples")


def test_pretrain_metrics_resume_their_running_sums() -> None:
    from recsys.train.metrics import PretrainMetrics

    whole, first = PretrainMetrics(), PretrainMetrics()
    parts = [
        (torch.tensor(2.0), torch.tensor(3), torch.tensor(10)),
        (torch.tensor(1.0), torch.tensor(1), torch.tensor(30)),
    ]
    for part in parts:
        whole.update(*part)
    first.update(*parts[0])
    resumed = PretrainMetrics()
    resumed.load_state_dict(first.state_dict())
    resumed.update(*parts[1])
    assert resumed.compute() == whole.compute()
    assert whole.compute() == {"loss": 1.25, "hit_rate": 0.1}


def test_pretrain_metrics_resumed_with_pending_steps_add_up_as_the_whole_run() -> None:
    from recsys.train.metrics import PretrainMetrics

    # Float32 sums that depend on their grouping: 1 + 1e8 - 1e8 is 0 added at once, 1 added
    # as 1 and then 1e8 - 1e8. A checkpoint between steps must not change the grouping.
    steps = [(torch.tensor(x), torch.tensor(1), torch.tensor(1)) for x in (1.0, 1e8, -1e8)]
    whole, first = PretrainMetrics(), PretrainMetrics()
    for step in steps:
        whole.update(*step)
    first.update(*steps[0])
    resumed = PretrainMetrics()
    resumed.load_state_dict(first.state_dict())
    for step in steps[1:]:
        resumed.update(*step)
    assert resumed.compute() == whole.compute()
