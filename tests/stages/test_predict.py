"""The predict stage: raw-key requests scored as evaluate scores the same samples, one row
and one status per request, exactly once over ranks, and resumed after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.data.schema import DataError
from recsys.data.vocab import Vocabulary, from_stage
from recsys.distributed.launch import run_on_ranks
from recsys.stages import evaluate, finetune, predict, transfer
from recsys.stages.predictions import Pending, PendingError

TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=16"]
ROW_GROUP = 16  # 70 test samples: 5 chunks


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, synth_split) -> Path:
    out = tmp_path_factory.mktemp("predict") / "data"
    config = {"items": 60, "categories": 3, "min_events": 6, "max_events": 20, "seed": 2}
    return synth_split(out, row_group_rows=16, users=120, **config)


def item_key(ids: np.ndarray) -> np.ndarray:
    """Raw item keys unlike the dense ids (so a missing lookup cannot pass)."""
    return 1000 + 7 * np.asarray(ids, dtype=np.int64)


def user_key(ids) -> list[str]:
    return [f"u{int(i):04d}" for i in ids]


@pytest.fixture(scope="module")
def model(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finetuned stage whose vocabularies map other raw keys (ints for items, strings for
    users) to the same dense ids."""
    root = tmp_path_factory.mktemp("model")
    ctr = [*TINY, f"data.train={data / 'ctr_train'}", "run.max_steps=2"]
    transfer.main(["--strategy", "NT", "--out", str(root / "nt"), *ctr])
    finetune.main(["--init", str(root / "nt"), "--out", str(root / "finetune"), *ctr])
    vocab = root / "finetune" / "vocab"
    item = Vocabulary.read(vocab / "item.parquet")
    Vocabulary("item", item_key(np.arange(item.size)), item.side, item.side_sizes).write(
        vocab / "item.parquet"
    )
    users = Vocabulary.read(vocab / "user.parquet")
    Vocabulary("user", user_key(range(users.size))).write(vocab / "user.parquet")
    return root / "finetune"


