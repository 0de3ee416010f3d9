"""The LUM pipeline end to end: TorchX jobs of 2 processes on local_cwd, tiny synthetic data
with two conditions, run from an experiment file's `lum` arm and reported."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from recsys.pipelines import experiment

pytestmark = [pytest.mark.dist, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_a_lum_arm_runs_its_three_steps_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = tmp_path / "stages.yaml"
    stages.write_text(
        "model: {size: L1H16A2, max_len: 12}\ndata: {batch_size: 16}\n"
        "run: {epochs: 2}\noptim: {lr: 0.003}\nlum: {pack: 48}\n"
    )
    data, out = tmp_path / "data", tmp_path / "exp"
    path = tmp_path / "lum.yaml"
    path.write_text(
        f"out: {out}\nconfig: {stages}\n"
        f"data:\n  path: {data}\n  make: recsys data synth --users 120 --items 48 "
        f"--categories 4 --conditions 2 --min-len 6 --max-len 16 --row-group-rows 16 --out {data}\n"
        "arms: [{name: lum, pipeline: lum, rankers: [din], variants: [DLRM, +LUM+match]}]\n"
    )
    monkeypatch.chdir(REPO)
    spec = experiment.load(path)
    steps = experiment.run(spec, None, "torchx.yaml", console=io.StringIO())
    assert [s.out.name for s in steps] == [
        "lum_pretrain",
        "lum_query",
        "lum_finetune-din-dlrm",
        "lum_finetune-din-lum_match",
    ]
    for step in steps:
        record = json.loads((step.out / "stage.json").read_text())
        assert record["world_size"] == 2 and (step.out / "DONE").exists()
    query = json.loads((out / "L1H16A2" / "lum_query" / "stage.json").read_text())
    assert query["results"]["users"] == 120 and query["queries"] == {"condition": [0, 1]}
    ranked = json.loads((steps[-1].out / "stage.json").read_text())
    assert ranked["strategy"] == "+LUM+match" and ranked["features"] == 2 * 16 + 2

    from recsys import report

    _, rows = report.write(spec.out)
    assert sorted(r["strategy"] for r in rows) == ["+LUM+match", "DLRM"]
    lum = next(r for r in rows if r["strategy"] == "+LUM+match")
    alone = next(r for r in rows if r["strategy"] == "DLRM")
    assert lum["imp"] == pytest.approx(lum["auc"] / alone["auc"] - 1)  # against the ranker alone
    assert "against the ranker alone" in (out / "report.md").read_text()
    # A rerun skips every stage.
    again = experiment.run(spec, None, "torchx.yaml", console=io.StringIO())
    assert all(s.skipped for s in again)
