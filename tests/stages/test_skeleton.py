"""The skeleton every stage shares: ``start`` fingerprints, claims the directory and seeds;
``finish`` records the fingerprint, inputs and config first, then DONE with the fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recsys.stages.common import StageError, arguments, fingerprint, parser, start


def started(out: Path, *overrides: str):
    args, config = arguments(parser("pretrain", "a stage"), ["--out", str(out), *overrides])
    return args, config, start("pretrain", args, config, {"train": ""}, {"strategy": "ST"})


def test_start_claims_the_directory_and_seeds_torch(tmp_path: Path) -> None:
    _, config, stage = started(tmp_path / "p", "run.seed=3")
    drawn = torch.rand(4)
    torch.manual_seed(3)
    assert stage.path.is_dir() and torch.equal(drawn, torch.rand(4))
    assert stage.about == {
        "fingerprint": fingerprint("pretrain", {"strategy": "ST"}, config, {"train": ""}),
        "inputs": {"train": ""},
        "config": config.to_dict(),
    }


def test_finish_records_what_start_took_before_the_stage_s_own_entries(tmp_path: Path) -> None:
    _, _, stage = started(tmp_path / "p")
    stage.finish({"tables": ["item"], "results": {"auc": 0.5}})
    record = json.loads((stage.path / "stage.json").read_text())
    assert list(record) == [
        "stage",
        "fingerprint",
        "inputs",
        "config",
        "tables",
        "results",
        "world_size",
        "seconds",
        "finished",
    ]
    assert (stage.path / "DONE").read_text() == record["fingerprint"] + "\n"
    with pytest.raises(StageError, match="has finished already \\(DONE\\); pass --force"):
        started(tmp_path / "p")
