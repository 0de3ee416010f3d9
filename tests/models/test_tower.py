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
