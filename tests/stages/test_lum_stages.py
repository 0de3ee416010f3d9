"""LUM's three stages in this process (a world of one) on synthetic logs with a planted
condition effect: pretrain, query every user under both conditions, rank with the answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.data.protocol import write_split
from recsys.data.synth import SynthConfig, make
from recsys.models.lum_features import UserFeatures
from recsys.stages import lum_finetune, lum_pretrain, lum_query
from recsys.stages.common import StageError

TINY = ["model.size=L1H16A2", "model.max_len=12", "data.batch_size=16", "lum.pack=48"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lum")
    result, source = make(
        SynthConfig(
            users=150,
            items=60,
            categories=6,
            min_events=8,
            max_events=16,
            stay=0.9,
            conditions=2,
            seed=4,
        )
    )
    write_split(root / "data", result, source, row_group_rows=32)
    data = root / "data"
    pretrain = lum_pretrain.main(
        [
            "--out",
            str(root / "lum_pretrain"),
            *TINY,
            f"data.train={data / 'seq'}",
            "run.epochs=10",
            "optim.lr=0.003",
        ]
    )
    query = lum_query.main(
        [
            "--out",
            str(root / "lum_query"),
            "--init",
            str(root / "lum_pretrain"),
            *TINY,
            f"data.train={data / 'seq'}",
        ]
    )
    return {"root": root, "data": data, "pretrain": pretrain, "query": query}


def test_pretraining_learns_the_next_item_under_its_condition(chain: dict) -> None:
    results = chain["pretrain"]["results"]
    assert chain["pretrain"]["conditions"] == {"condition": 2 + 2}  # + unknown, padding
    # In-batch candidates are at most the 60 items: chance is about 1/60.
    assert results["train_hit_rate"] > 3 / 60 and np.isfinite(results["train_loss"])


def test_every_user_is_asked_under_every_condition(chain: dict) -> None:
    assert chain["query"]["queries"] == {"condition": [0, 1]}  # every value by default
    features = UserFeatures.load(chain["root"] / "lum_query" / "features")
    assert features.queries == 2 and features.dim == 16
    assert features.known.all() and len(features.known) == 150
    # The planted effect: each condition has its own walk between the 6 clusters, so the
    # item a condition's answer scores highest should be in the cluster of the user's last
    # event under that condition (the category is the cluster here): chance is 1/6.
    seq = pq.read_table(next((chain["data"] / "seq").glob("*.parquet"))).to_pydict()
    cluster = np.zeros(60, dtype=np.int64)
    for items, categories in zip(seq["item_ids"], seq["category_ids"], strict=True):
        cluster[items] = categories
    hits = []
    for user, categories, conditions in zip(
        seq["user_id"], seq["category_ids"], seq["condition_ids"], strict=True
    ):
        for c in (0, 1):
            past = [k for k, cc in zip(categories, conditions, strict=True) if cc == c]
            if past:
                top = int(np.argmax(features.items @ features.outputs[user, c]))
                hits.append(cluster[top] == past[-1])
    assert np.mean(hits) > 2 / 6
    meta = json.loads((chain["root"] / "lum_query" / "features" / "features.json").read_text())
    assert meta["queried_users"] == 150 and meta["conditions"] == {"condition": [0, 1]}


@pytest.mark.parametrize(
    "options, strategy, width",
    [
        ([], "DLRM", 0),
        (["lum.matching=false"], "+LUM", 2 * 16),
        (["lum.direct=false"], "+LUM match", 2),
        ([], "+LUM+match", 2 * 16 + 2),
    ],
)
def test_rankers_train_with_the_answers(
    chain: dict, tmp_path: Path, options: list[str], strategy: str, width: int
) -> None:
    data = chain["data"]
    features = [] if strategy == "DLRM" else [f"lum.features={chain['root'] / 'lum_query'}"]
    for arch in ("gpsd", "din"):
        record = lum_finetune.main(
            [
                "--out",
                str(tmp_path / arch),
                *TINY,
                f"model.arch={arch}",
                f"data.train={data / 'ctr_train'}",
                f"data.valid={data / 'ctr_test'}",
                *features,
                *options,
            ]
        )
        assert record["strategy"] == strategy and record["features"] == width
        assert 0.0 <= record["results"]["valid_auc"] <= 1.0 and record["epochs"]


def test_features_of_another_stage_are_refused(chain: dict, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="is not a lum_query stage"):
        lum_finetune.main(
            [
                "--out",
                str(tmp_path / "x"),
                *TINY,
                f"data.train={chain['data'] / 'ctr_train'}",
                f"lum.features={chain['root'] / 'lum_pretrain'}",
            ]
        )


def test_queries_must_name_the_models_conditions(chain: dict, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="condition features are \\['condition'\\]"):
        lum_query.main(
            [
                "--out",
                str(tmp_path / "q"),
                "--init",
                str(chain["root"] / "lum_pretrain"),
                *TINY,
                f"data.train={chain['data'] / 'seq'}",
                "lum.queries={liked: [0, 1]}",
            ]
        )
