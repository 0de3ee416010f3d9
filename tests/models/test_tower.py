"""The tower: names, causality, padding, bidirectional attention."""

from __future__ import annotations

import pytest
import torch

from recsys.models.tower import Tower, TowerConfig


def test_names_parse_and_print() -> None:
    config = TowerConfig.from_name("L12H768A12")
    assert (config.layers, config.hidden, config.heads, config.ffn) == (12, 768, 12, 2304)
    assert config.name == "L12H768A12"
    with pytest.raises(ValueError, match="not of the form L<layers>H<hidden>A<heads>"):
        TowerConfig.from_name("L4-H64")
    with pytest.raises(ValueError, match="heads of an even size"):
        TowerConfig.from_name("L1H12A4")


def tower(causal: bool = True) -> Tower:
    torch.manual_seed(0)
    return Tower(TowerConfig.from_name("L2H32A4", causal=causal, max_len=16)).eval()


def test_causal_outputs_ignore_the_future() -> None:
    model = tower()
    x = torch.randn(2, 10, 32)
    valid = torch.ones(2, 10, dtype=torch.bool)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 32)
    a, b = model(x, valid), model(changed, valid)
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_bidirectional_outputs_see_the_future() -> None:
    model = tower(causal=False)
    x = torch.randn(2, 10, 32)
    valid = torch.ones(2, 10, dtype=torch.bool)
    changed = x.clone()
    changed[:, 9] += 1.0
    assert not torch.allclose(model(x, valid)[:, 0], model(changed, valid)[:, 0])


@pytest.mark.parametrize("causal", [True, False])
def test_padding_changes_nothing_real(causal: bool) -> None:
    model = tower(causal)
    x = torch.randn(3, 8, 32)
    valid = torch.arange(8)[None, :] < torch.tensor([[8], [5], [1]])
    noisy = torch.where(valid[..., None], x, torch.randn_like(x) * 100)
    a, b = model(x, valid), model(noisy, valid)
    assert torch.allclose(a[valid], b[valid], atol=1e-5)
    assert torch.isfinite(b).all()
    # A sequence alone equals the same sequence padded inside a batch.
    alone = model(x[1:2, :5], valid[1:2, :5])
    assert torch.allclose(alone[0], a[1, :5], atol=1e-5)


def test_longer_than_max_len_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the tower's max_len 16"):
        tower()(torch.randn(1, 17, 32), torch.ones(1, 17, dtype=torch.bool))


def test_left_padding_uses_the_explicit_mask() -> None:
    # Not right-padded, so the tower cannot lean on causality alone. RoPE scores depend on
    # relative positions only, so a left-padded sequence gives what it gives alone.
    model = tower()
    x = torch.randn(1, 6, 32)
    valid = torch.tensor([[False, False, True, True, True, True]])
    assert model.attention_mask(valid) is not None
    alone = model(x[:, 2:], torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(model(x, valid)[:, 2:], alone, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("left_padded", [False, True], ids=["right-padded", "left-padded"])
def test_one_position_per_row_equals_the_full_output_there(causal: bool, left_padded: bool) -> None:
    model = tower(causal).train()  # gradients too
    x = torch.randn(4, 9, 32, requires_grad=True)
    lengths = torch.tensor([9, 5, 1, 7])
    valid = torch.arange(9)[None, :] < lengths[:, None]
    if left_padded:
        valid = valid.flip(1)
    at = torch.tensor([8, 8, 8, 8]) if left_padded else lengths - 1
    at[3] = 4 if left_padded else 3  # a position before the row's last
    if left_padded:  # a padded position: it sees itself, as with the full mask
        at[1] = 2
    full = model(x, valid)[torch.arange(4), at]
    one = model(x, valid, at=at)
    assert one.shape == (4, 32)
    torch.testing.assert_close(one, full, atol=1e-5, rtol=1e-5)
    (grad_full,) = torch.autograd.grad(full.square().sum(), x)
    (grad_one,) = torch.autograd.grad(one.square().sum(), x)
    torch.testing.assert_close(grad_one, grad_full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="own mask and positions"):
        model(x, valid, at=at, positions=torch.zeros(4, 9, dtype=torch.long))


def test_cpu_bf16_autocast_keeps_attention_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys.models.tower as tower_module

    seen = []
    sdpa = tower_module.F.scaled_dot_product_attention

    def spy(q, k, v, **options):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **options)

    monkeypatch.setattr(tower_module.F, "scaled_dot_product_attention", spy)
    model = tower()
    x = torch.randn(2, 7, 32)
    valid = torch.ones(2, 7, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(x, valid)
        model(x, valid, at=torch.tensor([3, 6]))  # the one-query path too
    # Queries, keys and values come out of the rotation in fp32 (no bf16 round trip), and
    # attention runs without autocast, which would cast them to bf16.
    fp32 = torch.float32
    assert len(seen) == 2 * 2 and all(s == (fp32, fp32, fp32, False) for s in seen)
    exact = model(x, valid)
    assert not torch.equal(fast, exact)  # the projections ran in bf16
    torch.testing.assert_close(fast, exact, atol=0.1, rtol=0.05)
