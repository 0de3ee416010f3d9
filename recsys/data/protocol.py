"""GPSD's public data protocol: behaviour events → pretraining sequences and CTR samples.

This module owns the split every converter shares (GPSD, KDD'25, §4.1, and its public code):

- ids are remapped densely (items, categories, users, in sorted order of the raw ids); each
  table's vocabulary (the raw keys, then the reserved unknown and padding ids:
  ``recsys.data.vocab``) is written to ``vocab/`` beside the splits;
- users with fewer than ``min_events`` events are dropped (4 for Amazon and MovieLens, 10 for
  Taobao);
- each user's events are ordered by time (ties keep input order);
- users whose last event is later than the ``test_quantile`` (70%) quantile of all users'
  last-event times (the time of the user at rank ⌊0.7·n⌋) are test users, the others
  training users;
- each user gives two CTR samples: the last event's item as the positive candidate and one
  uniformly drawn other item as the negative, both with the earlier events (the most recent
  ``max_history`` = 200) as history;
- pretraining sequences are every user's events except the last one, so no CTR target is
  ever pretrained on.

Two options beyond the paper's protocol, off by default:

- ``valid_users``: a fraction of the training users, those whose last event is latest (the
  test split's rule again, inside the training users), become validation users: their pairs
  go to ``ctr_valid`` and the others' to ``ctr_fit``, for tuning without the test users
  (``ctr_train`` still holds every training user, for the final runs);
- ``dense_train``: ``ctr_train_dense`` (and ``ctr_fit_dense``) hold one pair per position of
  each training user's sequence instead of one per user: every event after the first, with
  the events before it as history, and one uniformly drawn other item as its negative. The
  test (and validation) samples are unchanged.

It works on whole NumPy arrays; it reads and writes no files except through
:func:`write_split`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from recsys.data.schema import DataError, DatasetMeta
from recsys.data.vocab import DIRECTORY, RESERVED, Vocabulary, references, write_all
from recsys.data.writer import atomic_directory, write_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProtocolConfig:
    """Parameters of the split."""

    min_events: int = 4
    """Users with fewer events are dropped."""
    test_quantile: float = 0.7
    """Users whose last event is later than this quantile of last-event times are test users."""
    max_history: int = 200
    """Most recent events kept as a CTR sample's history."""
    seed: int = 0
    """Seed of the negative candidates."""
    valid_users: float = 0.0
    """Fraction of training users (the latest by last event) held out as validation users:
    ``ctr_valid`` and ``ctr_fit`` (0: none)."""
    dense_train: bool = False
    """Also write ``ctr_train_dense`` (and ``ctr_fit_dense``): a pair per position of each
    training user's sequence."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.valid_users < 1.0:
            raise ValueError(f"valid_users must lie in [0, 1), got {self.valid_users}")
        if self.min_events < 2:
            raise ValueError(f"min_events must be >= 2 (history + target), got {self.min_events}")
        if not 0.0 < self.test_quantile < 1.0:
            raise ValueError(f"test_quantile must lie in (0, 1), got {self.test_quantile}")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")


@dataclass
class Events:
    """Behaviour events with raw ids, one entry per event."""

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    """The category of each event's item."""
    timestamp: np.ndarray
    conditions: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-event condition features by name (LUM's condition tokens: rating level,
    scenario, behaviour type...), raw values remapped densely like the ids."""


@dataclass
class Split:
    """The protocol's output: three tables and what produced them."""

    seq: pa.Table
    ctr_train: pa.Table
    ctr_test: pa.Table
    vocab: dict[str, int]
    counts: dict[str, int]
    protocol: dict[str, Any] = field(default_factory=dict)
    conditions: list[str] = field(default_factory=list)
    """Condition features of the events (``<name>_ids`` lists in ``seq``,
    ``history_<name>_ids`` in ``ctr``)."""
    extra: dict[str, pa.Table] = field(default_factory=dict)
    """Optional ``ctr`` datasets by name: ``ctr_valid``, ``ctr_fit``, ``ctr_train_dense``,
    ``ctr_fit_dense`` (see the module docstring)."""
    vocabularies: dict[str, Vocabulary] = field(default_factory=dict)
    """The raw keys of every table's ids and of the users' (``recsys.data.vocab``)."""


