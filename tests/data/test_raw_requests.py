"""``recsys data requests``: a ctr dataset given back in raw keys."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys.cli import main
from recsys.data import raw_requests
from recsys.data.protocol import split, write_split
from recsys.data.schema import DataError
from tests.data.test_vocab import HALF, events


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_split(tmp_path / "data", split(events(), HALF), {"converter": "test"})
    return tmp_path / "data"


def test_samples_come_back_in_the_raw_keys_of_the_events(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "requests.parquet"
    assert raw_requests.write(str(data / "ctr_test"), out) == 2
    rows = pq.read_table(out).to_pylist()
    # u9, the test user, saw d, c, a and then b (held out): the positive is b.
    assert rows[0] == {"user_id": "u9", "history": ["d", "c", "a"], "candidate": "b", "label": 1}
    assert rows[1]["label"] == 0 and rows[1]["candidate"] in {"a", "c", "d"}
    assert raw_requests.write(str(data / "ctr_train"), out, limit=3, labels=False, overwrite=True)
    assert pq.read_table(out).column_names == ["user_id", "history", "candidate"]
    assert pq.read_table(out).num_rows == 3


def test_refusals_name_the_dataset_or_file(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "requests.parquet"
    with pytest.raises(DataError, match="a 'seq' dataset; requests come from 'ctr'"):
        raw_requests.write(str(data / "seq"), out)
    meta = json.loads((data / "ctr_test/dataset.json").read_text())
    del meta["vocabularies"]
    (data / "ctr_test/dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"records no vocabulary of \['item', 'user'\]"):
        raw_requests.write(str(data / "ctr_test"), out)
    out.write_text("")
    assert main(["data", "requests", str(data / "ctr_train"), "--out", str(out)]) == 2
    assert not list(tmp_path.glob(".requests.parquet.tmp"))