@pytest.fixture(scope="module")
def requests(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ctr_test as labelled raw requests, in row groups of ROW_GROUP rows."""
    test = pq.read_table(data / "ctr_test" / "part-00000.parquet")
    history = test["history_item_ids"].combine_chunks()
    table = pa.table(
        {
            "user_id": user_key(test["user_id"].to_numpy()),
            "history": pa.ListArray.from_arrays(history.offsets, item_key(history.values)),
            "candidate": item_key(test["item_id"].to_numpy()),
            "label": test["label"],
        }
    )
    out = tmp_path_factory.mktemp("requests") / "requests.parquet"
    pq.write_table(table, out, row_group_size=ROW_GROUP)
    return out


def run(model: Path, requests: Path, out: Path, *extra: str) -> dict:
    return predict.main(["--model", str(model), "--requests", str(requests), "--out", str(out),
                         *TINY, *extra])  # fmt: skip


def parts(out: Path) -> pa.Table:
    return pq.read_table(out / "predictions").sort_by("row")


@pytest.fixture(scope="module")
def whole(model: Path, requests: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run on one rank."""
    out = tmp_path_factory.mktemp("whole") / "predict"
    run(model, requests, out)
    return out


def test_scores_and_metrics_are_evaluates_on_the_same_samples(
    data: Path, model: Path, whole: Path, tmp_path: Path
) -> None:
    evaluated = evaluate.main(["--model", str(model), "--data", str(data / "ctr_test"),
                               "--out", str(tmp_path / "evaluate"), *TINY])  # fmt: skip
    record = json.loads((whole / "stage.json").read_text())
    results = record["results"]
    for name in ("auc", "logloss", "ne", "calibration", "gauc", "samples"):
        assert results[name] == pytest.approx(evaluated["results"][name], rel=1e-6), name
    assert (results["requests"], results["scored"], record["chunks"]) == (70, 70, 5)
    assert results["unknown_candidate"] == results["unknown_history_ids"] == 0
    ours = parts(whole)
    theirs = pq.read_table(tmp_path / "evaluate" / "predictions")
    assert ours["row"].to_pylist() == list(range(70))
    assert ours["candidate"].to_pylist() == item_key(theirs["candidate_item"]).tolist()
    assert ours["user_id"].to_pylist() == user_key(theirs["user_id"].to_numpy())
    assert ours["label"].to_pylist() == theirs["label"].to_pylist()
    np.testing.assert_allclose(ours["score"].to_numpy(), theirs["score"].to_numpy(), rtol=1e-6)
    assert set(ours["status"].to_pylist()) == {"ok"}
    assert not (whole / "pending").exists() and (whole / "DONE").exists()


def test_each_bad_request_gets_one_row_with_its_status(model: Path, tmp_path: Path) -> None:
    a, b, c = item_key([3, 5, 8]).tolist()
    unknown, other = 5, 999_999  # keys no vocabulary holds (5: an id, not a key)
    rows = [  # (user, history, timestamps, candidate, expected status)
        ("u0001", [a, b, c], [1, 2, 3], a, "ok"),
        (None, [a], [1], a, "missing_value"),
        ("u0001", [a], [1], None, "missing_value"),
        ("u0001", None, None, a, "missing_value"),
        ("u0001", [], [], a, "empty_history"),
        ("new-user", [unknown, other], [1, 2], other, "all_unknown"),
        ("u0001", [a, b, c], [1, 2, 3], unknown, "ok"),  # unknown candidate, scored
        ("u0002", [unknown, a, other], [1, 2, 3], b, "ok"),  # two unknown history ids
        ("u0001", [a, b, c], [1, 2, 3], other, "ok"),  # as row 6: unseen keys score alike
        ("u0001", [c, b, a], [3, 2, 1], a, "ok"),  # put in time order: row 0
        ("u0001", [a, b, c], [1, 2], a, "bad_timestamps"),
        ("u0001", [a, b, c], [5, 5, 5], a, "ok"),  # ties keep their order: row 0
        ("u0001", [c, b, a], [1, 2, 3], a, "ok"),  # already in time order: not row 0
    ]
    path = tmp_path / "requests.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([r[0] for r in rows], pa.string()),
                "history": pa.array([r[1] for r in rows], pa.list_(pa.int64())),
                "history_timestamps": pa.array([r[2] for r in rows], pa.list_(pa.int64())),
                "candidate": pa.array([r[3] for r in rows], pa.int64()),
            }
        ),
        path,
        row_group_size=5,
    )
    results = run(model, path, tmp_path / "out")["results"]
    got = parts(tmp_path / "out")
    assert got["status"].to_pylist() == [r[4] for r in rows]
    assert got["row"].to_pylist() == list(range(len(rows)))
    scores = got["score"].to_pylist()
    assert [s is not None for s in scores] == [r[4] == "ok" for r in rows]
    assert scores[6] == scores[8] and scores[6] != scores[0]
    # Rows in other batches (row groups of 5) may differ in the last bits.
    assert scores[9] == pytest.approx(scores[0], rel=1e-6) == scores[11]
    assert abs(scores[12] - scores[0]) > 1e-4
    assert results == {
        "requests": 13,
        "scored": 7,
        "missing_value": 3,
        "bad_timestamps": 1,
        "empty_history": 1,
        "all_unknown": 1,
        "unknown_candidate": 2,
        "unknown_history_ids": 2,
    }
    assert "label" not in got.column_names


