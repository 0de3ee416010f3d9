"""Vocabularies: raw keys ↔ dense ids, the reserved unknown and padding ids, the files a
converter writes and a stage carries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data import vocab
from recsys.data.protocol import Events, ProtocolConfig, split, write_split
from recsys.data.schema import DataError, DatasetMeta
from recsys.data.vocab import Vocabulary

HALF = ProtocolConfig(test_quantile=0.5)
"""u9, whose last event is the latest, is the one test user."""


def events() -> Events:
    """Three users (raw 'u7', 'u3', 'u9') over string items 'b', 'a', 'c', 'd'."""
    user = np.array(["u7"] * 4 + ["u3"] * 4 + ["u9"] * 4)
    item = np.array(["b", "a", "c", "d", "a", "c", "b", "d", "d", "c", "a", "b"])
    category = np.array(["x" if i in "ab" else "y" for i in item])
    return Events(user, item, category, np.arange(12, dtype=np.int64))


def test_round_trip_of_string_keys_with_reserved_rows(tmp_path: Path) -> None:
    written = Vocabulary("item", pa.array(["a", "b", "c"]), {"category": np.array([0, 0, 1])})
    written.side_sizes = {"category": 2}
    written.write(tmp_path / "item.parquet")
    read = Vocabulary.read(tmp_path / "item.parquet", "item")
    assert read.keys.to_pylist() == ["a", "b", "c"]
    assert (read.unknown, read.padding, read.rows) == (3, 4, 5)
    assert read.side["category"].tolist() == [0, 0, 1] and read.side_sizes == {"category": 2}
    table = pq.read_table(tmp_path / "item.parquet").to_pylist()
    assert table[3:] == [
        {"key": None, "id": 3, "reserved": "unknown", "category_id": 2},
        {"key": None, "id": 4, "reserved": "padding", "category_id": 2},
    ]
    assert read.ids(["c", "zz", None, "a"]).tolist() == [2, 3, 3, 0]  # unseen, null: unknown
    assert read.raw(np.array([1, 3, 4, 0])).to_pylist() == ["b", None, None, "a"]


def test_integer_keys_accept_other_integer_widths_and_refuse_strings() -> None:
    items = Vocabulary("item", pa.array([5, 9, 40], pa.int64()))
    assert items.ids(pa.array([40, 6], pa.int32())).tolist() == [2, 3]
    with pytest.raises(DataError, match="keys are int64, got string"):
        items.ids(["abc"])


def test_users_have_no_reserved_rows() -> None:
    users = Vocabulary(vocab.USER, pa.array([3, 7]))
    assert users.rows == 2 and users.ids([7, 8]).tolist() == [1, -1]
    assert "unknown" not in users.about("f")


def test_a_converter_writes_every_vocabulary_and_dataset_json_references_them(
    tmp_path: Path,
) -> None:
    result = split(events(), HALF)
    write_split(tmp_path / "data", result, {"converter": "test"})
    meta = DatasetMeta.from_json((tmp_path / "data/ctr_test/dataset.json").read_text(), "t")
    assert meta.vocab == {"item": 6, "category": 4, "user": 3}
    assert meta.vocabularies["item"] == {
        "file": "../vocab/item.parquet",
        "keys": 4,
        "unknown": 4,
        "padding": 5,
    }
    assert meta.keys("item") == 4 and meta.keys("user") == 3
    loaded = vocab.load(tmp_path / "data/ctr_test", meta)
    assert loaded["item"].keys.to_pylist() == ["a", "b", "c", "d"]
    assert loaded["category"].keys.to_pylist() == ["x", "y"]
    assert loaded["user"].keys.to_pylist() == ["u3", "u7", "u9"]
    # Each item's category, as the events gave it: a, b → x (0); c, d → y (1).
    assert loaded["item"].side["category"].tolist() == [0, 0, 1, 1]
    # The ids in the data are the vocabulary's: user u7's sequence is b, a, c (d held out).
    seq = pq.read_table(tmp_path / "data/seq/part-00000.parquet").to_pylist()
    by_user = {loaded["user"].raw([r["user_id"]])[0].as_py(): r["item_ids"] for r in seq}
    assert loaded["item"].raw(by_user["u7"]).to_pylist() == ["b", "a", "c"]


def test_a_missing_or_foreign_vocabulary_file_is_named(tmp_path: Path) -> None:
    write_split(tmp_path / "data", split(events(), HALF), {"converter": "test"})
    dataset = tmp_path / "data/ctr_train"
    meta = DatasetMeta.from_json((dataset / "dataset.json").read_text(), "t")
    (tmp_path / "data/vocab/category.parquet").rename(tmp_path / "elsewhere.parquet")
    with pytest.raises(DataError, match=r"vocabulary 'category' is \.\./vocab/category\.parquet"):
        vocab.load(dataset, meta)
    shutil.copyfile(tmp_path / "data/vocab/item.parquet", tmp_path / "data/vocab/category.parquet")
    with pytest.raises(DataError, match="the vocabulary of 'item', not 'category'"):
        vocab.load(dataset, meta)
    pq.write_table(pa.table({"key": [1]}), tmp_path / "data/vocab/category.parquet")
    with pytest.raises(DataError, match="not a recsys vocabulary"):
        vocab.load(dataset, meta)


def test_dataset_json_must_count_the_reserved_rows() -> None:
    entry = {"file": "v.parquet", "keys": 4, "unknown": 4, "padding": 5}
    DatasetMeta(kind="seq", vocab={"item": 6}, vocabularies={"item": entry})
    with pytest.raises(DataError, match=r"vocab\['item'\] is 4 \(should be 6\)"):
        DatasetMeta(kind="seq", vocab={"item": 4}, vocabularies={"item": entry})
    with pytest.raises(DataError, match="reserved ids must be"):
        DatasetMeta(kind="seq", vocab={"item": 6}, vocabularies={"item": {**entry, "unknown": 0}})
    # Without vocabularies, dataset.json reads and writes as it always did.
    assert "vocabularies" not in json.loads(DatasetMeta(kind="seq", vocab={"item": 4}).to_json())


def test_a_stage_carries_the_vocabularies_it_trained_with(tmp_path: Path) -> None:
    write_split(tmp_path / "data", split(events(), HALF), {"converter": "test"})
    dataset = tmp_path / "data/seq"
    meta = DatasetMeta.from_json((dataset / "dataset.json").read_text(), "t")
    vocab.carry(dataset, meta, tmp_path / "stage")
    carried = vocab.from_stage(tmp_path / "stage")
    assert sorted(carried) == ["category", "item", "user"]
    assert carried["item"].keys.to_pylist() == ["a", "b", "c", "d"]
    index = json.loads((tmp_path / "stage/vocab/index.json").read_text())
    assert index["item"] == {"file": "item.parquet", "keys": 4, "unknown": 4, "padding": 5}
    assert vocab.from_stage(tmp_path / "no-stage") == {}


def test_a_dataset_named_by_a_uri_or_by_one_of_its_files_finds_its_vocabularies(
    tmp_path: Path,
) -> None:
    write_split(tmp_path / "data", split(events(), HALF), {"converter": "test"})
    dataset = tmp_path / "data/ctr_train"
    meta = DatasetMeta.from_json((dataset / "dataset.json").read_text(), "t")
    for named in (f"file://{dataset}", str(dataset / "part-00000.parquet")):
        assert vocab.load(named, meta)["item"].keys.to_pylist() == ["a", "b", "c", "d"]
    vocab.carry(f"file://{dataset}", meta, tmp_path / "stage")
    assert vocab.from_stage(tmp_path / "stage")["user"].keys.to_pylist() == ["u3", "u7", "u9"]
