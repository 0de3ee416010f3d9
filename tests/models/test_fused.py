"""The compiled tower kernels against the torch computation they replace: values and
gradients, fp32 and bf16, and the cases that must take the torch path."""

from __future__ import annotations

import pytest
import torch

from recsys.models import fused
from recsys.models.tower import Tower, TowerConfig, rotary_tables

BF16, FP32 = torch.bfloat16, torch.float32


def test_kernels_are_built() -> None:
    assert fused.NATIVE  # the package builds them: `make setup` or pip install -e .


def test_a_build_of_another_calling_convention_is_not_used(monkeypatch: pytest.MonkeyPatch):
    assert fused._load() is not None
    monkeypatch.setattr(fused, "ABI", fused.ABI + 1)  # as if the build were stale
    assert fused._load() is None


def both(native, reference, inputs, grads_like=None):
    """Outputs and input gradients of native(*inputs) and reference(*inputs)."""
    results = []
    torch.manual_seed(1)
    for function in (native, reference):
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = function(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        results.append((out, leaves))
    grads = [torch.randn(o.shape).to(o.dtype) for o in results[0][0]]
    for out, _ in results:
        torch.autograd.backward(out, grads)
    (out_n, leaves_n), (out_r, leaves_r) = results
    return out_n, out_r, [x.grad for x in leaves_n], [x.grad for x in leaves_r]


def close(a, b, dtype):
    tolerance = {FP32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]
    torch.testing.assert_close(a.float(), b.float(), **tolerance)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_rms_norm_matches_torch(dtype: torch.dtype) -> None:
    x = torch.randn(6, 9, 48) * 3
    weight = torch.randn(48)
    out_n, out_r, grads_n, grads_r = both(
        lambda x, w: fused.rms_norm(x, w, 1e-6, dtype),
        lambda x, w: fused.rms_norm_reference(x, w, 1e-6, dtype),
        [x, weight],
    )
    assert out_n[0].dtype == out_r[0].dtype == dtype
    close(out_n[0], out_r[0], dtype)
    torch.testing.assert_close(grads_n[0], grads_r[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads_n[1], grads_r[1], rtol=1e-4, atol=1e-3)


def test_rms_norm_takes_a_strided_weight() -> None:
    x, weight = torch.randn(3, 8), torch.randn(16)[::2]
    torch.testing.assert_close(
        fused.rms_norm(x, weight, 1e-6), fused.rms_norm_reference(x, weight, 1e-6)
    )


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_swiglu_matches_torch(dtype: torch.dtype) -> None:
    gate_up = (torch.randn(5, 7, 2 * 40) * 4).to(dtype)
    gate_up[0, 0, :6] = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0, -0.5])  # tails
    out_n, out_r, grads_n, grads_r = both(fused.swiglu, fused.swiglu_reference, [gate_up])
    assert out_n[0].dtype == dtype and out_n[0].shape == (5, 7, 40)
    close(out_n[0], out_r[0], dtype)
    close(grads_n[0], grads_r[0], dtype)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("rotated", [1, 2])
def test_rotary_heads_match_torch(dtype: torch.dtype, per_row: bool, rotated: int) -> None:
    b, t, slots, heads, d = 3, 11, 3, 2, 8
    cos, sin = rotary_tables(d, 20, 10_000.0)
    if per_row:
        positions = torch.randint(0, 20, (b, t))
        cos, sin = cos[positions], sin[positions]
    x = torch.randn(b, t, slots, heads, d).to(dtype)
    out_n, out_r, grads_n, grads_r = both(
        lambda x: fused.rotary_heads(x, cos, sin, rotated, FP32),
        lambda x: fused.rotary_heads_reference(x, cos, sin, rotated, FP32),
        [x],
    )
    assert len(out_n) == slots
    for n, r in zip(out_n, out_r, strict=True):
        assert n.shape == r.shape == (b, heads, t, d) and n.dtype == FP32
        torch.testing.assert_close(n, r, rtol=1e-6, atol=1e-6)
    assert grads_n[0].dtype == dtype
    close(grads_n[0], grads_r[0], dtype)


