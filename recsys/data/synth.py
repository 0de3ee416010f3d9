"""Synthetic behaviour logs with a planted structure and a known answer.

This module owns the generator behind ``recsys data synth``, the default data of the tests and
the fallback demo. The world it simulates:

- items fall into ``categories`` latent clusters of equal size; within a cluster, item
  popularity follows a Zipf law with exponent ``zipf``;
- each user walks between clusters: the first event's cluster is uniform, and before every
  later event the user stays in the current cluster with probability ``stay`` and otherwise
  jumps to a uniformly drawn cluster;
- each event clicks an item of the current cluster, drawn by popularity; timestamps grow by
  random gaps from a random start;
- with ``conditions`` = K > 0, every event also has a condition, uniform over K values (LUM's
  condition token: a scenario, a behaviour type), and each user walks K independent walks,
  one per condition: an event clicks from the current cluster of its condition's walk, so
  the next item depends on the condition (the planted condition effect);
- the ``category`` side feature is the cluster itself, or with ``merge`` > 1 a coarse group of
  ``merge`` clusters: the exact cluster is then hidden from the side feature and only the
  items' co-occurrence reveals it (what pretraining learns and sparse CTR labels hardly do).

The known answer: a scorer that knows the structure ("is the candidate in the cluster of the
user's last event?") reaches a test AUC of about ``oracle_auc(stay, categories)``; the
generator records the AUC it actually reaches on the test split. A sequence model can learn
the clusters from co-occurrence; popularity alone cannot.

The events then go through the same GPSD protocol as the public datasets. Deterministic by
seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from recsys.data.protocol import Events, ProtocolConfig, Split, split


@dataclass(frozen=True)
class SynthConfig:
    """Size and structure of a synthetic log."""

    users: int = 1_000
    items: int = 500
    categories: int = 10
    """Latent clusters; also the category side feature."""
    min_events: int = 10
    """Shortest user sequence (uniform between min_events and max_events)."""
    max_events: int = 50
    stay: float = 0.8
    """Probability of staying in the current cluster before each event."""
    zipf: float = 1.0
    """Popularity exponent within a cluster."""
    merge: int = 1
    """Clusters per value of the category side feature (1: the side feature is the cluster)."""
    conditions: int = 0
    """Values of the ``condition`` feature, each with its own walk per user (0: none)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.users < 1 or self.categories < 1:
            raise ValueError("users and categories must be >= 1")
        if self.items < 2 * self.categories or self.items % self.categories:
            raise ValueError(
                f"items ({self.items}) must be a multiple of categories "
                f"({self.categories}) with at least 2 items per category"
            )
        if not 2 <= self.min_events <= self.max_events:
            raise ValueError("need 2 <= min_events <= max_events")
        if self.merge < 1 or self.categories % self.merge:
            raise ValueError(
                f"merge ({self.merge}) must be >= 1 and divide categories ({self.categories})"
            )
        if self.conditions < 0:
            raise ValueError(f"conditions must be >= 0, got {self.conditions}")
        if not 0.0 <= self.stay <= 1.0:
            raise ValueError(f"stay must lie in [0, 1], got {self.stay}")


def oracle_auc(stay: float, categories: int) -> float:
    """Expected AUC of "candidate in the last event's cluster" against uniform negatives."""
    p_pos = stay + (1 - stay) / categories  # the next event stays in (or returns to) the cluster
    p_neg = 1 / categories
    return p_pos * (1 - p_neg) + 0.5 * (p_pos * p_neg + (1 - p_pos) * (1 - p_neg))


def generate(config: SynthConfig) -> Events:
    """The events of ``config``'s world."""
    rng = np.random.default_rng(config.seed)
    per_cluster = config.items // config.categories
    lengths = rng.integers(config.min_events, config.max_events + 1, size=config.users)
    total = int(lengths.sum())
    user = np.repeat(np.arange(config.users, dtype=np.int64), lengths)
    first = np.zeros(total, dtype=bool)
    first[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    if config.conditions:
        cluster, condition = _walks_per_condition(config, rng, user, total)
    else:
        # A new segment starts at each user's first event and at each jump; its cluster is
        # uniform.
        new_segment = first | (rng.random(total) >= config.stay)
        segment = np.cumsum(new_segment) - 1
        cluster = rng.integers(0, config.categories, size=int(new_segment.sum()))[segment]
    weights = 1.0 / np.arange(1, per_cluster + 1) ** config.zipf
    rank = np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(total), side="right")
    rank = np.minimum(rank, per_cluster - 1)
    # Shuffle item ids so that neither id order nor id blocks reveal clusters or popularity.
    item_ids = rng.permutation(config.items).astype(np.int64)
    item = item_ids[cluster * per_cluster + rank]
    start = rng.integers(0, 10_000_000, size=config.users)
    gaps = rng.integers(1, 3_600, size=total)
    gaps[first] = 0
    timestamp = np.repeat(start, lengths) + _cumsum_per_user(gaps, lengths)
    side = (cluster // config.merge).astype(np.int64)
    conditions = {"condition": condition} if config.conditions else {}
    return Events(user, item, side, timestamp.astype(np.int64), conditions)


def _walks_per_condition(
    config: SynthConfig, rng: np.random.Generator, user: np.ndarray, total: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each event's condition (uniform) and cluster: one walk per (user, condition), taken
    in event order among that user's events of that condition."""
    condition = rng.integers(0, config.conditions, size=total)
    walk = user * config.conditions + condition
    order = np.argsort(walk, kind="stable")  # events of a walk together, in event order
    in_order = walk[order]
    first = np.ones(total, dtype=bool)
    first[1:] = in_order[1:] != in_order[:-1]
    new_segment = first | (rng.random(total) >= config.stay)
    segment = np.cumsum(new_segment) - 1
    cluster = np.empty(total, dtype=np.int64)
    cluster[order] = rng.integers(0, config.categories, size=int(new_segment.sum()))[segment]
    return cluster, condition.astype(np.int64)


def _cumsum_per_user(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    total = np.cumsum(values)
    offsets = np.repeat(np.concatenate([[0], total[np.cumsum(lengths)[:-1] - 1]]), lengths)
    return total - offsets


def measured_oracle_auc(result: Split) -> float:
    """The oracle's AUC on the test split ("candidate in the cluster of the last event"; with
    ``merge`` > 1, in the side-feature group of the last event: a weaker scorer)."""
    table = result.ctr_test
    history = table.column("history_category_ids").combine_chunks()
    ends = np.asarray(history.offsets)[1:]
    last = np.asarray(history.values)[ends - 1]
    score = np.asarray(table.column("category_id")) == last
    label = np.asarray(table.column("label")) == 1
    p_pos, p_neg = score[label].mean(), score[~label].mean()
    return float(p_pos * (1 - p_neg) + 0.5 * (p_pos * p_neg + (1 - p_pos) * (1 - p_neg)))


def make(config: SynthConfig, protocol: ProtocolConfig | None = None) -> tuple[Split, dict]:
    """Generate, split with the GPSD protocol; return the split and its source description."""
    protocol = protocol or ProtocolConfig(min_events=min(4, config.min_events), seed=config.seed)
    result = split(generate(config), protocol)
    source = {
        "converter": "synth",
        "synth": asdict(config),
        "oracle_auc_expected": round(oracle_auc(config.stay, config.categories), 4),
        "oracle_auc_test": round(measured_oracle_auc(result), 4),
    }
    return result, source
