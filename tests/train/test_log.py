"""The run log: a resumed run drops what the interrupted run logged after its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from recsys.train.log import RunLog


def steps(path: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["split"]) for r in map(json.loads, path.read_text().splitlines())]


def test_a_resumed_log_forgets_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    first = RunLog(tmp_path, main=True)
    for step in (1, 2):
        first.record(step, "step", {"loss": 1.0})
    saved = first.size()  # a checkpoint at step 2 records this
    first.record(2, "epoch", {"auc": 0.5})
    first.record(3, "step", {"loss": 1.0})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "spl')  # killed mid-write
    # Resumed from step 2 with the size the checkpoint saw: exactly what it had seen stays.
    resumed = RunLog(tmp_path, main=True, resumed_at=2, keep_bytes=saved)
    resumed.record(3, "step", {"loss": 0.5})
    resumed.close()
    assert steps(tmp_path / "metrics.jsonl") == [(1, "step"), (2, "step"), (3, "step")]


def test_without_the_size_records_up_to_the_step_stay(tmp_path: Path) -> None:
    log = RunLog(tmp_path, main=True)
    for step in (1, 2, 3):
        log.record(step, "step", {"loss": 1.0})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "spl')
    RunLog(tmp_path, main=True, resumed_at=2).close()
    assert steps(tmp_path / "metrics.jsonl") == [(1, "step"), (2, "step")]
    # Off rank 0 nothing is written or cut.
    RunLog(tmp_path, main=False, resumed_at=0).close()
    assert len(steps(tmp_path / "metrics.jsonl")) == 2
