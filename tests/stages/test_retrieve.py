"""The ``retrieve`` stage end to end on a tiny pretrain stage: in this process (a world of
one) and on 2 gloo ranks with a row-wise item table, which must give the same answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.protocol import write_split
from recsys.data.synth import SynthConfig, make
from recsys.data.vocab import Vocabulary
from recsys.distributed.launch import run_on_ranks
from recsys.distributed.topk import Retrieved
from recsys.stages import pretrain, retrieve
from recsys.stages.common import StageError
from recsys.stages.recommendations import Answers

pytestmark = pytest.mark.dist  # the module's stage also runs on 2 gloo ranks

TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=16"]
ROW_WISE = "plan.sharding_types={item: [row_wise]}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("retrieve")
    result, source = make(
        SynthConfig(users=120, items=60, categories=3, min_events=6, max_events=20, seed=2)
    )
    write_split(root / "data", result, source, row_group_rows=16)
    seq = root / "data" / "seq"
    pretrain.main(["--out", str(root / "pre"), *TINY, f"data.train={seq}", "run.max_steps=20"])
    args = ["--model", str(root / "pre"), "--data", str(root / "data" / "ctr_test")]
    one = retrieve.main([*args, "--out", str(root / "one"), "data.batch_size=8"])
    two = run_on_ranks(
        retrieve.main, [*args, "--out", str(root / "two"), "data.batch_size=8", ROW_WISE]
    )
    return {"root": root, "one": one, "two": two[0]}


def answers(stage: Path) -> dict[int, dict]:
    rows = pq.read_table(sorted((stage / "recommendations").glob("part-*.parquet"))).to_pylist()
    return {row["user_id"]: row for row in rows}


def test_every_held_out_item_is_ranked_and_the_metrics_follow_from_the_ranks(chain) -> None:
    root, results = chain["root"], chain["one"]["results"]
    test = pq.read_table(root / "data" / "ctr_test" / "part-00000.parquet").to_pylist()
    positives = {r["user_id"]: r for r in test if r["label"] == 1}
    got = answers(root / "one")
    assert set(got) == set(positives) and results["users"] == len(positives) > 20
    ranks = np.array([got[u]["target_rank"] for u in positives])
    assert (ranks >= 1).all() and (ranks <= 60).all()
    assert results["hr@10"] == pytest.approx(float(np.mean(ranks <= 10)))
    ndcg = np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0)
    assert results["ndcg@10"] == pytest.approx(float(ndcg.mean()))
    assert results["mrr"] == pytest.approx(float(np.mean(1 / ranks)))
    for user, row in positives.items():
        answer = got[user]
        assert answer["target_item"] == row["item_id"]
        assert len(answer["items"]) == 10 and answer["scores"] == sorted(answer["scores"])[::-1]
        assert not set(answer["items"]) & set(row["history_item_ids"])  # seen: left out
        assert all(0 <= i < 60 for i in answer["items"])  # known items only
    metrics = json.loads((root / "one" / "metrics.json").read_text())
    assert metrics == results and chain["one"]["config"]["plan"]


def test_two_ranks_with_a_row_wise_table_give_the_same_answers(chain) -> None:
    two = chain["two"]
    assert two["world_size"] == 2
    assert two["config"]["plan"]["sharding_types"] == {"item": ["row_wise"]}
    for key, value in chain["one"]["results"].items():
        assert two["results"][key] == pytest.approx(value, abs=1e-9), key
    parts = sorted((chain["root"] / "two" / "recommendations").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    one, both = answers(chain["root"] / "one"), answers(chain["root"] / "two")
    assert one.keys() == both.keys()
    for user in one:
        assert both[user]["items"] == one[user]["items"], user
        assert both[user]["target_rank"] == one[user]["target_rank"]
        np.testing.assert_allclose(both[user]["scores"], one[user]["scores"], rtol=1e-5)


def test_a_seq_dataset_gets_answers_without_metrics(chain, tmp_path: Path) -> None:
    root = chain["root"]
    record = retrieve.main(
        [
            *("--model", str(root / "pre"), "--data", str(root / "data" / "seq")),
            *("--out", str(tmp_path / "seq"), "--k", "3", "--no-exclude-seen"),
        ]
    )
    assert record["results"] == {"users": 120, "k": 3, "skipped_users": 0}
    got = answers(tmp_path / "seq")
    assert len(got) == 120 and all(len(r["items"]) == 3 for r in got.values())
    assert "target_rank" not in next(iter(got.values()))


def test_wrong_inputs_are_refused_by_name(chain, tmp_path: Path) -> None:
    root = chain["root"]
    model = ["--model", str(root / "pre"), "--data", str(root / "data" / "ctr_test")]
    with pytest.raises(StageError, match="--k must be >= 1, got 0"):
        retrieve.main([*model, "--out", str(tmp_path / "a"), "--k", "0"])
    with pytest.raises(StageError, match="is a retrieve stage, not pretrain"):
        retrieve.main(["--model", str(root / "one"), *model[2:], "--out", str(tmp_path / "b")])


def test_answers_carry_raw_ids_from_the_vocabularies() -> None:
    answers = Answers(k=3, evaluated=True)
    found = Retrieved(
        ids=torch.tensor([[2, 0, -1]]),
        scores=torch.tensor([[0.5, 0.25, -float("inf")]]),
        ranks=torch.tensor([0]),
    )
    answers.add(torch.tensor([1]), torch.tensor([3]), found)
    items = Vocabulary("item", pa.array(["a", "b", "c", "d"]))
    users = Vocabulary("user", pa.array([100, 200]))
    (row,) = answers.table({"item": items, "user": users}).to_pylist()
    assert row == {
        "user_id": 200,
        "items": ["c", "a"],
        "scores": [0.5, 0.25],
        "target_item": "d",
        "target_rank": None,  # no known target: no rank
    }
    (dense,) = answers.table({}).to_pylist()
    assert dense["user_id"] == 1 and dense["items"] == [2, 0]


def test_the_model_reads_the_last_max_len_events_of_each_list() -> None:
    from torchrec import KeyedJaggedTensor

    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["item", "category"],
        values=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
        lengths=torch.tensor([3, 0, 2, 4, 1, 0]),
    )
    cut = retrieve.recent(features, 2)
    assert cut.keys() == ["item", "category"]
    assert [t.tolist() for t in cut["item"].to_dense()] == [[2, 3], [], [4, 5]]
    assert [t.tolist() for t in cut["category"].to_dense()] == [[8, 9], [10], []]


def test_recsys_recommend_runs_the_stage_and_shows_the_first_answers(
    chain, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from recsys.cli import main as cli

    root, out = chain["root"], tmp_path / "rec"
    args = ["recommend", "--model", str(root / "pre"), "--data", str(root / "data" / "ctr_test")]
    assert cli([*args, "--out", str(out), "--k", "4", "--show", "2", "data.batch_size=8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("users=") and "hr@4=" in lines[0] and len(lines) == 3
    first = pq.read_table(out / "recommendations").to_pylist()[0]
    shown = " ".join(map(str, first["items"]))
    assert lines[1] == (
        f"user {first['user_id']}: {shown} (held out: {first['target_item']}, "
        f"rank {first['target_rank']})"
    )
    assert json.loads((out / "stage.json").read_text())["results"]["k"] == 4


def test_an_item_table_the_config_leaves_free_is_kept_in_whole_rows() -> None:
    from recsys.stages.config import load
    from recsys.stages.retrieve import whole_rows

    free = load(None, ["plan.sharding_types={category: [table_wise]}"], "retrieve")
    assert whole_rows(free).plan.sharding_types == {
        "category": ["table_wise"],
        "item": ["row_wise", "table_wise"],
    }
    named = load(None, ["plan.sharding_types={item: [column_wise]}"], "retrieve")
    assert whole_rows(named) is named  # refused after placement, naming the fix
