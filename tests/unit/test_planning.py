"""Manual sharding plans name tables, use the fused kernel, and reject wrong names."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
)

from recsys.distributed.planning import column_blocks, embedding_modules, manual_plan


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        meta = torch.device("meta")
        self.sequence = EmbeddingCollection(
            device=meta,
            tables=[
                EmbeddingConfig(
                    name="item",
                    embedding_dim=16,
                    num_embeddings=4_000_000_000,
                    feature_names=["history", "candidate"],
                ),
                EmbeddingConfig(
                    name="category",
                    embedding_dim=16,
                    num_embeddings=100,
                    feature_names=["history_category"],
                ),
            ],
        )
        self.pooled = EmbeddingBagCollection(
            device=meta,
            tables=[
                EmbeddingBagConfig(
                    name="user", embedding_dim=8, num_embeddings=1000, feature_names=["user_id"]
                ),
            ],
        )


def test_plan_shards_each_table_as_named() -> None:
    model = Model()
    plan = manual_plan(
        model, {"item": "row_wise", "category": "table_wise", "user": "column_wise"}, world_size=4
    )
    assert set(plan.plan) == {"sequence", "pooled"}
    item = plan.plan["sequence"]["item"]
    assert item.sharding_type == "row_wise"
    assert item.compute_kernel == "fused"
    assert item.ranks == [0, 1, 2, 3]
    assert sum(s.shard_sizes[0] for s in item.sharding_spec.shards) == 4_000_000_000
    assert plan.plan["sequence"]["category"].ranks == [1]  # second table → rank 1
    user = plan.plan["pooled"]["user"]
    # Column blocks are multiples of 4 wide: a width-8 table makes 2 blocks of 4 on 4 ranks.
    assert [s.shard_sizes for s in user.sharding_spec.shards] == [[1000, 4], [1000, 4]]
    assert user.ranks == [0, 1]


@pytest.mark.parametrize(
    ("dim", "world_size", "blocks"),
    [
        (8, 1, 1),
        (8, 2, 2),
        (8, 3, 2),
        (8, 16, 2),
        (64, 3, 2),
        (64, 16, 16),
        (96, 8, 8),
        (96, 5, 4),
        (6, 2, 1),
    ],
)
def test_column_blocks(dim: int, world_size: int, blocks: int) -> None:
    assert column_blocks(dim, world_size) == blocks


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 16])
def test_column_wise_plans_for_any_world_size(world_size: int) -> None:
    plan = manual_plan(
        Model(),
        {"item": "column_wise", "category": "column_wise", "user": "column_wise"},
        world_size=world_size,
    )
    item = plan.plan["sequence"]["item"]
    widths = [s.shard_sizes[1] for s in item.sharding_spec.shards]
    assert sum(widths) == 16 and len(set(widths)) == 1 and widths[0] % 4 == 0
    assert item.ranks == list(range(len(widths)))


def test_duplicate_table_names_are_refused() -> None:
    model = Model()
    model.other = EmbeddingBagCollection(
        device=torch.device("meta"),
        tables=[
            EmbeddingBagConfig(
                name="user", embedding_dim=8, num_embeddings=10, feature_names=["u2"]
            )
        ],
    )
    with pytest.raises(ValueError, match="table 'user' is in both 'pooled' and 'other'"):
        manual_plan(
            model, {"item": "row_wise", "category": "row_wise", "user": "row_wise"}, world_size=2
        )


def test_meta_model_holds_no_table_memory() -> None:
    assert all(p.is_meta for m in embedding_modules(Model()).values() for p in m.parameters())


@pytest.mark.parametrize(
    ("sharding", "message"),
    [
        (
            {"item": "row_wise", "category": "row_wise", "user": "row_wise", "price": "row_wise"},
            r"tables the model does not have: \['price'\]",
        ),
        ({"item": "row_wise", "user": "row_wise"}, r"no sharding type for tables \['category'\]"),
        (
            {"item": "diagonal", "category": "row_wise", "user": "row_wise"},
            r"unknown sharding types \{'item': 'diagonal'\}",
        ),
    ],
)
def test_plan_errors_name_the_table(sharding: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        manual_plan(Model(), sharding, world_size=2)


def test_torchrec_planner_follows_constraints() -> None:
    from recsys.distributed.planning import planned

    plan = planned(
        Model(), world_size=4, sharding_types={"item": ["row_wise"], "category": ["table_wise"]}
    )
    item = plan.plan["sequence"]["item"]
    assert (item.sharding_type, item.compute_kernel) == ("row_wise", "fused")
    assert plan.plan["sequence"]["category"].sharding_type == "table_wise"
    assert plan.plan["pooled"]["user"].compute_kernel == "fused"
    with pytest.raises(ValueError, match=r"tables the model does not have: \['price'\]"):
        planned(Model(), world_size=2, sharding_types={"price": ["row_wise"]})


def test_tables_no_plan_fits_are_one_line_naming_the_job() -> None:
    """A dataset.json edited to 1e13 items: 1e13 × 16 × 4 bytes fits no CPU rank."""
    from recsys.distributed.planning import NoPlan, planned

    class Huge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sequence = EmbeddingCollection(
                device=torch.device("meta"),
                tables=[
                    EmbeddingConfig(
                        name="item", embedding_dim=16, num_embeddings=10**13, feature_names=["h"]
                    )
                ],
            )

    with pytest.raises(NoPlan, match=r"^no sharding plan fits this model's tables on 2 cpu") as e:
        planned(Huge(), world_size=2, sharding_types={"item": ["table_wise"]})
    assert "\n" not in str(e.value) and "`recsys plan`" in str(e.value)
