"""run.compile: the tower compiled block by block computes what the eager tower computes,
compiles once per kind of shape whatever the batch sizes and lengths, and ``auto`` compiles
where it pays."""

from __future__ import annotations

import pytest
import torch

from recsys.models.tower import Tower, TowerConfig
from recsys.train import compiling


def test_compiled_blocks_match_eager_and_recompile_once_for_new_shapes() -> None:
    torch.manual_seed(0)
    config = TowerConfig.from_name("L2H16A2", max_len=32)
    eager, compiled = Tower(config), Tower(config)
    compiled.load_state_dict(eager.state_dict())
    assert compiling.compile_towers(compiled) == 2
    torch._dynamo.utils.counters.clear()
    for b, t in ((8, 10), (6, 7), (9, 12), (5, 5), (7, 20)):  # every batch a new shape
        x = torch.randn(b, t, 16)
        lengths = torch.randint(0, t, (b,))
        valid = torch.arange(t)[None] <= lengths[:, None]
        for at in (None, lengths):  # every position, or the candidate's only (a ranker)
            leaves = [x.clone().requires_grad_() for _ in range(2)]
            outs = [
                m(leaf, valid, at=at) for m, leaf in zip((eager, compiled), leaves, strict=True)
            ]
            for out in outs:
                out.square().mean().backward()
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(leaves[1].grad, leaves[0].grad, rtol=1e-4, atol=1e-6)
    # For each of the two block graphs (every position; the last block at the candidate):
    # one for the first shape, one with symbolic sizes for all the others.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


def test_auto_compiles_on_cuda_and_for_long_cpu_runs() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiling.wanted("auto", cuda, 10)
    assert not compiling.wanted("auto", cpu, compiling.CPU_STEPS - 1)
    assert compiling.wanted("auto", cpu, compiling.CPU_STEPS)
    assert compiling.wanted("on", cpu, 1) and not compiling.wanted("off", cuda, 10**6)
    with pytest.raises(ValueError, match=r"run\.compile must be auto, on, off, got .yes."):
        compiling.wanted("yes", cpu, 1)
