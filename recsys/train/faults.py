"""Fault injection: make a run fail on purpose, once, to prove that it recovers.

This module owns the faults a job can be told to suffer, for the tests and drills of
docs/reliability.md. Off by default; switched on by the environment variable
``RECSYS_FAULTS`` (so that a launcher can set it for one job without touching configs), a
``;``-separated list of faults, each ``KIND[:key=value...]``:

- ``kill:step=S[:rank=R]`` — rank R (default 0) kills itself with SIGKILL right after
  training step S (as a lost host would: no clean-up, no checkpoint);
- ``save:step=S[:rank=R]`` — rank R dies (SIGKILL) in the middle of saving the checkpoint of
  step S: its shards are written into the temporary directory, which is never renamed;
- ``sigterm:step=S[:rank=R]`` — rank R alone receives SIGTERM after step S: the job saves a
  checkpoint and its ranks exit with code 143;
- ``preempt:step=S[:rank=R]`` — after step S, rank R sends SIGTERM to its whole process group
  (the launcher, every rank and their data-loader workers), as a scheduler preempting the job
  does;
- ``loader:batch=N[:rank=R]`` — the data loader of rank R raises when asked for its N-th
  batch (1-based) of the run;
- ``nonfinite:step=S[:rank=R]`` — rank R's loss of training step S (1-based) is NaN, and so
  is every gradient behind it (the loss is multiplied by NaN), as a diverging model's would
  be: the run stops or skips the step as ``run.nonfinite`` says;
- ``stage:after=N`` — the pipeline (``recsys pipeline run``) kills itself with SIGKILL once the
  N-th stage it ran has finished, between two stages (its run directory: the experiment's).

Each fault fires once per run directory: before firing, it is recorded in
``RUN/faults.fired``, so the restarted job, which sees the same environment, runs clean.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from recsys.errors import UserError

log = logging.getLogger(__name__)

ENV = "RECSYS_FAULTS"
KINDS = {
    "kill": "step",
    "save": "step",
    "sigterm": "step",
    "preempt": "step",
    "loader": "batch",
    "nonfinite": "step",
    "stage": "after",
}
"""Each kind and the counter it fires at."""


class InjectedFault(RuntimeError):
    """The error a ``loader`` fault raises."""


class FaultSpecError(UserError, ValueError):
    """A ``RECSYS_FAULTS`` value that cannot be parsed."""


@dataclass(frozen=True)
class Fault:
    kind: str
    at: int
    """The step (or batch) it fires at."""
    rank: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}:{KINDS[self.kind]}={self.at}:rank={self.rank}"


def parse(text: str) -> list[Fault]:
    """The faults of a ``RECSYS_FAULTS`` value (see the module doc)."""
    faults = []
    for spec in (s.strip() for s in text.split(";")):
        if not spec:
            continue
        kind, *pairs = spec.split(":")
        if kind not in KINDS:
            raise FaultSpecError(
                f"{ENV}: unknown fault {kind!r} in {spec!r}; kinds: {sorted(KINDS)}"
            )
        values: dict[str, int] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in (KINDS[kind], "rank") or not value.isdigit():
                raise FaultSpecError(
                    f"{ENV}: {spec!r}: expected {kind}:{KINDS[kind]}=N[:rank=R], got {pair!r}"
                )
            values[key] = int(value)
        if KINDS[kind] not in values:
            raise FaultSpecError(f"{ENV}: {spec!r} needs {KINDS[kind]}=N")
        faults.append(Fault(kind, values[KINDS[kind]], values.get("rank", 0)))
    return faults


class Faults:
    """The faults this rank of a run may suffer (none unless ``RECSYS_FAULTS`` is set)."""

    def __init__(self, run_dir: str | Path, rank: int, text: str | None = None) -> None:
        text = os.environ.get(ENV, "") if text is None else text
        self.rank = rank
        self.record = Path(run_dir) / "faults.fired"
        self.faults = [f for f in parse(text) if f.rank == rank]
        if self.faults:
            log.warning("fault injection on rank %d: %s", rank, [f.name for f in self.faults])

    def _due(self, kind: str, at: int) -> Fault | None:
        for fault in self.faults:
            if fault.kind == kind and fault.at == at:
                fired = self.record.read_text().split() if self.record.exists() else []
                if fault.name in fired:
                    return None
                self.record.parent.mkdir(parents=True, exist_ok=True)
                with self.record.open("a") as f:  # recorded before it fires
                    f.write(fault.name + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                log.warning("injected fault fires: %s", fault.name)
                return fault
        return None

    def after_step(self, step: int) -> None:
        """Called by the trainer after each training step."""
        if self._due("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._due("preempt", step):
            os.killpg(os.getpgrp(), signal.SIGTERM)

    def in_save(self, step: int) -> None:
        """Called by the checkpoint manager once this rank's shards of ``step`` are written."""
        if self._due("save", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_stage(self, finished: int) -> None:
        """Called by the pipeline after each stage it ran (``finished`` of them so far)."""
        if self._due("stage", finished):
            os.kill(os.getpid(), signal.SIGKILL)

    def poison_loss(self, step: int, loss):
        """Called with the loss of training step ``step`` (1-based) before backward: NaN
        when a ``nonfinite`` fault is due."""
        if self.faults and self._due("nonfinite", step):
            return loss * float("nan")
        return loss

    def on_batch(self, batch: int) -> None:
        """Called when the loader is asked for its ``batch``-th batch (1-based)."""
        if self._due("loader", batch):
            raise InjectedFault(f"injected data-loader fault at batch {batch} (rank {self.rank})")
