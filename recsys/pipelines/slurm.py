"""Slurm jobs as the pipeline sees them: their state from ``sacct``, and waits that end.

    python -m recsys.pipelines.slurm status slurm://torchx/42     # CANCELLED, SUCCEEDED, ...

This module owns reading a Slurm job's state and waiting for it, because TorchX 0.7.0's own
``describe`` cannot be trusted for that: ``sacct`` reports a cancelled job as ``CANCELLED by
<uid>``, which 0.7.0 looks up by exact name and fails on (``torchx status`` then crashes), and a
job it cannot find yet (``sacct`` lags the submit by a few seconds) is UNKNOWN. Here a state is
translated by its first word, and the components of a heterogeneous job (TorchX submits one per
replica) are combined. A wait is bounded: a job Slurm says can never start in its partition
(reason ``PartitionConfig`` and the like) is cancelled at once, and one pending for longer than
``max_pending_s`` is cancelled too, with a message naming what it asked for and what the
largest node has. :func:`check_fits` says the same before anything is submitted. It does not
submit jobs (the TorchX runner does) or pick resources (profiles do).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torchx.specs import AppState, parse_app_handle

from recsys.errors import UserError

STATES = {
    "BOOT_FAIL": AppState.FAILED,
    "CANCELLED": AppState.CANCELLED,
    "COMPLETED": AppState.SUCCEEDED,
    "DEADLINE": AppState.FAILED,
    "FAILED": AppState.FAILED,
    "NODE_FAIL": AppState.FAILED,
    "OUT_OF_MEMORY": AppState.FAILED,
    "PENDING": AppState.PENDING,
    "PREEMPTED": AppState.FAILED,
    "REQUEUED": AppState.PENDING,
    "REQUEUE_FED": AppState.PENDING,
    "REQUEUE_HOLD": AppState.PENDING,
    "RESIZING": AppState.PENDING,
    "REVOKED": AppState.FAILED,
    "RUNNING": AppState.RUNNING,
    "SUSPENDED": AppState.PENDING,
    "TIMEOUT": AppState.FAILED,
}
"""Slurm job states (https://slurm.schedmd.com/sacct.html#SECTION_JOB-STATE-CODES)."""

NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints")
"""Pending reasons that no amount of waiting clears: the job asks for more than the partition
has (https://slurm.schedmd.com/job_reason_codes.html)."""


class SlurmError(UserError, RuntimeError):
    """A Slurm job cannot run or cannot be followed; the message names the job and why."""


def translate(state: str) -> AppState:
    """``CANCELLED by 0`` → CANCELLED: a Slurm state by its first word."""
    word = state.split()[0] if state.strip() else ""
    if word not in STATES:
        raise SlurmError(f"unknown Slurm job state {state!r}; known: {', '.join(STATES)}")
    return STATES[word]


def combine(states: list[AppState]) -> AppState:
    """One state for the components of a heterogeneous job: a failure or a cancel wins, then
    running, then pending; SUCCEEDED only when every component did."""
    for state in (AppState.FAILED, AppState.CANCELLED, AppState.RUNNING, AppState.PENDING):
        if state in states:
            return state
    return AppState.SUCCEEDED if states else AppState.UNKNOWN


def _run(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd)}: no answer in 30 s") from None
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def job_id(handle: str) -> str:
    """``slurm://torchx/42`` → ``42``."""
    parsed = parse_app_handle(handle)
    if parsed.scheduler_backend != "slurm":
        raise SlurmError(f"{handle}: not a Slurm job handle (slurm://SESSION/JOBID)")
    return parsed.app_id


def state(handle: str) -> AppState:
    """The job's state; UNKNOWN while ``sacct`` does not list it yet."""
    app_id = job_id(handle)
    rows = _run("sacct", "--parsable2", "--noheader", "--allocations", "-j", app_id,
                "--format", "JobID,State")  # fmt: skip
    states = []
    for row in rows.splitlines():
        jid, _, slurm_state = row.partition("|")
        if jid.split("+")[0] == app_id and slurm_state:
            states.append(translate(slurm_state))
    return combine(states)


def pending_reasons(handle: str) -> set[str]:
    """Why the job's components are pending (``squeue``'s reason), if they are."""
    rows = _run("squeue", "--noheader", "-j", job_id(handle), "--format", "%T|%r")
    return {r.split("|")[1] for r in rows.splitlines() if r.startswith("PENDING|")}


@dataclass(frozen=True)
class Node:
    """One node of a partition, as ``sinfo`` lists it."""

    name: str
    cpus: int
    memory_mb: int
    gpus: int


def nodes(partition: str | None) -> list[Node]:
    """The nodes of ``partition`` (the default partition when None)."""
    args = ["sinfo", "--noheader", "--Node", "--format", "%N|%c|%m|%G"]
    listed = _run(*args, *(["--partition", partition] if partition else []))
    out = []
    for row in listed.splitlines():
        name, cpus, memory, gres = row.split("|")
        gpus = sum(
            int(part.split(":")[-1].split("(")[0])
            for part in gres.split(",")
            if part.startswith("gpu") and part.split(":")[-1].split("(")[0].isdigit()
        )
        out.append(Node(name, int(cpus), int(memory.rstrip("+")), gpus))
    return out


