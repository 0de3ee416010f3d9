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
