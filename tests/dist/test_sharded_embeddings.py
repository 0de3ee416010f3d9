"""A sharded EmbeddingCollection on 2 gloo ranks equals the unsharded reference, for every
sharding type, in its forward output and in its weights after one fused SGD step."""

from __future__ import annotations

import pytest

from recsys.distributed.launch import RankFailedError, run_on_ranks
from recsys.distributed.planning import SHARDING_TYPES
from recsys.distributed.selfcheck import sharded_embedding_check

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    # One launch for all sharding types: starting ranks is the expensive part.
    per_rank = run_on_ranks(sharded_embedding_check, *SHARDING_TYPES, world_size=2)
    by_type: dict[str, list[dict]] = {}
    for rank_results in per_rank:
        for result in rank_results:
            by_type.setdefault(result["sharding_type"], []).append(result)
    return by_type


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_sharded_equals_reference(results: dict[str, list[dict]], sharding_type: str) -> None:
    ranks = results[sharding_type]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["world_size"] == 2
        assert r["forward_error"] == 0.0, r
        assert r["update_error"] < 1e-6, r
        assert r["rows_updated"] > 0, r


def test_shard_layout_follows_the_plan(results: dict[str, list[dict]]) -> None:
    shards = {kind: [r["local_shards"] for r in ranks] for kind, ranks in results.items()}
    # 2 tables: table-wise puts one whole table on each rank; row- and column-wise give every
    # rank a piece of both tables.
    assert shards == {"table_wise": [1, 1], "row_wise": [2, 2], "column_wise": [2, 2]}


def _fail_on_rank_1() -> int:
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("rank one gives up")
    return 7


@pytest.mark.parametrize("quiet", [True, False])
def test_failing_rank_is_reported_with_its_traceback(quiet: bool) -> None:
    with pytest.raises(RankFailedError, match="rank one gives up") as info:
        run_on_ranks(_fail_on_rank_1, world_size=2, quiet=quiet)
    message = str(info.value)
    assert "1 rank(s) failed running _fail_on_rank_1" in message
    assert "--- rank 1 (exit code 1) ---" in message
    assert "Traceback" in message and 'raise ValueError("rank one gives up")' in message
