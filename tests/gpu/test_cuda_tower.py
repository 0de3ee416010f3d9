"""The tower and the run settings on a CUDA device (marked ``gpu``: skipped where there is
none). Pure torch: these run on a GPU host without TorchRec (``scripts/gpu-smoke.sh``)."""

from __future__ import annotations

import pytest
import torch

from recsys.models.tower import Tower, TowerConfig
from recsys.train import compiling, precision
from recsys.train.throughput import Meter

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def step(tower: Tower, x: torch.Tensor, valid: torch.Tensor, at=None, bf16: bool = True):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = tower(x, valid, at=at)
    out.float().square().mean().backward()
    return out.float()


def test_compiled_tower_matches_eager_in_bf16_and_keeps_its_graph_across_shapes() -> None:
    torch.manual_seed(0)
    config = TowerConfig.from_name("L2H128A4", max_len=64)
    eager = Tower(config).to(CUDA)
    compiled = Tower(config).to(CUDA)
    compiled.load_state_dict(eager.state_dict())
    assert compiling.compile_towers(compiled) == 2
    torch._dynamo.utils.counters.clear()
    for b, t in ((32, 40), (24, 33), (40, 61), (16, 17)):  # sizes change every batch
        x = torch.randn(b, t, 128, device=CUDA)
        lengths = torch.randint(t // 2, t, (b,), device=CUDA)
        valid = torch.arange(t, device=CUDA)[None] <= lengths[:, None]
        leaves = [x.clone().requires_grad_() for _ in range(2)]
        want = step(eager, leaves[0], valid, at=lengths)
        got = step(compiled, leaves[1], valid, at=lengths)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(leaves[1].grad, leaves[0].grad, rtol=5e-2, atol=5e-3)
    # A static graph for the first shape, one dynamic graph for the rest, for the blocks
    # before the last and for the last (which computes at the candidate only).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


def test_bf16_is_switchable_on_cuda_and_fp32_products_use_tf32() -> None:
    assert precision.bf16("auto", False, CUDA) and not precision.bf16("off", False, CUDA)
    precision.use_tf32(CUDA)
    assert torch.get_float32_matmul_precision() == "high"
    tower = Tower(TowerConfig.from_name("L1H64A4", max_len=16)).to(CUDA)
    x = torch.randn(4, 16, 64, device=CUDA, requires_grad=True)
    valid = torch.ones(4, 16, dtype=torch.bool, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=False):  # run.bf16=off
        assert tower(x, valid).dtype == torch.float32


def test_meter_reports_peak_memory_and_mfu_where_the_peak_is_known() -> None:
    tower = Tower(TowerConfig.from_name("L2H64A4", max_len=16)).to(CUDA)
    step(
        tower, torch.randn(8, 16, 64, device=CUDA), torch.ones(8, 16, dtype=torch.bool, device=CUDA)
    )
    figures = Meter(tower, CUDA, bf16=True, world_size=2).figures(8, 128, 0.5)
    assert figures["samples_per_s"] == 32 and figures["tokens_per_s"] == 512
    assert figures["peak_memory_gb"] > 0 and figures["tower_tflops"] > 0
    known = any(k in torch.cuda.get_device_name() for k in ("H100", "H200", "A100"))
    assert ("tower_mfu" in figures) == known
