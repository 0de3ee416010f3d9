"""Exact top-K and target ranks over a sharded item table (recsys.distributed.topk) on 2 gloo
ranks equal an unsharded brute force (one matmul over the known items, seen items masked,
topk), and their HR@K, NDCG@K and MRR equal torchmetrics' retrieval metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG

from recsys.checkpoint.weights import named_weights
from recsys.distributed import topk
from recsys.distributed.env import distributed
from recsys.distributed.launch import run_on_ranks
from recsys.distributed.planning import manual_plan
from recsys.distributed.shards import load_full_tables
from recsys.distributed.wrap import shard
from recsys.models.generative import GenerativeConfig, GenerativeModel
from recsys.models.tower import TowerConfig

pytestmark = pytest.mark.dist

KNOWN, ROWS, DIM, K = 37, 39, 16, 5  # rows KNOWN, KNOWN + 1: unknown and padding
USERS = (6, 3)  # per rank: uneven on purpose
SHARDINGS = ("row_wise", "table_wise")


def full_table() -> torch.Tensor:
    table = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))
    table[KNOWN:] = 100.0  # the reserved rows would beat every item if they were scored
    return table


def queries(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank's users, seen ids (-1: padding) and targets (-1: none)."""
    g = torch.Generator().manual_seed(10 + rank)
    n = USERS[rank]
    users = torch.randn(n, DIM, generator=g)
    seen = torch.randint(0, KNOWN + 2, (n, KNOWN), generator=g)  # reserved ids too
    seen[:, 7:] = -1
    seen[0, 3:] = -1
    targets = torch.randint(0, KNOWN, (n,), generator=g)
    seen[1, 0] = targets[1]  # a repeated item: still ranked
    targets[2] = -1
    if rank == 0:
        seen[3, :7] = torch.arange(KNOWN - 3, KNOWN + 4)  # the last 3 items and past them
        seen[4, :] = torch.arange(KNOWN)  # every item seen but 3: fewer than K left
        seen[4, -3:] = -1
    return users, seen, targets


def on_ranks(scoring: str) -> dict:
    with distributed() as env:
        users, seen, targets = queries(env.rank)
        out = {}
        for sharding in (*SHARDINGS, "column_wise"):
            config = GenerativeConfig(
                TowerConfig.from_name("L1H16A2", max_len=8), ROWS, item_keys=KNOWN
            )
            model = GenerativeModel(config, sparse_device=torch.device("meta"))
            plan = manual_plan(model, {"item": sharding}, world_size=env.world_size)
            sharded = shard(model, plan, env)
            load_full_tables(sharded, {"item": full_table()})
            try:
                block = topk.catalogue(named_weights(sharded)["table/item"], KNOWN)
            except topk.ShardingNotSupported as err:
                out[sharding] = str(err)
                continue
            found = topk.retrieve(users, block, K, seen, targets, scoring=scoring)
            out[sharding] = (found, [(first, len(rows)) for first, rows in block.rows])
        return out