def _dense(raw: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Dense ids of ``raw`` keys, how many keys there are, and the keys in id order."""
    uniques, dense = np.unique(raw, return_inverse=True)
    return dense.astype(np.int64), len(uniques), uniques


def spans(offsets_start: np.ndarray, offsets_end: np.ndarray, values: np.ndarray) -> pa.Array:
    """A list<int64> array whose row i is ``values[offsets_start[i]:offsets_end[i]]`` (the
    lists every split writes; the streaming generator writes its blocks with it too)."""
    lengths = offsets_end - offsets_start
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(offsets_start - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.LargeListArray.from_arrays(offsets, values[index]).cast(pa.list_(pa.int64()))


def split(events: Events, config: ProtocolConfig | None = None) -> Split:
    """Apply the protocol to ``events``."""
    config = config or ProtocolConfig()
    n_in = len(events.user)
    if not (len(events.item) == len(events.category) == len(events.timestamp) == n_in):
        raise DataError("events: user, item, category and timestamp arrays differ in length")
    for name, values in events.conditions.items():
        if len(values) != n_in:
            raise DataError(f"events: condition {name!r} has {len(values)} values, not {n_in}")
        if name in ("item", "category", "user"):
            raise DataError(f"events: condition {name!r} has the name of a feature")
    if n_in == 0:
        raise DataError("events: no events to convert")
    users_in = len(np.unique(events.user))
    # Drop users with too few events before remapping, so vocabularies hold only kept ids.
    _, user_of, counts = np.unique(events.user, return_inverse=True, return_counts=True)
    keep = counts[user_of] >= config.min_events
    if not keep.any():
        raise DataError(f"events: no user has at least {config.min_events} events")
    user, n_users, user_keys = _dense(events.user[keep])
    item, n_items, item_keys = _dense(events.item[keep])
    category, n_categories, category_keys = _dense(events.category[keep])
    timestamp = events.timestamp[keep].astype(np.int64)
    conditions = {name: _dense(values[keep]) for name, values in events.conditions.items()}
    if n_items < 2:
        raise DataError("events: a negative candidate needs at least 2 distinct items")

    order = np.lexsort((np.arange(len(user)), timestamp, user))  # by user, time, input order
    user, item, category, timestamp = user[order], item[order], category[order], timestamp[order]
    condition = {name: values[order] for name, (values, _, _) in conditions.items()}
    starts = np.searchsorted(user, np.arange(n_users), side="left")
    ends = np.searchsorted(user, np.arange(n_users), side="right")
    last = ends - 1
    last_time = timestamp[last]
    # The quantile is the last-event time of the user at rank ⌊q·n⌋ in time order; this is
    # the rule that gives GPSD's published ML-100K split (661 train / 282 test users).
    threshold = np.sort(last_time)[min(int(config.test_quantile * n_users), n_users - 1)]
    test = last_time > threshold

    rng = np.random.default_rng(config.seed)
    negative = rng.integers(0, n_items - 1, size=n_users)
    negative += negative >= item[last]  # uniform over the other n_items - 1 items

    seq = pa.table(
        {
            "user_id": pa.array(np.arange(n_users, dtype=np.int64)),
            "item_ids": spans(starts, last, item),
            "category_ids": spans(starts, last, category),
            **{f"{n}_ids": spans(starts, last, v) for n, v in condition.items()},
            "timestamps": spans(starts, last, timestamp),
        }
    )

    # A candidate's category is its item's category (negatives are not events).
    item_category = np.zeros(n_items, dtype=np.int64)
    item_category[item] = category

    def ctr(users: np.ndarray, positions: np.ndarray | None = None) -> pa.Table:
        """A positive and a negative sample per target event: each user's last event, or
        the given events (``positions``, indices into the sorted events, one per entry of
        ``users``)."""
        target = last[users] if positions is None else positions
        if positions is None:
            negatives = negative[users]
        else:  # fresh negatives for the dense positions, uniform over the other items
            negatives = dense_rng.integers(0, n_items - 1, size=len(target))
            negatives += negatives >= item[target]
        pair = np.repeat(np.arange(len(target)), 2)  # positive then negative of each target
        is_pos = np.tile([True, False], len(target))
        at = target[pair]
        hist_start = np.maximum(starts[users[pair]], at - config.max_history)
        candidate = np.where(is_pos, item[at], negatives[pair])
        return pa.table(
            {
                "user_id": pa.array(users[pair].astype(np.int64)),
                "history_item_ids": spans(hist_start, at, item),
                "history_category_ids": spans(hist_start, at, category),
                **{f"history_{n}_ids": spans(hist_start, at, v) for n, v in condition.items()},
                "item_id": pa.array(candidate.astype(np.int64)),
                "category_id": pa.array(item_category[candidate]),
                "label": pa.array(is_pos.astype(np.int64)),
                "timestamp": pa.array(timestamp[at]),
            }
        )

    def dense(users: np.ndarray) -> pa.Table:
        """Every event after the first of each user as a target."""
        counts = last[users] - starts[users]  # events after the first, the last included
        owner = np.repeat(users, counts)
        first = np.repeat(starts[users] + 1 - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return ctr(owner, first + np.arange(counts.sum()))

    dense_rng = np.random.default_rng([config.seed, 1])
    train_users, test_users = np.flatnonzero(~test), np.flatnonzero(test)
    extra: dict[str, pa.Table] = {}
    valid_users = np.zeros(0, dtype=np.int64)
    if config.valid_users:
        by_time = train_users[np.lexsort((train_users, last_time[train_users]))]
        n_valid = max(1, round(config.valid_users * len(train_users)))
        if n_valid >= len(train_users):
            raise DataError(
                f"valid_users {config.valid_users} leaves no training user to fit on "
                f"({len(train_users)} training users)"
            )
        fit_users, valid_users = np.sort(by_time[:-n_valid]), np.sort(by_time[-n_valid:])
        extra["ctr_valid"], extra["ctr_fit"] = ctr(valid_users), ctr(fit_users)
    if config.dense_train:
        extra["ctr_train_dense"] = dense(train_users)
        if config.valid_users:
            extra["ctr_fit_dense"] = dense(fit_users)
    result = Split(
        seq=seq,
        ctr_train=ctr(train_users),
        ctr_test=ctr(test_users),
        extra=extra,
        vocab={
            "item": n_items + len(RESERVED),
            "category": n_categories + len(RESERVED),
            "user": n_users,
            **{name: size + len(RESERVED) for name, (_, size, _) in conditions.items()},
        },
        vocabularies={
            "item": Vocabulary(
                "item",
                pa.array(item_keys),
                {"category": item_category},
                side_sizes={"category": n_categories},
            ),
            "category": Vocabulary("category", pa.array(category_keys)),
            "user": Vocabulary("user", pa.array(user_keys)),
            **{name: Vocabulary(name, pa.array(keys)) for name, (_, _, keys) in conditions.items()},
        },
        conditions=list(conditions),
        counts={
            "events_in": n_in,
            "users_in": users_in,
            "events": len(user),
            "users": n_users,
            "items": n_items,
            "categories": n_categories,
            "train_users": len(train_users),
            "test_users": len(test_users),
            "train_samples": 2 * len(train_users),
            "test_samples": 2 * len(test_users),
            "sequences": n_users,
            **({"valid_users": len(valid_users)} if config.valid_users else {}),
            **{f"{name}_samples": table.num_rows for name, table in extra.items()},
        },
        protocol={
            "name": "gpsd-public",
            "min_events": config.min_events,
            "test_quantile": config.test_quantile,
            "max_history": config.max_history,
            "seed": config.seed,
            "valid_users": config.valid_users,
            "dense_train": config.dense_train,
        },
    )
    log.info("protocol: %s", ", ".join(f"{k} {v:,}" for k, v in result.counts.items()))
    return result


EMPTY_HINTS = {
    "seq": "no user has --min-events events: lower --min-events or give more events",
    "ctr_train": "every user is a test user: raise --test-quantile (below 1) or give more users",
    "ctr_test": "no user is a test user: lower --test-quantile or give more users",
    "ctr_valid": "no validation user: raise --valid-users or give more users",
    "ctr_fit": "every training user is a validation user: lower --valid-users",
}
"""What to change when a split would have no rows, by split name."""


def _refuse_empty(result: Split, source: dict[str, Any]) -> None:
    """A DataError naming the first split that has no rows and the option to change: a
    dataset of 0 rows cannot be read back."""
    for name, table in (
        ("seq", result.seq),
        ("ctr_train", result.ctr_train),
        ("ctr_test", result.ctr_test),
        *result.extra.items(),
    ):
        if table.num_rows:
            continue
        if name.endswith("_dense"):
            hint = "no training user has 2 events or more: raise --min-events to 2 or more"
        else:
            hint = EMPTY_HINTS.get(name, "give more events")
        if source.get("converter") == "synth":
            hint = hint.replace("give more users", "raise --users").replace(
                "give more events", "raise --users or --min-len"
            )
        counts = ", ".join(
            f"{k} {result.counts[k]:,}"
            for k in ("users", "train_users", "test_users")
            if k in result.counts
        )
        raise DataError(f"split {name} would have 0 rows ({counts}); {hint}")


def write_split(
    out: str | os.PathLike,
    result: Split,
    source: dict[str, Any],
    *,
    overwrite: bool = False,
    row_group_rows: int = 65_536,
) -> dict[str, DatasetMeta]:
    """Write ``out/seq``, ``out/ctr_train``, ``out/ctr_test`` and the optional ``ctr``
    datasets of the split (``ctr_valid``, ...) together, all or nothing."""
    protocol = {**result.protocol, "counts": result.counts, **source}
    _refuse_empty(result, source)
    written = {}
    with atomic_directory(out, overwrite) as tmp:
        vocabularies = references(result.vocabularies)
        for name, table, kind in (
            ("seq", result.seq, "seq"),
            ("ctr_train", result.ctr_train, "ctr"),
            ("ctr_test", result.ctr_test, "ctr"),
            *((name, table, "ctr") for name, table in result.extra.items()),
        ):
            meta = DatasetMeta(
                kind=kind,
                vocab=dict(result.vocab),
                side_features=["category"],
                conditions=list(result.conditions),
                has_timestamps=kind == "seq",
                protocol={**protocol, "split": name},
                vocabularies=vocabularies,
            )
            written[name] = write_dataset(tmp / name, meta, [table], row_group_rows=row_group_rows)
        write_all(tmp / DIRECTORY, result.vocabularies)
    return written
