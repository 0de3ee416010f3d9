"""The pipeline reads each stage's config once: the check before any job and the
fingerprint that decides whether a stage is done use the same resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.pipelines import gpsd
from recsys.stages.common import fingerprint


def test_each_stage_config_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    for name in ("seq", "ctr_train", "ctr_test"):
        (data / name).mkdir(parents=True)
        (data / name / "dataset.json").write_text(f'{{"name": "{name}"}}\n')
    study = gpsd.Study(str(tmp_path / "exp"), str(data), strategies=("NT", "ST&SF"))
    steps = gpsd.plan(study)
    reads = []
    real = gpsd.load
    monkeypatch.setattr(gpsd, "load", lambda *a: reads.append(a) or real(*a))
    configs = gpsd.check_configs(steps)
    assert len(reads) == len(steps)
    pretrain = steps[0]
    assert pretrain.stage == "pretrain" and pretrain.resolved is configs[0]
    inputs = {"train": str(data / "seq")}
    assert gpsd.expected_fingerprint(pretrain) == fingerprint("pretrain", {}, configs[0], inputs)
    assert len(reads) == len(steps)  # no second read
