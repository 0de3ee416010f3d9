"""The protocol's validation users and dense training samples, on a hand-made event log."""

from __future__ import annotations

import numpy as np

from recsys.data.protocol import Events, ProtocolConfig, split

# Four users; user u has 4 + u events, at times 10·u + k: user 3's last event is the latest.
USERS = np.concatenate([np.full(4 + u, u) for u in range(4)])
ITEMS = np.concatenate([np.arange(4 + u) + 10 * u for u in range(4)])  # 4+5+6+7 = 22 items
TIMES = np.concatenate([10 * u + np.arange(4 + u) for u in range(4)])
EVENTS = Events(USERS, ITEMS, ITEMS % 3, TIMES)


def _rows(table) -> list[dict]:
    return table.to_pylist()


def test_default_split_has_no_extra_datasets() -> None:
    assert split(EVENTS, ProtocolConfig(test_quantile=0.25)).extra == {}


def test_validation_users_are_the_latest_training_users() -> None:
    result = split(EVENTS, ProtocolConfig(test_quantile=0.25, valid_users=0.5))
    train = {r["user_id"] for r in _rows(result.ctr_train)}
    test = {r["user_id"] for r in _rows(result.ctr_test)}
    assert train == {0, 1} and test == {
        2,
        3,
    }  # rank ⌊0.25·4⌋ = 1 is user 1: users 2 and 3 end later
    assert {r["user_id"] for r in _rows(result.extra["ctr_valid"])} == {1}
    assert {r["user_id"] for r in _rows(result.extra["ctr_fit"])} == {0}
    # ctr_train keeps every training user, fit + valid split it exactly.
    fit_valid = _rows(result.extra["ctr_fit"]) + _rows(result.extra["ctr_valid"])
    key = lambda r: (r["user_id"], r["label"])  # noqa: E731
    assert sorted(fit_valid, key=key) == sorted(_rows(result.ctr_train), key=key)
    assert result.counts["valid_users"] == 1


def test_dense_training_samples_every_position() -> None:
    result = split(EVENTS, ProtocolConfig(test_quantile=0.25, dense_train=True, max_history=2))
    rows = _rows(result.extra["ctr_train_dense"])
    # Users 0 and 1 (dense ids) have 4 and 5 events: 3 + 4 targets, a positive and a
    # negative each.
    assert len(rows) == 2 * (3 + 4)
    positives = [r for r in rows if r["label"] == 1]
    user1 = [r for r in positives if r["user_id"] == 1]
    # Dense item ids follow the sorted raw ids: user 1's items are 4..8 in time order.
    assert [r["item_id"] for r in user1] == [5, 6, 7, 8]
    assert [r["history_item_ids"] for r in user1] == [[4], [4, 5], [5, 6], [6, 7]]
    assert [r["timestamp"] for r in user1] == [11, 12, 13, 14]
    for pos, neg in zip(rows[::2], rows[1::2], strict=True):  # each positive, then its negative
        assert neg["label"] == 0 and neg["item_id"] != pos["item_id"]
        assert neg["history_item_ids"] == pos["history_item_ids"]
        raw = np.unique(ITEMS)[neg["item_id"]]  # a candidate's category is its item's
        assert neg["category_id"] == raw % 3
    # The last position's positive is exactly the standard sample's.
    standard = [r for r in _rows(result.ctr_train) if r["label"] == 1]
    assert [r for r in positives if r["item_id"] in (3, 8)] == standard
    # Evaluation is unchanged by the option.
    plain = split(EVENTS, ProtocolConfig(test_quantile=0.25, max_history=2))
    assert result.ctr_test.equals(plain.ctr_test) and result.ctr_train.equals(plain.ctr_train)
