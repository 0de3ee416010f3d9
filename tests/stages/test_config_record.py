"""A config's record (``StageConfig.to_dict``, in stage.json and every fingerprint) is pinned:
a pipeline skips a finished stage only when its fingerprint is the one it would produce, so a
record that changed would make every finished stage run again."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.stages import STAGES
from recsys.stages.common import fingerprint
from recsys.stages.config import load

CONFIGS = Path(__file__).parents[2] / "configs" / "ml100k"
DEMO = CONFIGS / "2026-11-23-demo.yaml"
STUDY = CONFIGS / "2026-12-01-stages.yaml"

DEFAULT_RECORD = {
    "model": {
        "size": "L4H64A4",
        "max_len": 50,
        "negatives": 4096,
        "causal": True,
        "dropout": 0.0,
        "arch": "gpsd",
    },
    "data": {
        "train": "",
        "valid": None,
        "batch_size": 256,
        "workers": 0,
        "shuffle": True,
        "skip_bad_row_groups": False,
    },
    "optim": {
        "lr": 0.001,
        "betas": (0.9, 0.98),
        "weight_decay": 0.1,
        # Derived from the data when unset; the record holds these numbers for "unset".
        "warmup_steps": 100,
        "total_steps": 1000,
        "min_lr_ratio": 0.1,
        "clip_norm": 1.0,
        "sparse": "rowwise_adagrad",
        "sparse_lr": 0.01,
    },
    "run": {
        "epochs": 1,
        "max_steps": None,
        "checkpoint_every": 0,
        "keep": 2,
        "resume": True,
        "seed": 0,
        "record_samples": False,
    },
    "plan": {"sharding_types": {"item": ["row_wise"]}, "file": None},
}

LUM_RECORD = {
    "temperature": 0.05,
    "negatives": 0,
    "pack": 200,
    "queries": {},
    "features": None,
    "direct": True,
    "matching": True,
}


def test_the_default_record() -> None:
    record = load(None).to_dict()
    assert record == DEFAULT_RECORD
    assert list(record) == ["model", "data", "optim", "run", "plan"]
    assert [list(v) for v in record.values()] == [list(v) for v in DEFAULT_RECORD.values()]


def test_the_demo_and_lum_records() -> None:
    demo = load(DEMO, (), "pretrain").to_dict()
    changed = {"data": {"batch_size": 16}, "optim": {"warmup_steps": 60}, "run": {"epochs": 20}}
    assert demo == {k: {**v, **changed.get(k, {})} for k, v in DEFAULT_RECORD.items()}
    assert load(DEMO, (), "finetune").to_dict()["run"]["epochs"] == 4
    lum = load(STUDY, ["run.epochs=20", "lum.pack=200"], "lum_pretrain").to_dict()
    assert lum["lum"] == LUM_RECORD and list(lum)[-1] == "lum"


PRINTS = {
    "default": (None, [], "finetune", "b91aea34a265dbee"),
    **{
        f"demo-{stage}": (DEMO, [], stage, value)
        for stage, value in zip(
            STAGES,
            [
                "cfe4bfa17cf31bb8",
                "b919cb266efadf32",
                "827c30c1b718c6f8",
                "feb1d3342718b030",
                "c15408d02c1c36d1",
                "1bde856784ea7861",
                "5ca257cc7b4de158",
                "c69d4da58ff0b478",
                "f17cce636a4ff2cb",
                "0af7c1271bbfd2d5",
            ],
            strict=True,
        )
    },
    "lum_pretrain": (STUDY, ["run.epochs=20", "lum.pack=200"], "lum_pretrain", "67f9278daa275120"),
    "lum_query": (STUDY, ["lum.queries={liked: [0, 1]}"], "lum_query", "bfab169b0c6b3a07"),
    "lum_finetune": (
        STUDY,
        ["lum.features=runs/study/lum_query", "lum.matching=false"],
        "lum_finetune",
        "44c576b8674327d6",
    ),
    # The schedule's lengths set to the numbers an unset one records: the same record.
    "schedule_given": (
        None,
        ["optim.warmup_steps=100", "optim.total_steps=1000"],
        "finetune",
        "b91aea34a265dbee",
    ),
    "schedule_other": (
        None,
        ["optim.warmup_steps=7", "optim.total_steps=70", "run.max_steps=null"],
        "finetune",
        "96435cbd21b01a99",
    ),
    "run_options": (
        None,
        [
            "run.cpu_bf16=true",
            "run.nonfinite=skip",
            "run.keep=3",
            "plan.sharding_types={item: [table_wise]}",
            "optim.clip_norm=null",
        ],
        "pretrain",
        "2fa8a2d8d1a65532",
    ),
}


@pytest.mark.parametrize("case", sorted(PRINTS))
def test_fingerprints_of_configs_stay_the_same(case: str) -> None:
    path, overrides, stage, pinned = PRINTS[case]
    assert fingerprint(stage, {}, load(path, overrides, stage), {}) == pinned
