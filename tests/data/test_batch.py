"""Gathering rows of decoded columns: the values of the right rows, cut to their most recent
``max_len``, empty lists included."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.data.batch import ROW_ID, Columns, Layout, Lists, assemble, gather


@pytest.mark.parametrize("max_len", [None, 1, 3])
def test_gather_keeps_the_rows_values_in_order(max_len: int | None) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 6, 40)
    lengths[[0, 7, 8, 39]] = 0  # empty lists first, in a row and last
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(0, 1000, offsets[-1])
    columns = Columns(Lists(offsets, {"a": values, "b": values + 1}), np.arange(40)[None, :])
    for rows in (rng.permutation(40), np.array([0, 7, 8]), np.array([8, 3, 39]), np.arange(5)):
        got = gather(columns, rows, max_len)
        expected = [values[offsets[r] : offsets[r + 1]][-max_len if max_len else 0 :] for r in rows]
        assert np.diff(got.lists.offsets).tolist() == [len(e) for e in expected]
        flat = np.concatenate(expected) if expected else np.zeros(0, dtype=np.int64)
        assert got.lists.values["a"].tolist() == flat.tolist()
        assert got.lists.values["b"].tolist() == (flat + 1).tolist()
        assert got.table[0].tolist() == rows.tolist()


@pytest.mark.parametrize("max_len", [None, 2])
def test_assemble_cuts_runs_and_gathered_rows_alike(max_len: int | None) -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 5, 30)
    lengths[[2, 3, 29]] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(0, 1000, offsets[-1])
    chunk = Columns(Lists(offsets, {"a": values, "b": -values}), np.stack([np.arange(30)] * 2))
    layout = Layout(("a", "b"), ("a", "b"), ("user_id", ROW_ID), 0, ("a", "b"), ctr=False)
    pieces = [(chunk, slice(1, 12)), (chunk, np.array([2, 3, 5, 29])), (chunk, slice(29, 30))]
    batch = assemble(pieces, layout, max_len)
    rows = [*range(1, 12), 2, 3, 5, 29, 29]
    expected = [values[offsets[r] : offsets[r + 1]][-max_len if max_len else 0 :] for r in rows]
    flat = np.concatenate(expected)
    assert batch.features["a"].values().tolist() == flat.tolist()
    assert batch.features["b"].values().tolist() == (-flat).tolist()
    assert batch.features["a"].lengths().tolist() == [len(e) for e in expected]
    assert batch.row_ids.tolist() == rows


def test_decode_reads_a_subset_of_columns() -> None:
    import pyarrow as pa

    from recsys.data.batch import decode
    from recsys.data.schema import DatasetMeta

    meta = DatasetMeta(kind="ctr", vocab={"item": 10, "category": 3}, side_features=["category"])
    table = pa.table(
        {
            "history_item_ids": [[1, 2], [3]],
            "user_id": [0, 1],
            "item_id": [4, 5],
            "category_id": [1, 2],
            "label": [1, 0],
            "timestamp": [7, 8],
        }
    )
    lists = decode(table.select([0]), meta, 0, str, columns=["history_item_ids"])
    assert lists.lists.offsets.tolist() == [0, 2, 3] and lists.table.shape == (0, 2)
    every = decode(table, meta, 10, str, columns=table.column_names)
    assert every.table[Layout.of(meta).scalars.index(ROW_ID)].tolist() == [10, 11]
    with pytest.raises(ValueError, match="every scalar column or none"):
        decode(table.select([0, 1]), meta, 0, str, columns=["history_item_ids", "user_id"])
