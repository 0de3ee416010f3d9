"""`recsys pipeline run` checks what it was given before it submits any job: one line naming the
stage, option or key and what is wrong, exit code 2, no traceback, nothing submitted.

No stage runs here: submitting one fails the test (`run_step` is replaced); the one study
that passes every check is stopped at its first submission.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import recsys.pipelines.gpsd
from recsys.cli import main as cli

REPO = Path(__file__).resolve().parents[2]
PROFILES = str(REPO / "torchx.yaml")
TINY = "model: {size: L1H16A2, max_len: 16, negatives: 16}\ndata: {batch_size: 16}\n"


class Submitted(Exception):
    """A stage would have been submitted."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, synth_split) -> Path:
    root = tmp_path_factory.mktemp("checks") / "data"
    return synth_split(root, 20, users=60, items=30, categories=3, min_events=6, max_events=12)


@pytest.fixture(autouse=True)
def no_jobs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every stage the pipeline would submit, by name (the first one stops it)."""
    submitted: list[str] = []

    def submit(step, *args, **kwargs):
        submitted.append(step.name)
        raise Submitted(step.name)

    monkeypatch.setattr(recsys.pipelines.gpsd, "run_step", submit)
    return submitted


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def refused(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The one line `recsys pipeline run ARGS` stops with."""
    assert cli(["pipeline", "run", "--profiles", PROFILES, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("recsys pipeline: ")
    return lines[0]


def nothing_ran(experiment: Path) -> None:
    """No stage directory (nor log) under the experiment directory."""
    assert not experiment.exists() or not any(experiment.iterdir())


def study(tmp_path: Path, data: Path, config: Path) -> list[str]:
    return ["--experiment", str(tmp_path / "exp"), "--data", str(data), "--config", str(config)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sizes", "L4H64"], "sizes: 'L4H64' is not of the form L<layers>H<width>A<heads>"),
        (["--sizes", "L1H16A2,L4H64A5"], "sizes: 'L4H64A5': hidden 64 must split into 5 heads"),
        (["--sizes", "L4H12A4"], "sizes: 'L4H12A4': hidden 12 must split into 4 heads"),
        (["--sizes", "L0H64A4"], "sizes: 'L0H64A4': layers, hidden and heads must be >= 1"),
        (["--strategies", "NT,SF"], "strategies ['SF']: choose among NT, FT, ST, FT&SF, ST&SF"),
        (["--strategies", ","], "strategies []: choose among"),
        (["--baselines", "xgb"], "baselines ['xgb']: choose among deepfm, din"),
        (["optim.lr=fast"], "optim.lr"),
        (["model.arch=transformer"], "arch"),
        (["data.valid=/nowhere/valid"], "data.valid: /nowhere/valid: no such file or directory"),
        (["--profile", "nope"], "no profile 'nope'"),
    ],
)
def test_a_bad_option_is_named_before_any_job(
    tmp_path: Path,
    data: Path,
    config: Path,
    capsys: pytest.CaptureFixture,
    args: list[str],
    message: str,
) -> None:
    assert message in refused(capsys, *study(tmp_path, data, config), *args)
    nothing_ran(tmp_path / "exp")


def test_data_without_its_datasets_is_named(
    tmp_path: Path, data: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    run = ["--experiment", str(tmp_path / "exp"), "--config", str(config), "--data"]
    line = refused(capsys, *run, str(tmp_path / "missing"))
    assert f"--data {tmp_path / 'missing'}: no such directory" in line
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"--data {afile}: is not a directory" in refused(capsys, *run, str(afile))
    empty = tmp_path / "empty"
    empty.mkdir()
    line = refused(capsys, *run, str(empty))
    assert f"stage pretrain (L1H16A2-pretrain): data.train: {empty / 'seq'}: no such" in line
    assert line.endswith("no job was submitted")
    # The finetune stage reads ctr_test: only that one is missing.
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("seq", "ctr_train", "vocab"):
        (partial / name).symlink_to(data / name)
    line = refused(capsys, *run, str(partial), "--strategies", "NT")
    assert f"stage finetune (L1H16A2-finetune-nt): data.valid: {partial / 'ctr_test'}" in line
    nothing_ran(tmp_path / "exp")


def test_a_dataset_of_the_wrong_kind_or_without_metadata_is_named(
    tmp_path: Path, data: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "seq").symlink_to(data / "ctr_train")
    line = refused(capsys, *study(tmp_path, swapped, config))
    assert "is a 'ctr' dataset; this stage needs 'seq'" in line
    bare = tmp_path / "bare"
    (bare / "seq").mkdir(parents=True)
    for part in (data / "seq").glob("*.parquet"):
        (bare / "seq" / part.name).symlink_to(part)
    line = refused(capsys, *study(tmp_path, bare, config))
    assert f"{bare / 'seq' / 'dataset.json'}: missing" in line
    nothing_ran(tmp_path / "exp")


def test_a_mistake_in_one_stage_section_stops_before_the_first_stage(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture, no_jobs: list[str]
) -> None:
    # Only finetune's merged config is wrong: pretraining must not run first.
    config = tmp_path / "staged.yaml"
    config.write_text(TINY + "stages:\n  finetune: {optim: {lr: fast}}\n")
    line = refused(capsys, *study(tmp_path, data, config))
    assert "optim.lr" in line
    nothing_ran(tmp_path / "exp")
    # Put right, the same study passes every check and reaches its first submission.
    config.write_text(TINY + "stages:\n  finetune: {optim: {lr: 0.01}}\n")
    with pytest.raises(Submitted):
        cli(["pipeline", "run", "--profiles", PROFILES, *study(tmp_path, data, config)])
    assert no_jobs == ["L1H16A2-pretrain"]


def test_a_plan_file_the_stages_cannot_use_is_named(
    tmp_path: Path, data: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    plan = tmp_path / "plan4.json"
    tables = ["--table", "item=30", "--table", "category=3", "--host", "cpu"]
    assert cli(["plan", *tables, "-j", "1x4", "--out", str(plan), "model.size=L1H16A2"]) == 0
    capsys.readouterr()
    line = refused(capsys, *study(tmp_path, data, config), f"plan={plan}")
    assert f"plan.file {plan} was made for 4 ranks; profile 'local_cwd' runs 2 (-j 1x2)" in line
    missing = tmp_path / "missing.json"
    line = refused(capsys, *study(tmp_path, data, config), f"plan.file={missing}")
    assert f"plan.file: {missing}: cannot be read: no such file or directory" in line
    nothing_ran(tmp_path / "exp")


def test_an_experiment_directory_that_cannot_be_one_is_named(
    tmp_path: Path,
    data: Path,
    config: Path,
    capsys: pytest.CaptureFixture,
    read_only_dir: Path,
) -> None:
    run = ["--data", str(data), "--config", str(config), "--experiment"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = refused(capsys, *run, str(afile))
    assert f"experiment directory {afile} is a file; give a directory" in line
    line = refused(capsys, *run, str(afile / "exp"))
    assert f"experiment directory {afile / 'exp'} lies under {afile}, a file" in line
    locked = read_only_dir
    line = refused(capsys, *run, str(locked / "exp"))
    assert f"experiment directory {locked / 'exp'} cannot be written: " in line


def experiment_file(tmp_path: Path, data: Path, config: Path, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"out: {tmp_path / 'exp'}\ndata: {data}\nconfig: {config}\n{body}")
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("arms: [{name: a}]\nseeds: [0]\nseeds: [1]\n", "key 'seeds' given twice"),
        ("arms: [{name: a, sizes: [L1H16A2], sizes: [L2H16A2]}]\n", "key 'sizes' given twice"),
        ("seeds: [a]\narms: [{name: a}]\n", "seeds: expected a list of integers >= 0"),
        ("seeds: 3\narms: [{name: a}]\n", "seeds: expected a list of integers >= 0, got 3"),
        ("arms: [{name: a, gpsd: 'no', baselines: [din]}]\n", "arms[0].gpsd: expected true"),
        ("arms: [{name: a, seeds: [x]}]\n", "arms[0].seeds: expected a list of integers"),
        ("arms: [{name: [1]}]\n", "arms[0].name: expected a non-empty string"),
        ("arms: [{name: a, train: 5}]\n", "arms[0].train: expected a non-empty string"),
        ("arms: [{name: a}]\nreport: {titel: x}\n", "report: unknown keys ['titel']"),
        ("arms: [{name: a}]\nreport: {title: [x]}\n", "report.title: expected a non-empty"),
        ("arms: [{name: a}]\nreport: [x]\n", "report: expected a mapping"),
        ("arms: [{name: a}]\nprofile: [x]\n", "profile: expected a non-empty string"),
        ("arms: [{name: a}]\nreport: {out: /}\n", "report file /: is a directory"),
        (
            "arms: [{name: a}]\nreport: {notes: /nowhere/notes.md}\n",
            "report notes: /nowhere/notes.md: no such file or directory",
        ),
        ("arms: [{name: a, sizes: [L4H64A5]}]\n", "arms[0]: sizes: 'L4H64A5'"),
        (
            "arms: [{name: a, sizes: [L1H16A2]}, {name: b, overrides: [optim.lr=fast]}]\n",
            "optim.lr",
        ),
        (
            "arms: [{name: a, sizes: [L1H16A2]}, {name: b, train: ctr_train_dense}]\n",
            "data.train: ",
        ),
    ],
)
def test_an_experiment_file_mistake_is_named_before_any_arm_runs(
    tmp_path: Path,
    data: Path,
    config: Path,
    capsys: pytest.CaptureFixture,
    body: str,
    message: str,
) -> None:
    path = experiment_file(tmp_path, data, config, body)
    line = refused(capsys, "--experiment", str(path))
    assert message in line
    assert str(path) in line or line.endswith("no job was submitted")  # the file or a stage
    nothing_ran(tmp_path / "exp")


@pytest.mark.parametrize(
    "content, message",
    [
        ("- a\n- b\n", "expected a mapping of"),
        ("hello\n", "expected a mapping of"),
        ("", "expected a mapping of"),
        ("out: x\n\tdata: y\n", "not valid YAML at line 2"),
        ("out: \udc80\n", "not a UTF-8 text file"),
    ],
)
def test_an_experiment_file_that_is_no_mapping_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: str, message: str
) -> None:
    path = tmp_path / "study.yaml"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    assert message in refused(capsys, "--experiment", str(path))
    assert message in refused_report(capsys, str(path))


def refused_report(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert cli(["report", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_a_broken_profiles_file_is_named(
    tmp_path: Path, data: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    profiles = tmp_path / "torchx.yaml"
    profiles.write_text("profiles:\n  local_cwd: {scheduler: local_cwd}\n  local_cwd: {}\n")
    args = [*study(tmp_path, data, config), "--profiles", str(profiles)]
    assert cli(["pipeline", "run", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{profiles}: not valid YAML at line 3, column 3: key 'local_cwd' given twice" in err
    nothing_ran(tmp_path / "exp")


def test_a_failed_stage_is_told_by_its_error_line_not_by_source_in_a_traceback() -> None:
    from recsys.pipelines.gpsd import STAGE_ERROR

    assert STAGE_ERROR.search("[0]:error (rank 1): data.train: /d/seq: no such file")
    assert not STAGE_ERROR.search('[0]:[rank0]:   return guarded(run, prefix=f"error (rank {r})")')


def test_a_pipeline_stopped_by_ctrl_c_is_one_line(
    tmp_path: Path,
    data: Path,
    config: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TorchX's local scheduler turns SIGINT into its SignalException while a job runs."""
    import signal

    from torchx.schedulers.local_scheduler import SignalException

    def interrupted(step, *args, **kwargs):
        raise SignalException("Process 1 got signal: SIGINT", sigval=signal.SIGINT)

    monkeypatch.setattr(recsys.pipelines.gpsd, "run_step", interrupted)
    assert cli(["pipeline", "run", "--profiles", PROFILES, *study(tmp_path, data, config)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "recsys pipeline: stopped by SIGINT (its jobs end with it); the same command resumes "
        "the study"
    ]


def test_retrieve_k_is_checked_and_goes_with_a_directory(
    tmp_path: Path, data: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    run = ["--experiment", str(tmp_path / "exp"), "--config", str(config), "--data", str(data)]
    line = refused(capsys, *run, "--retrieve-k", "-1")
    assert "retrieve_k must be >= 0 (0: no retrieve stage), got -1" in line
    experiment_file = tmp_path / "study.yaml"
    experiment_file.write_text("arms: [{name: a}]\n")
    line = refused(capsys, "--experiment", str(experiment_file), "--retrieve-k", "5")
    assert "--retrieve-k and overrides go with a directory" in line
    nothing_ran(tmp_path / "exp")
