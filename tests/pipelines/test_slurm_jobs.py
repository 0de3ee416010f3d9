"""recsys.pipelines.slurm without a cluster: states, bounded waits, the venv's environment, logs.

Slurm's commands are replaced by a fake that answers as Slurm 22.05 does (the cluster tests
in tests/cluster run the real ones).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest
from torchx.specs import AppState

from recsys.pipelines import slurm
from recsys.pipelines.gpsd import Study, run
from recsys.pipelines.profiles import ProfileError, load_profile

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("sacct", "state"),
    [
        ("CANCELLED by 0", AppState.CANCELLED),  # what TorchX 0.7.0 fails to translate
        ("COMPLETED", AppState.SUCCEEDED),
        ("PENDING", AppState.PENDING),
        ("OUT_OF_MEMORY", AppState.FAILED),
        ("TIMEOUT", AppState.FAILED),
        ("REQUEUED", AppState.PENDING),
    ],
)
def test_states_translate_by_their_first_word(sacct: str, state: AppState) -> None:
    assert slurm.translate(sacct) == state


def test_an_unknown_state_is_named() -> None:
    with pytest.raises(slurm.SlurmError, match="unknown Slurm job state 'EXPLODED'"):
        slurm.translate("EXPLODED")


def test_heterogeneous_components_combine() -> None:
    s = AppState
    assert slurm.combine([s.SUCCEEDED, s.SUCCEEDED]) == s.SUCCEEDED
    assert slurm.combine([s.SUCCEEDED, s.FAILED]) == s.FAILED
    assert slurm.combine([s.RUNNING, s.CANCELLED]) == s.CANCELLED
    assert slurm.combine([s.SUCCEEDED, s.RUNNING]) == s.RUNNING
    assert slurm.combine([s.PENDING, s.SUCCEEDED]) == s.PENDING
    assert slurm.combine([]) == s.UNKNOWN  # sacct lags the submit


class FakeSlurm:
    """Answers sacct/squeue/scontrol/sinfo/scancel for job 7 of a two-node partition."""

    def __init__(self, states: list[str], reason: str = "Resources") -> None:
        self.states = states  # one per sacct call; the last one repeats
        self.reason = reason
        self.cancelled = False
        self.calls: list[str] = []

    def __call__(self, *cmd: str) -> str:
        self.calls.append(cmd[0])
        if cmd[0] == "sacct":
            state = "CANCELLED by 0" if self.cancelled else self.states.pop(0)
            if not self.states:
                self.states.append(state)
            if state == "":
                return ""
            return f"7+0|{state}\n7+1|{state}\n"
        if cmd[0] == "squeue":
            return "" if self.cancelled else f"PENDING|{self.reason}\nPENDING|{self.reason}\n"
        if cmd[0] == "scancel":
            self.cancelled = True
            return ""
        if cmd[0] == "scontrol":
            return "JobId=7 HetJobId=7 MinCPUsNode=4 MinMemoryNode=2048M TRES=cpu=4,mem=2G\n"
        if cmd[0] == "sinfo":
            return "node1|1|10868|(null)\nnode2|1|10868|gpu:2\n"
        raise AssertionError(cmd)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def install(states: list[str], reason: str = "Resources") -> FakeSlurm:
        answers = FakeSlurm(states, reason)
        monkeypatch.setattr(slurm, "_run", answers)
        monkeypatch.setattr(slurm.time, "sleep", lambda s: None)
        return answers

    return install


def test_wait_goes_past_unknown_and_pending_to_the_end(fake) -> None:
    answers = fake(["", "", "PENDING", "RUNNING", "RUNNING", "COMPLETED"])
    assert slurm.wait("slurm://torchx/7", clock=Clock()) == AppState.SUCCEEDED
    assert not answers.cancelled


def test_a_job_that_can_never_start_is_cancelled_at_once(fake) -> None:
    answers = fake(["PENDING"], reason="PartitionConfig")
    with pytest.raises(slurm.SlurmError) as err:
        slurm.wait("slurm://torchx/7", clock=Clock())
    assert answers.cancelled and answers.calls.count("sacct") == 1
    message = str(err.value)
    assert "slurm://torchx/7 cancelled: Slurm says it can never start (PartitionConfig)" in message
    assert "asks for 4 CPUs, 2048M memory" in message
    assert "the largest node (node2) has 1 CPUs, 10868 MB, 2 GPUs" in message


def test_pending_beyond_the_bound_is_cancelled_with_the_reason(fake) -> None:
    answers = fake(["PENDING"], reason="Resources")
    with pytest.raises(slurm.SlurmError, match=r"pended 6 s \(> 5 s; Slurm's reason: Resources\)"):
        slurm.wait("slurm://torchx/7", max_pending_s=5, clock=Clock())
    assert answers.cancelled


def test_a_job_sacct_never_lists_and_one_past_its_timeout_are_named(fake) -> None:
    fake([""])
    with pytest.raises(slurm.SlurmError, match="sacct has not listed the job after 3 s"):
        slurm.wait("slurm://torchx/7", max_unknown_s=3, clock=Clock())
    answers = fake(["RUNNING"])
    with pytest.raises(slurm.SlurmError, match="cancelled: still RUNNING after 4 s"):
        slurm.wait("slurm://torchx/7", timeout_s=4, clock=Clock())
    assert answers.cancelled


def test_check_fits_names_the_request_and_the_largest_node(fake) -> None:
    fake(["PENDING"])
    slurm.check_fits(1, 4096, 0, "debug")
    slurm.check_fits(1, 4096, 2, "debug")
    with pytest.raises(slurm.SlurmError, match=r"asks for 2 CPUs, 4096 MB, 0 GPUs and the largest"):
        slurm.check_fits(2, 4096, 0, "debug")
    with pytest.raises(slurm.SlurmError, match=r"partition 'debug' can hold one replica"):
        slurm.check_fits(1, 20000, 0, "debug")


def test_not_a_slurm_handle() -> None:
    with pytest.raises(slurm.SlurmError, match="not a Slurm job handle"):
        slurm.job_id("local_cwd://torchx/recsys-pretrain-x")


def test_follow_writes_every_line_written_before_the_end(tmp_path: Path) -> None:
    path = tmp_path / "slurm-7-pretrain-0.err"
    done = threading.Event()
    lines: list[str] = []
    follower = threading.Thread(target=slurm.follow, args=(path, done, lines.append, 0.01))
    follower.start()
    path.write_text("one\ntw")
    with path.open("a") as f:
        f.write("o\nthree")  # no newline at the end: still written
    done.set()
    follower.join(timeout=10)
    assert lines == ["one\n", "two\n", "three\n"]


def test_follow_ends_when_the_job_never_wrote(tmp_path: Path) -> None:
    done = threading.Event()
    done.set()
    lines: list[str] = []
    slurm.follow(tmp_path / "absent.err", done, lines.append, 0.01)
    assert lines == []


def test_the_slurm_profile_activates_the_venv_on_the_nodes() -> None:
    profile = load_profile("slurm", REPO / "torchx.yaml")
    env = profile.venv_env(path="/usr/bin:/bin")
    assert env == {
        "PATH": f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin",
        "VIRTUAL_ENV": str(REPO / ".venv"),
        "PYTHONPATH": str(REPO),
    }
    assert profile.job_env(path="/bin")["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert (profile.j, profile.cpu, profile.scheduler_args["time"]) == ("2x1", 1, "00:20:00")


def test_submit_environment_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/bin")
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    with slurm.submit_environment({"PATH": "/v/bin:/bin", "VIRTUAL_ENV": "/v"}):
        assert os.environ["PATH"] == "/v/bin:/bin" and os.environ["VIRTUAL_ENV"] == "/v"
    assert os.environ["PATH"] == "/bin" and "VIRTUAL_ENV" not in os.environ


def test_an_unknown_profile_names_the_known_ones(tmp_path: Path) -> None:
    study = Study(experiment=str(tmp_path / "e"), data=str(tmp_path / "d"))
    with pytest.raises(ProfileError, match=r"no profile 'slurn'; profiles: \[.*'slurm'"):
        run(study, "slurn", profiles_path=REPO / "torchx.yaml", console=io.StringIO())
