"""A user's mistake is one line and exit code 2 in every entry point; a bug keeps its traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.errors import EXIT_USER_ERROR, UserError, guarded
from recsys.stages import pretrain
from recsys.stages.common import run_stage


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_user_error_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture) -> None:
    def fails() -> int:
        raise UserError("data.train: no such dataset")

    assert guarded(fails, prefix="recsys x") == EXIT_USER_ERROR
    assert lines(capsys.readouterr().err) == ["recsys x: data.train: no such dataset"]


def test_an_os_error_names_the_path_and_the_reason(capsys: pytest.CaptureFixture) -> None:
    def full() -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/weights")

    assert guarded(full) == EXIT_USER_ERROR
    assert lines(capsys.readouterr().err) == ["error: /runs/a/weights: no space left on device"]


def test_a_bug_keeps_its_traceback() -> None:
    def bug() -> int:
        raise KeyError("not the user's fault")

    with pytest.raises(KeyError):
        guarded(bug)


def test_recsys_debug_shows_the_traceback_of_a_user_error(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_DEBUG", "1")
    assert guarded(lambda: (_ for _ in ()).throw(UserError("bad"))) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: bad")


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_stage_whose_out_cannot_be_a_directory_says_so_in_one_line(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture, synth_split
) -> None:
    data = synth_split(tmp_path / "data", 16, users=40, items=20, min_events=4, max_events=8)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")
    out = blocker if where == "a file" else blocker / "stage"
    argv = ["--out", str(out), f"data.train={data / 'seq'}", "model.size=L1H16A2"]
    assert run_stage(pretrain.main, argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err  # INFO logs, then the error
    assert "Traceback" not in err
    (line,) = [line for line in lines(err) if line.startswith("error")]
    reason = "file exists" if where == "a file" else "not a directory"
    assert line == f"error (rank 0): {out}: {reason}"
    assert blocker.read_text() == "a file, not a directory\n"


def test_a_failed_job_under_the_launcher_is_its_ranks_lines_and_one_summary(
    tmp_path: Path,
) -> None:
    """What a component runs: torchrun through recsys.distributed.torchrun, no traceback."""
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        *(sys.executable, "-m", "recsys.distributed.torchrun", "--standalone"),
        *("--nproc_per_node", "1", "-m", "recsys.stages.pretrain"),
        *("--out", str(tmp_path / "p"), f"data.train={tmp_path / 'nowhere'}"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    assert "Traceback" not in done.stderr
    ours = [line for line in lines(done.stderr) if line.startswith("error")]
    assert len(ours) == 2 and str(tmp_path / "nowhere") in ours[0]
    assert ours[1].startswith("error: recsys.stages.pretrain failed (rank 0 first, exit code 2")


def _refuse(_: int) -> int:
    raise UserError("cursor saved with batch_size 8, this run has 4")


def test_an_error_of_a_loader_worker_is_its_own_line(capsys: pytest.CaptureFixture) -> None:
    from torch.utils.data import DataLoader

    def load() -> int:
        next(iter(DataLoader(range(2), batch_size=None, num_workers=1, collate_fn=_refuse)))
        return 0

    assert guarded(load) == EXIT_USER_ERROR
    assert lines(capsys.readouterr().err) == [
        "error: cursor saved with batch_size 8, this run has 4"
    ]


def test_ctrl_c_is_one_line_and_exit_130(capsys: pytest.CaptureFixture) -> None:
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert guarded(interrupted, prefix="recsys x") == 130
    assert lines(capsys.readouterr().err) == ["recsys x: interrupted"]


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """``recsys plan ... | head``: stdout closed early is no error to print."""
    code = (
        "import sys\nfrom recsys.errors import guarded\n"
        "def talk():\n    for _ in range(100_000):\n        print('x' * 100)\n"
        "sys.exit(guarded(talk))\n"
    )
    job = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    job.stdout.read(10)
    job.stdout.close()
    assert job.wait(timeout=60) == 141
    assert job.stderr.read() == b""


def test_asking_for_more_memory_than_the_host_has_is_one_line(
    capsys: pytest.CaptureFixture,
) -> None:
    import torch

    def huge() -> int:
        torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB
        return 0

    assert guarded(huge, prefix="recsys x") == EXIT_USER_ERROR
    (line,) = lines(capsys.readouterr().err)
    assert line.startswith("recsys x: out of memory (RuntimeError: ")
    assert line.endswith("is more than this host holds")


def test_a_stage_whose_loader_worker_fails_exits(tmp_path: Path, synth_split) -> None:
    """Loader workers ignore SIGTERM: a stage stopped by their error must stop them itself,
    or the interpreter's exit waits on them forever."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = synth_split(tmp_path / "data", 64, users=60, items=30, min_events=4, max_events=20)
    (part,) = sorted((data / "seq").glob("*.parquet"))[:1]
    table = pq.read_table(part)
    users = table.column("user_id").to_pylist()
    column = pa.array([None, *users[1:]], type=table.schema.field("user_id").type)
    pq.write_table(table.set_column(0, "user_id", column), part, row_group_size=64)
    command = [
        *(sys.executable, "-m", "recsys.stages.pretrain", "--out", str(tmp_path / "p")),
        *("model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=16"),
        *(f"data.train={data / 'seq'}", "data.workers=1", "run.max_steps=2"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    assert f"error (rank 0): {part}, row group 0, row 0, column 'user_id': null" in done.stderr
