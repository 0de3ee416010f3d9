"""Condition features (LUM's condition tokens): planted in synthetic logs, declared in the
metadata, carried by the protocol, read by streams that ask for them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recsys.data.protocol import write_split
from recsys.data.stream import ParquetStream, StreamConfig
from recsys.data.synth import SynthConfig, generate, make


def test_each_condition_has_its_own_walk() -> None:
    config = SynthConfig(
        users=400,
        items=400,
        categories=40,
        min_events=20,
        max_events=40,
        stay=0.9,
        conditions=2,
        seed=3,
    )
    events = generate(config)
    condition = events.conditions["condition"]
    assert set(np.unique(condition)) == {0, 1}
    # The cluster (the category here) of an event and of the user's previous event of the
    # same condition agree far more often than with the previous event of the other one.
    same, other = [], []
    for u in np.unique(events.user)[:200]:
        rows = np.flatnonzero(events.user == u)
        last: dict[int, int] = {}
        for r in rows:
            c = int(condition[r])
            if c in last:
                same.append(events.category[r] == events.category[last[c]])
            if 1 - c in last:
                other.append(events.category[r] == events.category[last[1 - c]])
            last[c] = r
    assert np.mean(same) > 0.85 and np.mean(other) < 0.2


def test_conditions_reach_the_metadata_and_only_the_streams_that_ask(tmp_path: Path) -> None:
    result, source = make(
        SynthConfig(users=60, items=40, categories=4, min_events=5, max_events=12, conditions=3)
    )
    tmp_path = tmp_path / "data"
    write_split(tmp_path, result, source, row_group_rows=16)
    meta = json.loads((tmp_path / "seq" / "dataset.json").read_text())
    assert (
        meta["conditions"] == ["condition"] and meta["vocab"]["condition"] == 3 + 2
    )  # and unknown, padding
    plain = next(iter(ParquetStream(str(tmp_path / "seq"), StreamConfig(batch_size=8))))
    assert plain.features.keys() == ["item", "category"]
    stream = ParquetStream(str(tmp_path / "seq"), StreamConfig(batch_size=8, conditions=True))
    batch = next(iter(stream))
    assert batch.features.keys() == ["item", "category", "condition"]
    lengths = batch.features.length_per_key()
    assert lengths[2] == lengths[0]  # one condition per event
    table = result.seq.to_pydict()
    by_user = dict(zip(table["user_id"], table["condition_ids"], strict=True))
    jagged = batch.features["condition"]
    for user, values in zip(batch.user_ids.tolist(), jagged.to_dense(), strict=True):
        assert values.tolist() == by_user[user][-200:]
    ctr = next(iter(ParquetStream(str(tmp_path / "ctr_train"), StreamConfig(conditions=True))))
    keys = ctr.features.keys()
    assert "history_condition" in keys
    assert "candidate_condition" not in keys  # no candidate column
