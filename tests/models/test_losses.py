"""The sampled-softmax loss against a plain reference, and its full-softmax limit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recsys.models.generative import sampled_softmax_loss


def reference(hidden, positive, negatives, valid, scoring, temperature):
    """One position at a time, as written in GPSD §2.1; returns the loss and the hits."""
    losses, hits = [], 0
    for b in range(hidden.shape[0]):
        for t in range(hidden.shape[1]):
            if not valid[b, t]:
                continue
            h, p, n = hidden[b, t], positive[b, t], negatives[b]
            if scoring == "cosine":
                h, p, n = F.normalize(h, dim=0), F.normalize(p, dim=0), F.normalize(n, dim=1)
            scores = torch.cat([(h @ p)[None], n @ h]) / temperature
            losses.append(-torch.log_softmax(scores, 0)[0])
            hits += int((scores[0] > scores[1:]).all())
    return torch.stack(losses).mean(), hits


@pytest.mark.parametrize(("scoring", "temperature"), [("dot", 1.0), ("cosine", 0.05)])
def test_matches_reference(scoring: str, temperature: float) -> None:
    torch.manual_seed(0)
    hidden, positive = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    negatives = torch.randn(3, 7, 8)
    valid = torch.arange(5)[None, :] < torch.tensor([[5], [2], [4]])
    loss, hits = sampled_softmax_loss(
        hidden, positive, negatives, valid, scoring=scoring, temperature=temperature
    )
    expected, expected_hits = reference(hidden, positive, negatives, valid, scoring, temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(hits) == expected_hits


def test_all_items_as_negatives_is_cross_entropy() -> None:
    torch.manual_seed(1)
    items = torch.randn(20, 8)
    hidden = torch.randn(2, 4, 8)
    targets = torch.randint(0, 20, (2, 4))
    valid = torch.ones(2, 4, dtype=torch.bool)
    everything = items[None].expand(2, -1, -1)
    accidental = targets[..., None] == torch.arange(20)[None, None, :]
    loss, _ = sampled_softmax_loss(hidden, items[targets], everything, valid, accidental=accidental)
    full = F.cross_entropy((hidden @ items.T).view(-1, 20), targets.view(-1))
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_uniform_scores_give_log_k_plus_one() -> None:
    hidden = torch.zeros(1, 3, 4)
    loss, _ = sampled_softmax_loss(
        hidden, torch.randn(1, 3, 4), torch.randn(1, 9, 4), torch.ones(1, 3, dtype=torch.bool)
    )
    assert loss.item() == pytest.approx(math.log(10), rel=1e-6)
