"""Jobs survive faults: a rank killed mid-epoch, a death in the middle of a checkpoint save,
SIGTERM (preemption). Each faulty job, restarted by torchrun or run again, ends with the
weights, metrics and log of an uninterrupted job, and every sample of every epoch trained
exactly once across the 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recsys.checkpoint.manager import export
from recsys.train.faults import Fault, parse

pytestmark = pytest.mark.dist

TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=8"]
RUN = ["run.epochs=2", "run.checkpoint_every=2", "run.log_every=3", "run.record_samples=true"]
RUN += ["optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, synth_split) -> Path:
    out = tmp_path_factory.mktemp("faults") / "data"
    config = {"items": 48, "categories": 3, "min_events": 6, "max_events": 16, "seed": 4}
    return synth_split(out, row_group_rows=12, users=100, **config)


def pretrain(
    data: Path, out: Path, faults: str = "", restarts: int = 0, workers: int = 0
) -> subprocess.CompletedProcess:
    """The pretrain stage as a 2-process torchrun job, as a component launches it (in a
    session of its own: a ``preempt`` fault signals the job's whole process group)."""
    env = {
        **os.environ,
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "OMP_NUM_THREADS": "1",
        "RECSYS_FAULTS": faults,
    }
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc_per_node", "2", "--max_restarts", str(restarts)),
        *("-m", "recsys.stages.pretrain", "--out", str(out)),
        *TINY,
        *RUN,
        f"data.train={data / 'seq'}",
        f"data.workers={workers}",
    ]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, start_new_session=True
    )


def weights(stage: Path, tmp: Path) -> dict[str, torch.Tensor]:
    return torch.load(export(stage / "weights", tmp / f"{stage.name}.pt"))


def steps_logged(stage: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if r["split"] == "step"]


def assert_same_run(stage: Path, reference: Path, tmp: Path, rows: int) -> None:
    record, expected = (json.loads((s / "stage.json").read_text()) for s in (stage, reference))
    assert record["steps"] == expected["steps"]
    assert record["results"] == expected["results"]  # final epoch's loss and hit rate
    mine, theirs = weights(stage, tmp), weights(reference, tmp)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert steps_logged(stage) == steps_logged(reference)  # every step once, same losses
    # Exactly once: in every epoch, the two ranks together trained on each row once.
    per_epoch: dict[int, list[int]] = {}
    for path in sorted((stage / "samples").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            step = json.loads(line)
            per_epoch.setdefault(step["epoch"], []).extend(step["rows"])
    assert sorted(per_epoch) == [0, 1]
    for epoch, seen in per_epoch.items():
        assert sorted(seen) == list(range(rows)), f"epoch {epoch}"


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "pretrain"
    run = pretrain(data, out)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def rows(data: Path) -> int:
    return json.loads((data / "seq" / "dataset.json").read_text())["rows"]


def test_faults_parse_and_reject_bad_specs() -> None:
    assert parse("kill:step=5:rank=1; save:step=4;loader:batch=2") == [
        Fault("kill", 5, 1),
        Fault("save", 4, 0),
        Fault("loader", 2, 0),
    ]
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        parse("explode:step=1")
    with pytest.raises(ValueError, match="expected kill:step=N"):
        parse("kill:batch=1")


def test_a_rank_killed_mid_epoch_restarts_and_ends_as_if_nothing_happened(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pretrain"
    # Killed after step 5: its last checkpoint is step 4, so step 5 runs twice in all.
    run = pretrain(data, out, faults="kill:step=5:rank=1", restarts=1)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "faults.fired").read_text().split() == ["kill:step=5:rank=1"]
    assert_same_run(out, reference, tmp_path, rows(data))


def test_a_death_during_a_checkpoint_save_leaves_the_previous_one_in_use(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pretrain"
    run = pretrain(data, out, faults="save:step=4:rank=1", restarts=1)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "faults.fired").read_text().split() == ["save:step=4:rank=1"]
    # The restarted job resumed from step 2, the last complete checkpoint, and saved step 4
    # anew (the half-written one never became a checkpoint).
    log = run.stdout + run.stderr
    assert "checkpoint saved: " + str(out / "checkpoint" / "step-00000002") in log
    saves = {
        step: log.count(f"checkpoint saved: {out / 'checkpoint' / f'step-{step:08d}'}")
        for step in (2, 4, 6)
    }
    assert saves[4] == saves[6] == saves[2] > 0  # step 4 completed once (each rank logs it)
    assert not list((out / "checkpoint").glob(".step-*.tmp"))
    assert_same_run(out, reference, tmp_path, rows(data))


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_from_it(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pretrain"
    run = pretrain(data, out, faults="sigterm:step=3:rank=0")
    assert run.returncode != 0  # stopped, not finished
    assert "preempted (SIGTERM) after step 3" in run.stderr
    assert not (out / "DONE").exists()
    # The checkpoint of step 3 (not a checkpoint_every step) was written right away.
    saved = out / "checkpoint" / "step-00000003"
    assert saved.is_dir()
    fired = (out / "faults.fired").stat().st_mtime
    assert saved.stat().st_mtime - fired < 30
    start = time.monotonic()
    again = pretrain(data, out, faults="sigterm:step=3:rank=0")  # fired already: runs clean
    assert again.returncode == 0, again.stderr[-3000:]
    assert time.monotonic() - start < 300
    assert_same_run(out, reference, tmp_path, rows(data))


def test_a_data_loader_error_restarts_the_job_which_resumes(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pretrain"
    run = pretrain(data, out, faults="loader:batch=4:rank=0", restarts=1)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "injected data-loader fault at batch 4 (rank 0)" in run.stderr
    assert_same_run(out, reference, tmp_path, rows(data))


def test_preemption_of_the_whole_job_with_loader_workers_saves_and_resumes(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    # SIGTERM reaches torchrun, both ranks and their loader workers at once, as when a
    # scheduler preempts the job: the ranks still save step 3 together and stop.
    out = tmp_path / "pretrain"
    run = pretrain(data, out, faults="preempt:step=3:rank=0", workers=1)
    assert run.returncode != 0
    assert run.stderr.count("preempted (SIGTERM) after step 3") == 2, run.stderr[-3000:]
    assert (out / "checkpoint" / "step-00000003").is_dir() and not (out / "DONE").exists()
    again = pretrain(data, out, faults="preempt:step=3:rank=0", workers=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(out, reference, tmp_path, rows(data))
