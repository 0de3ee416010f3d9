"""Experiment files: checked on load, and a tiny study run end to end into its report.

The smoke study is the CI version of configs/ml100k/*-study.yaml: the same file format, data
made by its own `data.make` command, one tiny size, NT and ST&SF, two seeds, a report with
its figures written beside a markdown file as `docs/results.md` is.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from recsys.pipelines import experiment
from recsys.pipelines.gpsd import PipelineError, plan

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


BASE = "out: {out}\ndata: {{path: {data}}}\n"


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "arms: [{{name: a, sizes: [L1H16A2]}}]\nseed: [0]\n",
            r"top level: unknown keys \['seed'\]",
        ),
        ("arms: [{{name: a, size: L1H16A2}}]\n", r"arms\[0\]: unknown keys \['size'\]"),
        ("arms: [{{name: a, baselines: [xgb]}}]\n", r"arms\[0\].baselines"),
        ("arms: [{{name: a, strategies: [SF]}}]\n", r"arms\[0\]: strategies \['SF'\]"),
        ("arms: [{{name: a}}, {{name: a}}]\n", r"arms\[1\].name: 'a' is used twice"),
        ("arms: []\n", r"arms: expected a non-empty list"),
        ("arms: [{{name: a, retrieve_k: -1}}]\n", r"arms\[0\].retrieve_k: expected a whole"),
        ("arms: [{{name: a, retrieve_k: true}}]\n", r"arms\[0\].retrieve_k: expected a whole"),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "e", data=tmp_path / "d") + body.format())
    with pytest.raises(PipelineError, match=message) as err:
        experiment.load(path)
    assert str(path) in str(err.value)


def test_an_arm_sets_the_k_of_its_retrieve_stage_or_leaves_it_out(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        BASE.format(out=tmp_path / "e", data=tmp_path / "d")
        + "arms:\n  - {name: k5, sizes: [L1H16A2], retrieve_k: 5}\n"
        + "  - {name: none, sizes: [L1H32A2], retrieve_k: 0}\n  - {name: default}\n",
    )
    k5, none, default = (plan(arm) for arm in experiment.load(path).arms)
    (retrieve,) = [s for s in k5 if s.stage == "retrieve"]
    assert retrieve.options["k"] == 5 and retrieve.arguments[-2:] == ["--k", "5"]
    assert [s for s in none if s.stage == "retrieve"] == []
    assert [s.options["k"] for s in default if s.stage == "retrieve"] == [10]


def test_missing_data_without_a_make_command_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE.format(out=tmp_path / "e", data=tmp_path / "d") + "arms: [{}]\n")
    with pytest.raises(PipelineError, match=r"holds no dataset and no data\.make"):
        experiment.make_data(experiment.load(path))


def test_arms_share_pretraining_and_seeds_get_their_own_chains(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        BASE.format(out=tmp_path / "e", data=tmp_path / "d")
        + "seeds: [0, 1]\narms:\n"
        + "  - {name: main, sizes: [L1H16A2], strategies: [NT, ST&SF]}\n"
        + "  - {name: dense, sizes: [L1H16A2], strategies: [ST&SF], train: ctr_train_dense,"
        + " seeds: [1]}\n",
    )
    spec = experiment.load(path)
    main, dense = (plan(arm) for arm in spec.arms)
    root = tmp_path / "e" / "L1H16A2"
    assert [s.out for s in main if s.stage == "pretrain"] == [
        root / "seed-0" / "pretrain",
        root / "seed-1" / "pretrain",
    ]
    assert dense[0].out == root / "seed-1" / "pretrain"  # the same stage: run once
    finetune = next(s for s in dense if s.stage == "finetune")
    assert finetune.out == root / "seed-1" / "finetune-dense-st_sf"
    assert f"data.train={tmp_path / 'd' / 'ctr_train_dense'}" in finetune.overrides
    assert "run.seed=1" in finetune.overrides


def test_an_arm_gives_its_freeze_stage_overrides_and_its_own_directories(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        BASE.format(out=tmp_path / "e", data=tmp_path / "d")
        + "arms:\n  - {name: fp32, sizes: [L1H16A2], strategies: [ST&SF]}\n"
        + "  - {name: fp16, sizes: [L1H16A2], strategies: [ST&SF], freeze: [freeze.dtype=fp16]}\n",
    )
    fp32, fp16 = (plan(arm) for arm in experiment.load(path).arms)
    assert fp32[0].out == fp16[0].out  # one pretraining
    # ... and one transfer: only the freeze and the finetune of frozen tables differ.
    assert {s.out.name for s in fp16 if s.stage == "transfer"} == {"transfer-st"}
    freeze = {s.out.name: s for s in fp32 + fp16 if s.stage == "freeze"}
    assert sorted(freeze) == ["freeze-fp16-st", "freeze-st"]
    assert "freeze.dtype=fp16" in freeze["freeze-fp16-st"].overrides
    assert not any(o.startswith("freeze.") for o in freeze["freeze-st"].overrides)
    tuned = next(s for s in fp16 if s.stage == "finetune")
    assert tuned.out.name == "finetune-fp16-st_sf" and "freeze.dtype=fp16" not in tuned.overrides
    assert tuned.arguments == ["--init", str(freeze["freeze-fp16-st"].out)]


@pytest.mark.dist
@pytest.mark.slow
def test_a_smoke_study_runs_into_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = tmp_path / "stages.yaml"
    stages.write_text(
        "model: {size: L1H16A2, max_len: 16, negatives: 16}\n"
        "data: {batch_size: 16}\nrun: {epochs: 2}\noptim: {lr: 0.003}\n"
    )
    data, out, docs = tmp_path / "data", tmp_path / "exp", tmp_path / "docs" / "results.md"
    path = _write(
        tmp_path,
        f"out: {out}\nconfig: {stages}\n"
        f"data:\n  path: {data}\n  make: recsys data synth --users 200 --items 60 "
        f"--categories 4 --min-len 6 --max-len 20 --row-group-rows 20 --out {data}\n"
        "seeds: [0, 1]\n"
        "arms: [{name: main, sizes: [L1H16A2], strategies: [NT, ST&SF]}]\n"
        f"report: {{title: Smoke study, out: {docs}}}\n",
    )
    monkeypatch.chdir(REPO)  # components/ and torchx.yaml are found from the root
    spec = experiment.load(path)
    steps = experiment.run(spec, None, "torchx.yaml", console=io.StringIO())
    assert (data / "ctr_test" / "dataset.json").exists()  # made by data.make
    assert len(steps) == 2 * 7 and not any(s.skipped for s in steps)

    from recsys import report

    _, rows = report.write(spec.out, **spec.report)
    assert sorted((r["strategy"], r["seed"]) for r in rows) == [
        ("NT", 0),
        ("NT", 1),
        ("ST&SF", 0),
        ("ST&SF", 1),
    ]
    cells = json.loads((out / "report.json").read_text())["cells"]
    st_sf = next(c for c in cells if c["strategy"] == "ST&SF")
    aucs = [r["auc"] for r in rows if r["strategy"] == "ST&SF"]
    assert st_sf["seeds"] == [0, 1] and st_sf["auc"] == pytest.approx(sum(aucs) / 2)
    text = docs.read_text()
    assert text.startswith("# Smoke study")
    assert f"{st_sf['auc']:.4f} ± {st_sf['auc_std']:.4f}" in text  # mean ± std over seeds
    assert "| – | popularity |" in text and "standard error" in text
    assert "Sparse freezing" not in text  # no FT/ST without SF ran: no claim about it
    # Each seed's pretraining was scored over the whole catalogue on ctr_test's held-out items.
    (pre,) = json.loads((out / "report.json").read_text())["pretraining"]
    assert pre["seeds"] == [0, 1] and pre["eval"] == "ctr_test" and pre["k"] == 10
    assert 0 <= pre["hr"] <= 1 and pre["train_hit_rate"] is not None
    assert "## Pretraining" in text and f"{pre['hr']:.4f} ± {pre['hr_std']:.4f}" in text
    for figure in ("curves.png", "gap.png"):
        assert (docs.parent / "results" / figure).stat().st_size > 0
        assert f"(results/{figure})" in text
    # A rerun of the study skips every stage.
    again = experiment.run(spec, None, "torchx.yaml", console=io.StringIO())
    assert all(s.skipped for s in again)