def test_rotary_heads_unused_slot_gets_zero_gradient() -> None:
    cos, sin = rotary_tables(4, 6, 10_000.0)
    x = torch.randn(2, 6, 3, 1, 4, requires_grad=True)
    q, _, v = fused.rotary_heads(x, cos, sin, 2, FP32)
    (q.sum() + v.sum()).backward()  # keys unused: no gradient reaches that slot
    assert torch.equal(x.grad[:, :, 1], torch.zeros(2, 6, 1, 4))
    assert torch.equal(x.grad[:, :, 2], torch.ones(2, 6, 1, 4))


def test_torch_path_where_the_kernels_do_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_rms_norm", "_swiglu", "_rotary_heads"):
        monkeypatch.setattr(fused, name, None)  # any use of a kernel would fail
    cos, sin = rotary_tables(4, 6, 10_000.0)
    x64 = torch.randn(2, 6, 8, dtype=torch.float64)
    assert fused.rms_norm(x64, torch.ones(8, dtype=torch.float64), 1e-6).dtype == torch.float64
    assert fused.swiglu(x64).shape == (2, 6, 4)
    x = torch.randn(2, 6, 2, 1, 4)
    assert fused.rotary_heads(x.to(BF16), cos, sin, 1)[0].dtype == BF16  # heads kept bf16
    meta = torch.randn(2, 6, 8, device="meta")  # another device
    assert fused.rms_norm(meta, torch.ones(8, device="meta"), 1e-6).device.type == "meta"
    assert fused.swiglu(meta).shape == (2, 6, 4)