def test_a_missing_column_is_one_error_naming_file_and_column_before_any_work(
    model: Path, tmp_path: Path
) -> None:
    path = tmp_path / "requests.parquet"
    pq.write_table(pa.table({"user_id": ["u0001"], "candidate": [1000]}), path)
    with pytest.raises(DataError, match=rf"^{path}, column 'history': missing; requests need"):
        run(model, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    pq.write_table(pa.table({"user_id": [1], "history": [[1000]], "candidate": ["x"]}), path)
    with pytest.raises(DataError, match=r"'candidate': string keys, but the vocabulary's keys"):
        run(model, path, tmp_path / "out")
    pq.write_table(pa.table({"user_id": [1], "history": [[1000]], "candidate": [1]}).slice(0, 0),
                   path)  # fmt: skip
    with pytest.raises(DataError, match=r"no requests \(every file has 0 rows\)"):
        run(model, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reserved_rows_are_zeroed_and_no_other(model: Path) -> None:
    from recsys.checkpoint.weights import load_weights, named_weights
    from recsys.data.requests import model_meta
    from recsys.distributed.env import distributed
    from recsys.distributed.shards import local_shards, zero_rows
    from recsys.models.build import ctr_model
    from recsys.stages import build
    from recsys.stages.common import read_stage
    from recsys.stages.config import ModelSection, PlanSection

    vocabularies = from_stage(model)
    section = ModelSection(**read_stage(model)["config"]["model"])
    with distributed() as env:
        sharded = build.place(ctr_model(section, model_meta(vocabularies)), PlanSection(), env)
        load_weights(sharded, model / "weights", named_weights(sharded))
        before = {s.table: s.tensor.clone() for s in local_shards(sharded)}  # whole: one rank
        zero_rows(sharded, {"item": [60, 61], "category": [3, 4]})
        after = {s.table: s.tensor for s in local_shards(sharded)}
    assert {n: len(t) for n, t in after.items()} == {"item": 62, "category": 5}
    for name, reserved in (("item", [60, 61]), ("category", [3, 4])):
        assert before[name][reserved].abs().sum() > 0  # the model had them
        assert torch.equal(after[name][reserved], torch.zeros_like(before[name][reserved]))
        assert torch.equal(after[name][: reserved[0]], before[name][: reserved[0]])


def _predict(argv: list[str]) -> dict:
    return predict.main(argv)


def _interrupted(model: Path, requests: Path, out: Path, monkeypatch, after: int) -> None:
    """A one-rank run that stops (an exception) once ``after`` chunks are written."""
    written = []
    real = Pending.write

    def write(self, chunk, table, counts):
        if len(written) == after:
            raise KeyboardInterrupt("stopped")
        written.append(chunk.index)
        real(self, chunk, table, counts)

    with monkeypatch.context() as patched:
        patched.setattr(Pending, "write", write)
        with pytest.raises(KeyboardInterrupt):
            run(model, requests, out)
    assert not (out / "DONE").exists() and len(list((out / "pending").glob("chunk-*"))) == after


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(
    model: Path, requests: Path, whole: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "predict"
    _interrupted(model, requests, out, monkeypatch, after=2)
    with pytest.raises(PendingError, match=r"chunks of another run .*run\.resume=false starts"):
        run(model, requests, out, "data.batch_size=8")
    record = run(model, requests, out)
    assert record["resumed_chunks"] == 2
    assert parts(out).equals(parts(whole))
    again = tmp_path / "again"
    _interrupted(model, requests, again, monkeypatch, after=1)
    assert run(model, requests, again, "run.resume=false")["resumed_chunks"] == 0
    assert parts(again).equals(parts(whole))


@pytest.mark.dist
def test_two_ranks_resume_a_one_rank_run_each_request_exactly_once(
    model: Path, requests: Path, whole: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "predict"
    # Chunks 0-3 done: rank 1 (chunks 1, 3) has nothing left, and still joins every forward.
    _interrupted(model, requests, out, monkeypatch, after=4)
    argv = ["--model", str(model), "--requests", str(requests), "--out", str(out), *TINY]
    records = run_on_ranks(_predict, argv, world_size=2, quiet=True)
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["resumed_chunks"] == 4
    expected_results = json.loads((whole / "stage.json").read_text())["results"]
    # Other batches (each rank's), so other padded lengths: each score's fp32 rounding may
    # differ in the last bits (the scores are compared within 1e-6 below).
    assert records[0]["results"] == pytest.approx(expected_results, rel=1e-6)
    files = sorted(p.name for p in (out / "predictions").iterdir())
    assert files == ["part-00000.parquet", "part-00001.parquet"]
    rows = [pq.read_table(out / "predictions" / f)["row"].to_pylist() for f in files]
    assert rows[0] == [*range(0, 16), *range(32, 48), *range(64, 70)]  # chunks 0, 2, 4
    assert rows[1] == [*range(16, 32), *range(48, 64)]  # chunks 1, 3
    together = parts(out)
    assert together["row"].to_pylist() == list(range(70))  # each request exactly once
    expected = parts(whole)
    for column in ("user_id", "candidate", "status", "label"):
        assert together[column].equals(expected[column]), column
    np.testing.assert_allclose(together["score"].to_numpy(), expected["score"].to_numpy(),
                               rtol=1e-6)  # fmt: skip
    assert not (out / "pending").exists()


def test_null_labels_are_left_out_and_undefined_metrics_are_null(
    model: Path, requests: Path, tmp_path: Path
) -> None:
    table = pq.read_table(requests).slice(0, 10)
    labels = pa.array([None] + [1] * 9, pa.int64())  # one class: AUC is undefined
    path = tmp_path / "requests.parquet"
    pq.write_table(table.set_column(3, "label", labels), path)
    results = run(model, path, tmp_path / "out")["results"]
    assert (results["scored"], results["samples"], results["auc"]) == (10, 9.0, None)
    assert results["logloss"] > 0 and (tmp_path / "out" / "DONE").exists()
    assert parts(tmp_path / "out")["label"].to_pylist() == labels.to_pylist()
