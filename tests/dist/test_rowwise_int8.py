"""Frozen int8 row-wise tables (``recsys.distributed.rowwise_int8``): quantization, lookups
across ranks equal to the whole table's, and checkpoints that load into another world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys.distributed.launch import run_on_ranks
from recsys.distributed.rowwise_int8 import (
    RowWiseInt8Table,
    dequantize,
    local_rows,
    quantize,
)

ROWS, DIM = 11, 8  # 11 rows over 2 ranks: blocks of 6 and 5


def reference() -> torch.Tensor:
    torch.manual_seed(3)
    rows = torch.randn(ROWS, DIM) * 0.02
    rows[4] = 0.25  # a constant row
    return rows


def test_quantized_rows_are_within_half_a_step() -> None:
    rows = reference()
    codes, scale_bias = quantize(rows)
    assert codes.dtype == torch.uint8 and scale_bias.dtype == torch.float16
    back = dequantize(codes, scale_bias)
    step = scale_bias[:, :1].float()
    # Half a step from rounding, plus the fp16 rounding of the bias.
    assert torch.all((back - rows).abs() <= step / 2 + rows.abs().amax(1, keepdim=True) * 2**-11)
    assert torch.equal(back[4], torch.full((DIM,), 0.25).half().float())


def test_rows_far_from_zero_keep_half_a_step_and_fp16_overflow_is_refused() -> None:
    rows = 100.3 + torch.arange(32, dtype=torch.float32).reshape(2, 16) * 1e-3
    codes, scale_bias = quantize(rows)
    step = scale_bias[:, :1].float()
    # Half a step, and fp32's own rounding of values near 100 (a few of its ulps).
    assert torch.all((dequantize(codes, scale_bias) - rows).abs() <= step / 2 + rows * 2**-21)
    with pytest.raises(ValueError, match="beyond fp16's range"):
        quantize(torch.tensor([[-1e6, 0.0]]))  # a bias below fp16's -65,504


def test_the_blocks_tile_the_table() -> None:
    assert [local_rows(ROWS, r, 2) for r in range(2)] == [range(0, 6), range(6, 11)]
    assert [len(local_rows(3, r, 4)) for r in range(4)] == [1, 1, 1, 0]


def test_one_rank_looks_up_and_round_trips_its_state() -> None:
    table = RowWiseInt8Table(ROWS, DIM)
    table.set_rows(reference())
    ids = torch.tensor([10, 0, 4, 4])
    expected = dequantize(*quantize(reference()))[ids]
    assert torch.equal(table(ids), expected)
    state = table.state_dict()
    assert sorted(state) == ["codes", "scale_bias"]
    other = RowWiseInt8Table(ROWS, DIM)
    other.load_state_dict(state)
    assert torch.equal(other(ids), expected)
    with pytest.raises(ValueError, match=r"expected the table \[11, 8\]"):
        table.set_rows(torch.zeros(3, DIM))
    with pytest.raises(ValueError, match="ids outside the int8 table's 11 rows"):
        table(torch.tensor([3, 11]))
    # Loading never casts: fp32 values are not codes.
    with pytest.raises(ValueError, match=r"codes: torch.float32 .* cannot load"):
        other.load_state_dict({"codes": torch.ones(ROWS, DIM), "scale_bias": state["scale_bias"]})
    moved = RowWiseInt8Table(ROWS, DIM).float()  # a model's .float() keeps the stored dtypes
    assert (moved.codes.dtype, moved.scale_bias.dtype) == (torch.uint8, torch.float16)


def _lookups(checkpoint: str, save: bool) -> list[torch.Tensor]:
    """On one rank: a table filled from the reference (``save``: then saved by DCP to
    ``checkpoint``) or loaded from ``checkpoint``; its lookups of a few id lists."""
    import torch.distributed.checkpoint as dcp

    from recsys.distributed.env import distributed

    with distributed("cpu") as env:
        table = RowWiseInt8Table(ROWS, DIM)
        if save:
            table.set_rows(reference())
            dcp.save(table.state_dict(), checkpoint_id=checkpoint)
        else:
            state = table.state_dict()
            dcp.load(state, checkpoint_id=checkpoint)
            table.load_state_dict(state)
        asks = [
            torch.tensor([10, 0, 5, 6, 4, 4]) if env.rank == 0 else torch.tensor([7, 1]),
            torch.tensor([], dtype=torch.long) if env.rank == 0 else torch.tensor([3, 9, 9]),
        ]
        out = [table(ids) for ids in asks]
        # A table of one row leaves rank 1 an empty block; it saves and loads all the same.
        small = RowWiseInt8Table(1, DIM)
        path = f"{checkpoint}-small"
        if save:
            small.set_rows(reference()[:1])
            dcp.save(small.state_dict(), checkpoint_id=path)
        else:
            state = small.state_dict()
            dcp.load(state, checkpoint_id=path)
            small.load_state_dict(state)
        out.append(small(torch.tensor([0, 0])))
        # An id the table does not have stops every rank, not only the one that asked.
        try:
            table(torch.tensor([ROWS]) if env.rank == 0 else torch.tensor([1]))
        except ValueError as err:
            out.append(str(err))
        return out


@pytest.mark.dist
def test_lookups_across_ranks_and_checkpoints_of_another_world_size(tmp_path: Path) -> None:
    whole = dequantize(*quantize(reference()))
    two = str(tmp_path / "saved-by-2")
    saved = run_on_ranks(_lookups, two, True, world_size=2, quiet=True)
    assert torch.equal(saved[0][0], whole[[10, 0, 5, 6, 4, 4]])
    assert torch.equal(saved[1][0], whole[[7, 1]])
    assert saved[0][1].shape == (0, DIM) and torch.equal(saved[1][1], whole[[3, 9, 9]])
    first = dequantize(*quantize(reference()[:1]))
    assert all(torch.equal(s[2], first[[0, 0]]) for s in saved)
    assert saved[0][3].startswith("1 ids outside the int8 table's 11 rows (e.g. [11])")
    assert saved[1][3].startswith("another rank looked up ids the int8 table of 11 rows")
    # 2 ranks' blocks load into 1 rank, and 1 rank's table into 2 ranks' blocks.
    (one,) = run_on_ranks(_lookups, two, False, world_size=1, quiet=True)
    assert torch.equal(one[0], whole[[10, 0, 5, 6, 4, 4]]) and torch.equal(one[2], first[[0, 0]])
    single = str(tmp_path / "saved-by-1")
    run_on_ranks(_lookups, single, True, world_size=1, quiet=True)
    loaded = run_on_ranks(_lookups, single, False, world_size=2, quiet=True)
    assert torch.equal(loaded[1][1], whole[[3, 9, 9]])
