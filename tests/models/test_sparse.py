"""Tables by name: tied features, frozen collections, pooled tables, meta-device sizes."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from recsys.models.sparse import SparseArch, SparseConfig, TableSpec, padded

TABLES = (
    TableSpec("item", 50, 8, ("history_item", "candidate_item")),
    TableSpec("category", 5, 8, ("history_category", "candidate_category")),
    TableSpec("user", 10, 4, ("user",), pooling="sum"),
)


def batch() -> KeyedJaggedTensor:
    """Two samples: histories [1, 2, 3] and [4], candidates 7 and 9, users' pooled ids."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["history_item", "candidate_item", "history_category", "candidate_category", "user"],
        values=torch.tensor([1, 2, 3, 4, 7, 9, 0, 1, 2, 3, 2, 4, 5, 5, 6]),
        lengths=torch.tensor([3, 1, 1, 1, 3, 1, 1, 1, 2, 1]),
    )


def test_one_table_serves_tied_features() -> None:
    arch = SparseArch(SparseConfig(TABLES))
    sequences, pooled = arch(batch())
    weight = arch.sequence.embeddings["item"].weight
    assert torch.equal(sequences["history_item"].values(), weight[torch.tensor([1, 2, 3, 4])])
    assert torch.equal(sequences["candidate_item"].values(), weight[torch.tensor([7, 9])])
    user = arch.pooled.embedding_bags["user"].weight
    assert torch.allclose(pooled["user"], torch.stack([user[5] + user[5], user[6]]))


def test_frozen_table_gets_no_gradient_and_stays_bitwise_equal() -> None:
    torch.manual_seed(0)
    arch = SparseArch(SparseConfig(TABLES, frozen=("category",)))
    frozen = arch.sequence_frozen.embeddings["category"].weight
    before = frozen.detach().clone()
    # Sharding does not keep requires_grad=False, so the detached output alone must stop
    # every gradient: prove it with the flag on.
    frozen.requires_grad_(True)
    optimizer = torch.optim.Adam(arch.parameters(), lr=0.1)  # frozen table included
    for _ in range(3):
        sequences, pooled = arch(batch())
        loss = sum(j.values().square().sum() for j in sequences.values()) + pooled["user"].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert frozen.grad is None
    assert torch.equal(frozen, before)
    assert arch.sequence.embeddings["item"].weight.grad is not None


def test_frozen_tables_stored_in_fp16_look_up_their_rounded_values() -> None:
    torch.manual_seed(0)
    arch = SparseArch(SparseConfig(TABLES, frozen=("category", "user"), frozen_dtype="fp16"))
    category = arch.sequence_frozen.embeddings["category"].weight
    user = arch.pooled_frozen.embedding_bags["user"].weight
    item = arch.sequence.embeddings["item"].weight
    assert (category.dtype, user.dtype, item.dtype) == (torch.float16, torch.float16, torch.float32)
    sequences, pooled = arch(batch())
    looked_up = sequences["history_category"].values()
    assert looked_up.dtype == torch.float32 and not looked_up.requires_grad
    assert torch.equal(looked_up, category[torch.tensor([0, 1, 2, 3])].float())
    assert torch.allclose(pooled["user"], torch.stack([2 * user[5].float(), user[6].float()]))
    with pytest.raises(ValueError, match="stored as one of fp32, fp16, int8, got 'int4'"):
        SparseConfig(TABLES, frozen=("user",), frozen_dtype="int4")
    with pytest.raises(ValueError, match="frozen pooled tables are stored fp32 or fp16, not int8"):
        SparseArch(SparseConfig(TABLES, frozen=("user",), frozen_dtype="int8"))


def test_missing_feature_is_named() -> None:
    arch = SparseArch(SparseConfig(TABLES[:1]))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["history_item"], values=torch.tensor([1]), lengths=torch.tensor([1])
    )
    with pytest.raises(KeyError, match=r"features \['candidate_item'\] are missing"):
        arch(kjt)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="frozen tables \\['price'\\] do not exist"):
        SparseConfig(TABLES, frozen=("price",))
    with pytest.raises(ValueError, match="a feature is served by two tables"):
        SparseConfig((TABLES[0], TableSpec("other", 3, 8, ("candidate_item",))))


def test_huge_tables_build_on_meta() -> None:
    big = SparseConfig((TableSpec("item", 4_000_000_000, 64, ("history_item",)),))
    arch = SparseArch(big, torch.device("meta"))
    weight = arch.sequence.embeddings["item"].weight
    assert weight.is_meta and weight.shape == (4_000_000_000, 64)


def test_padded_keeps_jagged_order() -> None:
    from torchrec import JaggedTensor

    jagged = JaggedTensor(values=torch.arange(6.0).view(6, 1), lengths=torch.tensor([2, 0, 4]))
    dense, valid = padded(jagged)
    assert dense.squeeze(-1).tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [2, 3, 4, 5]]
    assert valid.tolist() == [[True, True, False, False], [False] * 4, [True] * 4]


def test_every_table_starts_at_the_same_scale() -> None:
    torch.manual_seed(0)
    arch = SparseArch(
        SparseConfig(
            (
                TableSpec("item", 100_000, 16, ("history_item",)),
                TableSpec("category", 50, 16, ("history_category",)),
            )
        )
    )
    for name in ("item", "category"):
        weight = arch.sequence.embeddings[name].weight
        assert weight.std().item() == pytest.approx(0.02, rel=0.1), name
        assert weight.abs().max().item() <= 0.02 * 3**0.5 + 1e-6