def test_tower_native_matches_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole tower, fp32 and under bf16 autocast, the one-query path included."""
    torch.manual_seed(0)
    model = Tower(TowerConfig(layers=2, hidden=32, heads=4, max_len=16))
    x = torch.randn(4, 9, 32)
    valid = torch.arange(9)[None] < torch.tensor([9, 5, 7, 1])[:, None]
    at = torch.tensor([8, 4, 6, 0])

    def run():
        outputs = []
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=BF16, enabled=autocast):
                full = model(x, valid)
                one = model(x, valid, at=at)
            (full.float().square().sum() + one.float().sum()).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            outputs.append((full, one, grads))
        return outputs

    native = run()
    monkeypatch.setattr(fused, "NATIVE", False)
    reference = run()
    for (full_n, one_n, grads_n), (full_r, one_r, grads_r), dtype in zip(
        native, reference, (FP32, BF16), strict=True
    ):
        close(full_n, full_r, dtype)
        close(one_n, one_r, dtype)
        for g_n, g_r in zip(grads_n, grads_r, strict=True):
            scale = g_r.abs().max()
            atol = {FP32: 1e-5, BF16: 0.03}[dtype]
            torch.testing.assert_close(g_n / scale, g_r / scale, rtol=0, atol=atol)


@pytest.mark.parametrize(("t", "d"), [(21, 16), (21, 32), (21, 12), (1, 8), (16, 64), (33, 16)])
@pytest.mark.parametrize("case", ["causal", "none", "mask", "shared", "keys"])
def test_attention_matches_torch(t: int, d: int, case: str) -> None:
    """Head sizes in whole vectors and not, sequences of one block, exactly one, and more;
    masks per row, shared by every row, and per row for one query."""
    import torch.nn.functional as F

    b, heads = 3, 2
    tq = 1 if case == "keys" else t
    mask = None
    if case == "mask":  # a query sees some keys, always itself
        mask = (torch.rand(b, 1, t, t) > 0.5) | torch.eye(t, dtype=torch.bool)
    if case == "shared":  # one mask for every row: stride 0 over rows
        mask = (torch.rand(1, 1, t, t) > 0.5) | torch.eye(t, dtype=torch.bool)
    if case == "keys":  # one query per row, over the keys of its row
        mask = torch.rand(b, 1, 1, t) > 0.5
        mask[..., 0] = True
    causal = case == "causal"
    q, k, v = torch.randn(b, heads, tq, d), torch.randn(b, heads, t, d), torch.randn(b, heads, t, d)
    out_n, out_r, grads_n, grads_r = both(
        lambda q, k, v: fused.attention(q, k, v, mask, causal),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal),
        [q, k, v],
    )
    torch.testing.assert_close(out_n[0], out_r[0], rtol=1e-5, atol=1e-5)
    for g_n, g_r in zip(grads_n, grads_r, strict=True):
        torch.testing.assert_close(g_n, g_r, rtol=1e-4, atol=1e-5)


def test_attention_query_that_sees_nothing_gets_zeros() -> None:
    q, k, v = (torch.randn(1, 1, 2, 16, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, False], [False, False]]).view(1, 1, 2, 2)
    out = fused.attention(q, k, v, mask)
    assert torch.equal(out[0, 0, 1], torch.zeros(16))
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0].detach())
    out.sum().backward()
    assert torch.equal(q.grad[0, 0, 1], torch.zeros(16))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_attention_leaves_other_cases_to_torch() -> None:
    q = torch.randn(2, 2, 5, 16)
    assert fused.attention(q.to(BF16), q.to(BF16), q.to(BF16)) is None  # not fp32
    long = torch.randn(1, 1, fused.LONGEST + 1, 8)
    assert fused.attention(long, long, long) is None  # long sequences: torch's flash kernel
    assert fused.attention(q[:, :, :1], q, q, causal=True) is None  # causal needs Tq = Tk
    heads_mask = torch.ones(2, 2, 5, 5, dtype=torch.bool)  # a mask per head
    assert fused.attention(q, q, q, heads_mask) is None


def test_attention_under_activation_checkpointing() -> None:
    """Saved tensors unpacked anew for backward (checkpointing recomputes the forward; the
    hooks hand back copies): the kernel reads each tensor where it now is."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    b, heads, t, d = 2, 2, 9, 16
    q, k, v = (torch.randn(b, heads, t, d) for _ in range(3))
    valid = torch.arange(t)[None, :] < torch.tensor([9, 4])[:, None]

    def native(q, k, v):  # the mask is made inside, as the tower makes its own
        return fused.attention(q, k, v, valid[:, None, None, :] | torch.eye(t, dtype=torch.bool))

    def reference(q, k, v):
        mask = valid[:, None, None, :] | torch.eye(t, dtype=torch.bool)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    _, _, _, expected = both(native, reference, [q, k, v])
    checkpointed = lambda q, k, v: checkpoint(native, q, k, v, use_reentrant=False)  # noqa: E731
    _, _, got, _ = both(checkpointed, reference, [q, k, v])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x.clone(), lambda x: x):
        _, _, got, _ = both(native, reference, [q, k, v])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_kernels_allocate_fp32_on_cpu_whatever_the_defaults() -> None:
    x, weight = torch.randn(4, 3, 16), torch.randn(16)
    q = torch.randn(2, 2, 5, 16)
    expected = fused.rms_norm_reference(x, weight, 1e-6), fused.attention(q, q, q, causal=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = fused.rms_norm(x, weight, 1e-6), fused.attention(q, q, q, causal=True)
    finally:
        torch.set_default_dtype(previous)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == FP32
        torch.testing.assert_close(g, e)


def test_shapes_the_kernels_do_not_take_go_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_rms_norm", "_swiglu", "_rotary_heads"):
        monkeypatch.setattr(fused, name, None)  # any use of a kernel would fail
    x = torch.randn(2, 3, 8)
    assert fused.rms_norm(x, torch.ones(1), 1e-6).shape == x.shape  # a broadcast weight
    with pytest.raises(RuntimeError):  # an odd width has no halves: torch's own error
        fused.swiglu(torch.randn(2, 7))
    cos, sin = rotary_tables(4, 6, 10_000.0)  # for head size 4, not 8
    with pytest.raises(RuntimeError):
        fused.rotary_heads(torch.randn(2, 6, 2, 1, 8), cos, sin, 1, FP32)


def test_attend_leaves_options_it_does_not_know_to_torch() -> None:
    import torch.nn.functional as F

    from recsys.models.tower import attend

    q = torch.randn(2, 2, 5, 16)
    got = attend(q, q, q, is_causal=True, scale=1.0)
    torch.testing.assert_close(
        got, F.scaled_dot_product_attention(q, q, q, is_causal=True, scale=1.0)
    )