@pytest.fixture(scope="module", params=["dot", "cosine"])
def ranked(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, run_on_ranks(on_ranks, request.param, world_size=2)


def brute_force(users, seen, targets, scoring: str):
    """Every known item's score, the seen ones (not the target) at -inf for the rank and all
    of them for the top K."""
    table = full_table()[:KNOWN]
    if scoring == "cosine":
        users, table = (torch.nn.functional.normalize(t, dim=-1) for t in (users, table))
    scores = users @ table.T
    listed, ranked = scores.clone(), scores.clone()
    for u, ids in enumerate(seen):
        for i in ids.tolist():
            if 0 <= i < KNOWN:
                listed[u, i] = -math.inf
                if i != targets[u]:
                    ranked[u, i] = -math.inf
    return scores, listed, ranked


def test_top_k_and_ranks_equal_the_brute_force_on_every_sharding(ranked) -> None:
    scoring, results = ranked
    for rank, result in enumerate(results):
        users, seen, targets = queries(rank)
        scores, listed, ranked_scores = brute_force(users, seen, targets, scoring)
        best, ids = listed.topk(K, dim=1)
        for sharding in SHARDINGS:
            found, _ = result[sharding]
            for u in range(len(users)):
                real = best[u] > -math.inf
                assert found.ids[u, : int(real.sum())].tolist() == ids[u][real].tolist(), (
                    sharding,
                    rank,
                    u,
                )
                assert (found.ids[u, int(real.sum()) :] == -1).all()
                torch.testing.assert_close(found.scores[u][real], best[u][real])
                t = int(targets[u])
                expected = 0 if t < 0 else 1 + int((ranked_scores[u] > scores[u, t]).sum())
                assert int(found.ranks[u]) == expected, (sharding, rank, u)
            assert int(found.ids.max()) < KNOWN  # reserved rows never come back


def test_fewer_candidates_than_k_are_padded_and_repeats_are_ranked(ranked) -> None:
    _, results = ranked
    found, _ = results[0]["row_wise"]
    # User 4 of rank 0 has seen all but the last 3 items; user 3 saw ids 34..40.
    assert sorted(found.ids[4, :3].tolist()) == [34, 35, 36] and found.ids[4, 3:].tolist() == [
        -1,
        -1,
    ]
    assert (found.scores[4, 3:] == -math.inf).all()
    assert not set(found.ids[3].tolist()) & {34, 35, 36}
    _, seen, targets = queries(0)
    assert int(found.ranks[1]) >= 1 and int(targets[1]) in seen[1].tolist()
    assert int(found.ranks[2]) == 0  # no target


def test_each_rank_scores_where_its_rows_live(ranked) -> None:
    _, results = ranked
    blocks = {s: [r[s][1] for r in results] for s in SHARDINGS}
    # Row-wise: two parts of the known rows; table-wise: one rank holds and scores them all.
    for sharding in SHARDINGS:
        covered = sorted((first, n) for rank in blocks[sharding] for first, n in rank if n)
        ids = [i for first, n in covered for i in range(first, first + n)]
        assert ids == list(range(KNOWN)), sharding
    assert all(len(rank) == 1 and rank[0][1] < KNOWN for rank in blocks["row_wise"])
    assert sorted(sum(n for _, n in rank) for rank in blocks["table_wise"]) == [0, KNOWN]


def test_hr_ndcg_mrr_equal_torchmetrics_retrieval_metrics(ranked) -> None:
    scoring, results = ranked
    hit, ndcg, mrr = RetrievalHitRate(top_k=K), RetrievalNormalizedDCG(top_k=K), RetrievalMRR()
    ranks = []
    query = 0
    for rank, result in enumerate(results):
        users, seen, targets = queries(rank)
        _, _, ranked_scores = brute_force(users, seen, targets, scoring)
        found, _ = result["row_wise"]
        for u in range(len(users)):
            if targets[u] < 0:
                continue
            candidates = ranked_scores[u] > -math.inf  # every item not seen, and the target
            relevant = torch.zeros(KNOWN, dtype=torch.bool)
            relevant[targets[u]] = True
            index = torch.full((int(candidates.sum()),), query)
            for metric in (hit, ndcg, mrr):
                metric.update(ranked_scores[u][candidates], relevant[candidates], indexes=index)
            ranks.append(found.ranks[u])
            query += 1
    ours = topk.ranking_metrics(torch.stack(ranks), K)
    n = ours["users"]
    assert n == query >= 6
    assert ours[f"hr@{K}"] / n == pytest.approx(float(hit.compute()), abs=1e-6)
    assert ours[f"ndcg@{K}"] / n == pytest.approx(float(ndcg.compute()), abs=1e-6)
    assert ours["mrr"] / n == pytest.approx(float(mrr.compute()), abs=1e-6)
    assert 0 < ours[f"hr@{K}"] < n  # some hits, some misses: the comparison can tell


def test_column_wise_tables_are_refused_by_name(ranked) -> None:
    _, results = ranked
    for result in results:
        assert "split by columns" in result["column_wise"]
        assert "row-wise or table-wise" in result["column_wise"]


def test_a_table_every_rank_holds_whole_is_scored_once() -> None:
    block = topk.catalogue(full_table(), KNOWN)  # no process group: a world of one
    ((first, rows),) = block.rows
    assert first == 0 and torch.equal(rows, full_table()[:KNOWN])