def _largest(listed: list[Node]) -> str:
    best = max(listed, key=lambda n: (n.cpus, n.memory_mb, n.gpus))
    has = f"{best.cpus} CPUs, {best.memory_mb} MB, {best.gpus} GPUs"
    return f"the largest node ({best.name}) has {has}"


def check_fits(cpu: int, memory_mb: int, gpu: int, partition: str | None) -> None:
    """SlurmError unless some node of ``partition`` holds one replica (cpu, memMB, gpu)."""
    listed = nodes(partition)
    where = f"partition {partition!r}" if partition else "the default partition"
    if not listed:
        raise SlurmError(f"{where} has no nodes (sinfo lists none)")
    # TorchX leaves memory out of the request where a partition has under 1 GB (see its docs).
    memory_counts = max(n.memory_mb for n in listed) > 1000
    if any(
        n.cpus >= cpu and (not memory_counts or n.memory_mb >= memory_mb) and n.gpus >= gpu
        for n in listed
    ):
        return
    raise SlurmError(
        f"no node of {where} can hold one replica: it asks for {cpu} CPUs, {memory_mb} MB, "
        f"{gpu} GPUs and {_largest(listed)}; lower cpu/memMB/gpu or resource in the profile"
    )


def wait(
    handle: str,
    *,
    poll_s: float = 1.0,
    max_pending_s: float = 600.0,
    max_unknown_s: float = 60.0,
    timeout_s: float | None = None,
    partition: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> AppState:
    """Wait until the job ends; its final state. A job that can never start, or pends longer
    than ``max_pending_s``, or has not ended after ``timeout_s`` (None: no bound besides the
    job's own time limit), or that ``sacct`` never lists, is cancelled with a SlurmError."""
    started = clock()
    pending_since: float | None = None
    while True:
        now = clock()
        current = state(handle)
        if current in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED):
            return current
        if timeout_s is not None and now - started > timeout_s:
            cancel(handle)
            raise SlurmError(f"{handle} cancelled: still {current.name} after {timeout_s:.0f} s")
        if current == AppState.UNKNOWN and now - started > max_unknown_s:
            raise SlurmError(f"{handle}: sacct has not listed the job after {max_unknown_s:.0f} s")
        if current == AppState.PENDING:
            pending_since = now if pending_since is None else pending_since
            reasons = pending_reasons(handle)
            never = sorted(r for r in reasons if r in NEVER_STARTS)
            waited = now - pending_since
            if never or waited > max_pending_s:
                asked = _request(handle, partition)
                cancel(handle)
                why = (
                    f"Slurm says it can never start ({', '.join(never)})"
                    if never
                    else f"it pended {waited:.0f} s (> {max_pending_s:.0f} s; Slurm's reason: "
                    f"{', '.join(sorted(reasons)) or 'none'})"
                )
                raise SlurmError(f"{handle} cancelled: {why}; {asked}")
        else:
            pending_since = None
        time.sleep(poll_s)


def cancel(handle: str) -> None:
    """Cancel the job (``scancel``); nothing if it has ended."""
    _run("scancel", job_id(handle))


def _request(handle: str, partition: str | None) -> str:
    """What the job asks of one node, and what the largest node of the partition has."""
    asked = []
    shown = _run("scontrol", "--oneliner", "show", "job", job_id(handle))
    for line in shown.splitlines()[:1]:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        asked = [
            f"{fields.get('MinCPUsNode', '?')} CPUs",
            f"{fields.get('MinMemoryNode', '?')} memory",
            f"TRES {fields.get('TRES', '?')}",
        ]
        partition = partition or fields.get("Partition")
    try:
        largest = _largest(nodes(partition))
    except (SlurmError, ValueError):
        largest = "the partition's nodes could not be listed"
    return f"each replica asks for {', '.join(asked)}; {largest}"


@contextmanager
def submit_environment(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in this process while a job is submitted. A Slurm job inherits the
    environment of ``sbatch`` (``--export=ALL``); PATH must come this way, as ``srun
    --export=ALL,PATH=...`` (how TorchX passes a role's env) leaves PATH as it was."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_path(handle: str, role: str, replica: int = 0, stream: str = "err") -> Path:
    """Where TorchX's Slurm job writes a replica's stderr (``err``) or stdout (``out``): the
    directory it was submitted from, as ``slurm-<job>-<role>-<replica>.<stream>``."""
    return Path(os.getcwd()) / f"slurm-{job_id(handle)}-{role}-{replica}.{stream}"


def follow(
    path: Path, done: threading.Event, write: Callable[[str], None], poll_s: float = 0.2
) -> None:
    """Write each line of ``path`` as it comes until ``done`` is set and the file is read to
    its end (it may never appear: a job cancelled before it started)."""
    while not path.exists():
        if done.wait(poll_s) and not path.exists():
            return
    with path.open(errors="replace") as f:
        rest = ""
        while True:
            finished = done.is_set()  # before the read: what was written by then is read now
            chunk = f.read(65536)
            if chunk:
                *lines, rest = (rest + chunk).split("\n")
                for line in lines:
                    write(line + "\n")
            elif finished:
                if rest:
                    write(rest + "\n")
                return
            else:
                done.wait(poll_s)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "status":
        usage = "usage: python -m recsys.pipelines.slurm status slurm://SESSION/JOBID"
        print(usage, file=sys.stderr)
        return 64
    print(state(args[1]).name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
