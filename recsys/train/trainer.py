"""The training loop every stage runs: resume → { step, log, evaluate, save } → save.

This module owns the order of a run and what survives a restart. It is handed a sharded
model, its optimizers and data loaders, all built elsewhere; it never builds or shards a
model. Everything a restart needs is checkpointed through ``CheckpointManager``: the model
(sharded tables and dense part), the fused table optimizer, the dense optimizer and its
schedule, and per rank the step, epoch, data cursor, metric states and random-number
generators — so a resumed run continues bit for bit where it stopped.

Every rank has the same number of batches in an epoch (the stream sizes each reader's share
so); the epoch's length is still taken as the fewest any rank has, so collectives stay
matched whatever the loader. Steps run in windows between logging steps (``log_every``),
checkpoints and epoch ends, and the ranks agree once per window (:meth:`Trainer._run_epoch`).
SIGTERM (preemption) makes every rank save at the next agreement or epoch end and stop;
``recsys.train.faults`` injects failures for the recovery tests.

A NaN or infinite loss or dense gradient norm is never averaged away. At the end of every
window the ranks agree, in the one all-reduce that also carries the SIGTERM flag, on whether
any rank saw one: with ``nonfinite="stop"`` (the default) every rank raises
:class:`NonFinite` naming the step, rank and value before anything after it is saved. With
``"skip"`` windows are one step long and the ranks agree on the loss before backward (one
more small all-reduce per step), because the
tables' fused optimizer updates them inside backward: a step with a non-finite loss makes no
update at all; a non-finite gradient norm behind a finite loss skips the dense step only (the
tables were updated in backward by then). Skipped steps are counted in the epoch's
``train_nonfinite_steps``.
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import math
import random
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recsys.checkpoint.manager import CheckpointManager, keys
from recsys.checks import require
from recsys.distributed.env import collective_device
from recsys.errors import UserError
from recsys.train import compiling, precision
from recsys.train.faults import Faults
from recsys.train.host import reuse_freed_memory
from recsys.train.log import RunLog, SampleLog
from recsys.train.metrics import CTRMetrics, PretrainMetrics
from recsys.train.optim import OptimConfig, clip, dense_parameters
from recsys.train.ranks import until_every_rank_is_done
from recsys.train.throughput import Meter, batch_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """How a run goes: its length, checkpoints, seed and precision (a stage config's ``run``
    section); the :class:`Trainer` is given it with the run's directory and task."""

    epochs: int = 1
    """Passes over the training data."""
    max_steps: int | None = None
    """Stop after this many steps in all (None: after ``epochs``)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep: int = 2
    """Checkpoints kept."""
    resume: bool = True
    """Continue from the run's latest checkpoint when there is one (False: start over)."""
    seed: int = 0
    """Seed of Python's, NumPy's and torch's generators (``seed + rank`` on each rank)."""
    record_samples: bool = False
    """Audit: write each training step's dataset row ids to ``RUN/samples/rank<r>.jsonl``."""
    bf16: str = "auto"
    """bf16 autocast of the forward pass: ``on``, ``off``, or ``auto``: on CUDA, and on CPU
    with ``cpu_bf16`` (``recsys.train.precision``)."""
    cpu_bf16: bool = False
    """With ``bf16=auto``, bf16 autocast on CPU too (attention stays fp32): ~1.4x faster CTR
    training steps (the tower alone ~1.7x) on CPUs with bf16 matrix units (AMX: Xeon
    Sapphire Rapids and later), slower on CPUs without them (``recsys doctor`` tells)."""
    log_every: int = 10
    """Steps between logged training steps (loss, gradient norm, learning rate, samples/s)
    and between the ranks' agreements on SIGTERM, non-finite values and the end of their
    data: the only steps that wait for the device or talk to the other ranks (besides
    checkpoints and epoch ends). 1: every step."""
    compile: str = "auto"
    """``torch.compile`` the tower, one Transformer block at a time: ``on``, ``off``, or
    ``auto``: on CUDA, and on CPU for runs of 500 steps or more (``recsys.train.compiling``)."""
    nonfinite: str = "stop"
    """A step whose loss or dense gradient norm is NaN or infinite: ``stop`` the run with
    one line naming the step, rank and value (:class:`NonFinite`: no checkpoint, no DONE),
    or ``skip`` the step (no update) and count it (``train_nonfinite_steps``)."""

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs", ">= 1", self.epochs)
        steps = self.max_steps
        require(steps is None or steps >= 1, "max_steps", ">= 1, or null for no limit", steps)
        every = self.checkpoint_every
        require(every >= 0, "checkpoint_every", ">= 0 (0: only at the end)", every)
        require(self.keep >= 1, "keep", ">= 1", self.keep)
        seed_range = f"in [0, {SEED_LIMIT - 1}]"
        require(0 <= self.seed < SEED_LIMIT, "seed", seed_range, self.seed)
        choices = " or ".join(NONFINITE_POLICIES)
        require(self.nonfinite in NONFINITE_POLICIES, "nonfinite", choices, self.nonfinite)
        require(self.log_every >= 1, "log_every", ">= 1", self.log_every)
        formats = " or ".join(precision.CHOICES)
        require(self.bf16 in precision.CHOICES, "bf16", formats, self.bf16)
        modes = " or ".join(compiling.CHOICES)
        require(self.compile in compiling.CHOICES, "compile", modes, self.compile)


STEP_LIMIT = 2**31
"""Steps of a run lie below it (the agreement on non-finite values encodes the step)."""
CODES = 8
"""More than the kinds of non-finite values (:meth:`NonFiniteValue.code`)."""
NONFINITE_POLICIES = ("stop", "skip")
"""What a step with a NaN or infinite loss or dense gradient norm does (``RunConfig``)."""
SEED_LIMIT = 2**31
"""Seeds lie below it: each rank seeds NumPy with ``seed + rank``, which must stay < 2**32."""
TASKS = ("ctr", "pretrain")
"""``ctr`` (labels, AUC/gAUC) or ``pretrain`` (next-item loss, hit rate)."""


def _blob(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _unblob(blob: bytes) -> Any:
    # The run's own checkpoint: trusted, and it holds Python objects (RNG states).
    return torch.load(io.BytesIO(blob), weights_only=False, map_location="cpu")


def seed_everything(seed: int, rank: int) -> None:
    """Python, NumPy and torch generators, distinct per rank (negatives are drawn per rank)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _iterate(loader) -> Iterator:
    """An iterator of ``loader`` that leaves the global random generator alone: a torch
    DataLoader draws a seed from it when an iterator starts, and a resumed run starts its
    iterator at another step than the uninterrupted run did (the models draw negatives from
    that generator)."""
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def _cursor(loader) -> dict:
    """A copy of ``loader``'s state that leaves the global random generator alone (before its
    first iterator, a torch DataLoader's state draws the iterator's seed from it)."""
    with torch.random.fork_rng(devices=[]):
        return copy.deepcopy(loader.state_dict())


@dataclass(frozen=True)
class NonFiniteValue:
    """A NaN or infinite value one rank saw in a step: the loss or the dense gradient norm."""

    what: str
    """``loss`` or ``gradient norm``."""
    value: float
    rank: int

    WHATS = ("gradient norm", "loss")  # the loss ranks first: it is where a NaN starts
    VALUES = (math.nan, math.inf, -math.inf)

    def code(self, world_size: int) -> int:
        """A positive integer whose MAX over ranks picks the loss over the gradient norm,
        then the lowest rank; 0 stands for "finite" (see :meth:`decode`)."""
        kind = 1 + 3 * self.WHATS.index(self.what) + _value_index(self.value)
        return kind * world_size + (world_size - 1 - self.rank)

    @classmethod
    def decode(cls, code: int, world_size: int) -> NonFiniteValue | None:
        if code <= 0:
            return None
        kind, rank = divmod(code, world_size)
        what, value = divmod(kind - 1, 3)
        return cls(cls.WHATS[what], cls.VALUES[value], world_size - 1 - rank)

    def __str__(self) -> str:
        return f"the {self.what} is {self.value} on rank {self.rank}"


def _value_index(value: float) -> int:
    return 0 if math.isnan(value) else (1 if value > 0 else 2)


def nonfinite(what: str, value: float | None, rank: int) -> NonFiniteValue | None:
    """``value`` as a :class:`NonFiniteValue` if it is NaN or infinite (None when finite or
    not measured)."""
    if value is None or math.isfinite(value):
        return None
    return NonFiniteValue(what, value, rank)


class NonFinite(UserError, FloatingPointError):
    """A step's loss or dense gradient norm was NaN or infinite and ``run.nonfinite`` is
    ``stop``: every rank stopped before saving anything of that step."""

    def __init__(self, step: int, bad: NonFiniteValue, latest) -> None:
        saved = f"the latest checkpoint is {latest}" if latest is not None else "no checkpoint"
        super().__init__(
            f"step {step}: {bad} (run.nonfinite=stop): stopped without saving "
            f"this step, {saved}; run.nonfinite=skip skips such steps instead"
        )
        self.step, self.bad = step, bad


def stop_workers(loader) -> None:
    """Stop the worker processes of ``loader``'s current iterator now. A run that stops on an
    error must not leave them to the interpreter's exit: the workers ignore SIGTERM (the
    training process stops them, see ``recsys.stages.build``), so multiprocessing's exit
    handler would wait on them forever. The loader keeps its iterator (for its state) and
    offers no public way to stop it: its iterator's ``_shutdown_workers`` is what torch's own
    clean-up calls."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class Preempted(RuntimeError):
    """The run stopped on SIGTERM after saving a checkpoint; run it again to resume."""

    def __init__(self, step: int, path) -> None:
        super().__init__(
            f"preempted (SIGTERM) after step {step}: saved {path}; run again to resume"
        )
        self.step, self.path = step, path


@dataclass
class _Step:
    """A trained (or skipped) step as the window keeps it until the next agreement: its
    loss and dense gradient norm stay on the device until then."""

    step: int
    lr: float
    loss: Any
    """The loss tensor; its value once settled."""
    norm: Any
    """The gradient norm tensor (None: skipped before backward, and counted then); its value
    once settled."""
    samples: int
    """Rows trained on (0: skipped)."""
    tokens: int = 0
    """Items the tower took in (``recsys.train.throughput.batch_tokens``)."""

    def values(self) -> torch.Tensor:
        norm = self.norm if self.norm is not None else torch.zeros_like(self.loss)
        return torch.stack([self.loss.float(), norm.float().to(self.loss.device)])


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        dense_optimizer,
        schedule,
        train_loader,
        config: RunConfig,
        optim: OptimConfig,
        valid_loader=None,
        *,
        run_dir: str,
        task: str = "ctr",
    ) -> None:
        """``run_dir``: where checkpoints, metrics.jsonl, TensorBoard files and config.json
        go; ``task``: one of :data:`TASKS`."""
        if task not in TASKS:
            raise ValueError(f"task must be {' or '.join(TASKS)}, got {task!r}")
        self.model, self.dense, self.schedule = model, dense_optimizer, schedule
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.config, self.optim = config, optim
        self.run_dir, self.task = run_dir, task
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        dense = next(iter(self.dense.params.values()), None)
        self.device = dense.device if dense is not None else torch.device("cpu")
        self.bf16 = precision.bf16(config.bf16, config.cpu_bf16, self.device)
        precision.use_tf32(self.device)
        self.meter = Meter(model, self.device, self.bf16, self.world_size)
        if self.device.type == "cpu":
            reuse_freed_memory()  # steps reuse the last step's pages (recsys.train.host)
        self.step = self.epoch = self.epoch_step = 0
        self.nonfinite_steps = 0
        """Steps of the current epoch skipped for a non-finite value (``nonfinite="skip"``)."""
        self.results: dict[str, float] = {}
        """The metrics of the last epoch that ended (what :meth:`train` returns)."""
        self.samples = 0
        """Rows this rank trained on since this process started (throughput; not saved)."""
        self.train_metrics = self._metrics()
        self.faults = Faults(run_dir, self.rank)
        self.checkpoints = CheckpointManager(
            f"{run_dir}/checkpoint", keep=config.keep, faults=self.faults
        )
        self._sigterm = False  # set by the SIGTERM handler while train() runs
        self._cursor: dict | None = None  # the loader's state at the last agreement
        self._clock = time.perf_counter()  # when the last window's values were settled
        self._fetched = 0  # training batches this process has taken from the loader
        self.samples_log: SampleLog | None = None
        self.log: RunLog | None = None  # opened by train(), once it knows where it resumes

    def state(self, with_rank_state: bool = True) -> dict[str, Any]:
        """What a checkpoint holds. Tensors (model, optimizer states) go through DCP, which
        reshards them. The rest is plain Python state, saved as serialized blobs: the step,
        epoch and schedule under ``trainer`` (the same on every rank, so DCP keeps one copy),
        and each rank's data cursor, metric states and RNGs under ``rank<r>`` (DCP keeps a
        single copy of a value every rank saves under the same key, and its key matching
        rejects plain-Python state whose layout changes once a loader has started)."""
        state = {
            "model": self.model,
            "fused": self.model.fused_optimizer,
            "dense": self.dense,
            "trainer": _blob(
                {
                    "step": self.step,
                    "epoch": self.epoch,
                    "epoch_step": self.epoch_step,
                    "schedule": self.schedule.state_dict(),
                    "world_size": self.world_size,
                    "results": self.results,
                    "nonfinite_steps": self.nonfinite_steps,
                }
            ),
        }
        if with_rank_state:
            state[self._rank_key] = _blob(
                {
                    "loader": (
                        self._cursor if self._cursor is not None else self.train_loader.state_dict()
                    ),
                    "metrics": self.train_metrics.state_dict(),
                    "rng": {
                        "python": random.getstate(),
                        "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state(),
                        "cuda": (
                            torch.cuda.get_rng_state(self.device)
                            if self.device.type == "cuda"
                            else None
                        ),
                    },
                    # How much of metrics.jsonl this checkpoint has seen (rank 0 writes it).
                    "log_bytes": self.log.size() if self.log is not None else None,
                }
            )
        return state

    @property
    def _rank_key(self) -> str:
        return f"rank{self.rank}"

    def _metrics(self):
        return CTRMetrics() if self.task == "ctr" else PretrainMetrics(self.device)

    def _resume(self) -> int | None:
        """Load the latest usable checkpoint; the size of metrics.jsonl it saw (rank 0's,
        None when unknown)."""
        loaded: dict[str, Any] = {}

        def state_for(path) -> dict[str, Any]:
            saved = keys(path)
            if "dense" in saved:  # (none before the first dense step: skipped steps)
                self.dense.init_state()  # AdamW's state is lazy: make room for the saved one
            saved_ranks = {k for k in saved if k.startswith("rank")}
            same_world = len(saved_ranks) == self.world_size
            loaded.clear()
            loaded.update(self.state(with_rank_state=same_world))
            return loaded

        path = self.checkpoints.load(state_for)
        shared = _unblob(loaded["trainer"])
        self.step, self.epoch = int(shared["step"]), int(shared["epoch"])
        self.epoch_step = int(shared["epoch_step"])
        self.nonfinite_steps = int(shared.get("nonfinite_steps", 0))
        self.results = dict(shared.get("results") or {})  # the last ended epoch's metrics
        self.schedule.load_state_dict(shared["schedule"])
        # The optimizer's current learning rate is plain Python state too: set it from the
        # schedule, or the first resumed step would run at the schedule's starting rate.
        for group, lr in zip(self.dense.param_groups, self.schedule.get_last_lr(), strict=True):
            group["lr"] = lr
        if self._rank_key not in loaded:
            log.warning(
                "%s was saved by %d ranks and is resumed on %d: weights, optimizers and "
                "step carry over; the data cursors cannot, so epoch %d restarts from "
                "its first batch",
                path,
                shared["world_size"],
                self.world_size,
                self.epoch,
            )
            self.epoch_step = 0
            return None
        mine = _unblob(loaded[self._rank_key])
        if self.epoch_step:  # (an epoch that has not started starts from its beginning)
            self.train_loader.load_state_dict(mine["loader"])
        self.train_metrics.load_state_dict(mine["metrics"])
        random.setstate(mine["rng"]["python"])
        np.random.set_state(mine["rng"]["numpy"])
        torch.set_rng_state(mine["rng"]["torch"])
        if mine["rng"].get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["rng"]["cuda"], self.device)
        return mine.get("log_bytes")

    def train(self) -> dict[str, float]:
        """Run to the end; return the last epoch's metrics.

        On SIGTERM (preemption) every rank finishes its window of steps, the job saves a
        checkpoint and :class:`Preempted` is raised; the next run resumes from it."""
        self._sigterm = False
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._train()
        except BaseException:
            for loader in (self.train_loader, self.valid_loader):
                stop_workers(loader)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: saving a checkpoint at the next agreement, then stopping")
        self._sigterm = True

    def _preempted(self) -> bool:
        """Whether any rank got SIGTERM (all ranks agree, so they save together)."""
        return self._agree(None)[0]

    def _agree(
        self, bad: NonFiniteValue | None, batches: int = 0, step: int = 0
    ) -> tuple[bool, NonFiniteValue | None, int, int]:
        """Whether any rank got SIGTERM; the non-finite value any rank saw at ``step`` (the
        earliest step, then the loss before the gradient norm, then the lowest rank) and
        that step; and the fewest ``batches`` any rank has for the next window: one
        all-reduce for all of it."""
        code = 0
        if bad is not None:
            code = (STEP_LIMIT - step) * CODES * self.world_size + bad.code(self.world_size)
        flags = torch.tensor([int(self._sigterm), code, -batches], device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        sigterm, code, fewest = flags.tolist()
        where, code = divmod(code, CODES * self.world_size)
        agreed = NonFiniteValue.decode(code, self.world_size)
        return bool(sigterm), agreed, (STEP_LIMIT - where if agreed else 0), -fewest

    def _train(self) -> dict[str, float]:
        seed_everything(self.config.seed, self.rank)
        resumed, log_bytes = 0, None  # a run that starts over forgets earlier logs
        if self.config.resume and self.checkpoints.latest() is not None:
            log_bytes = self._resume()
            resumed = self.step
        # Steps run after the checkpoint by the interrupted run are logged again by this one:
        # the log forgets the earlier copies.
        self.log = RunLog(
            self.run_dir,
            main=self.rank == 0,
            total_steps=self.config.max_steps,
            config={
                "train": {"run_dir": self.run_dir, "task": self.task, **asdict(self.config)},
                "optim": asdict(self.optim),
            },
            resumed_at=resumed,
            keep_bytes=log_bytes,
        )
        self.samples_log = (
            SampleLog(self.run_dir, self.rank, resumed) if self.config.record_samples else None
        )
        while self.epoch < self.config.epochs and not self._done():
            if not self._run_epoch():
                break  # max_steps reached inside the epoch: it is not over
            self.results = self._end_epoch()
            self._stop_if_preempted()
        if self.step > 0 and not self._saved_now():  # a run that trained nothing saves nothing
            self.checkpoints.save(self.step, self.state())
        self._close_logs()
        return self.results

    def _saved_now(self) -> bool:
        latest = self.checkpoints.latest()
        return latest is not None and latest.name == f"step-{self.step:08d}"

    def _stop_if_preempted(self, preempted: bool | None = None) -> None:
        """At an agreement or an epoch's end: if any rank got SIGTERM, save and stop
        (``preempted``: what the ranks agreed, None: ask them now)."""
        if preempted is None:
            preempted = self._preempted()
        if preempted:
            path = self.checkpoints.latest() if self._saved_now() else None
            if path is None:
                path = self.checkpoints.save(self.step, self.state())
            self._close_logs()
            raise Preempted(self.step, path)

    def _close_logs(self) -> None:
        self.log.close()
        if self.samples_log is not None:
            self.samples_log.close()

    def _run_epoch(self) -> bool:
        """Train through the rest of the current epoch; False if max_steps stopped it first.

        Steps run in windows that end at logging steps (``log_every``), checkpoints, the
        epoch's end and ``max_steps``. Before a window each rank draws its batches, and the
        ranks agree, in one all-reduce, on the fewest any of them drew, on SIGTERM and on
        the non-finite values of the window just trained; inside a window no step waits for
        the device or for the other ranks. With ``nonfinite="skip"`` windows are one step
        long: the loss is agreed on before each backward."""
        self._set_epoch(self.epoch)
        length = self._epoch_length()
        batches = self._batches()
        self._clock = time.perf_counter()  # samples/s counts this epoch's steps only
        trained: list[_Step] = []  # the steps since the last agreement
        try:
            while True:
                # A checkpoint at this boundary holds the cursor before the next window's
                # batches are drawn: they are not trained yet.
                self._cursor = _cursor(self.train_loader)
                window = list(itertools.islice(batches, self._window(length)))
                seen, at = self._settle(trained)
                preempted, bad, at, count = self._agree(seen, len(window), at)
                self._after_window(bad, at)
                every = self.config.checkpoint_every
                if trained and every and self.step % every == 0:
                    self.checkpoints.save(self.step, self.state())
                    preempted = self._preempted() or preempted  # SIGTERM while saving
                if length is not None and self.epoch_step >= length:
                    return True  # every rank's share is done
                if self._done():
                    return False
                self._stop_if_preempted(preempted)  # (at an epoch's end, after the epoch)
                if count == 0:
                    break
                trained = [self._train_step(batch) for batch in window[:count]]
        finally:
            self._cursor = None
        if length is not None and self.epoch_step < length:
            log.warning(
                "epoch %d ended after %d of %d steps: a rank's data ran out (rows of bad row "
                "groups skipped); the other ranks' last batches of the epoch were not trained",
                self.epoch,
                self.epoch_step,
                length,
            )
        return True

    def _window(self, length: int | None) -> int:
        """Steps until the next agreement: the next logging step, checkpoint, the epoch's
        end or ``max_steps``, whichever comes first (one step when skipping non-finite
        steps)."""
        if self.config.nonfinite == "skip":
            size = 1
        else:
            size = self.config.log_every - self.step % self.config.log_every
        if self.config.checkpoint_every:
            size = min(
                size, self.config.checkpoint_every - self.step % self.config.checkpoint_every
            )
        if length is not None:
            size = min(size, length - self.epoch_step)
        if self.config.max_steps is not None:
            size = min(size, self.config.max_steps - self.step)
        return max(size, 0)

    def _settle(self, trained: list[_Step]) -> tuple[NonFiniteValue | None, int]:
        """Bring the window's losses and norms to the host (one copy, the only wait for the
        device in a window); log its logging steps; the first non-finite value this rank saw
        that is not counted yet, and its step."""
        if not trained:
            return None, 0
        values = torch.stack([t.values() for t in trained]).tolist()
        first, at = None, 0
        now = time.perf_counter()
        elapsed, self._clock = now - self._clock, now
        samples = sum(t.samples for t in trained)
        speed = self.meter.figures(samples, sum(t.tokens for t in trained), elapsed)
        for step, (loss, norm) in zip(trained, values, strict=True):
            backward = step.norm is not None
            step.loss, step.norm = loss, norm if backward else None
            if first is None and backward:
                first = nonfinite("loss", loss, self.rank) or nonfinite(
                    "gradient norm", step.norm, self.rank
                )
                at = step.step
            last = step is trained[-1] and self._done()
            if step.step % self.config.log_every == 0 or last:
                record = {"loss": loss, "lr": step.lr}
                if step.norm is not None:
                    record["grad_norm"] = step.norm
                record.update(speed)
                self.log.record(step.step, "step", record)
                self.log.progress(step.step, record)
        return first, at

    def _after_window(self, bad: NonFiniteValue | None, step: int) -> None:
        """A non-finite value some rank saw at ``step`` stops every rank (``stop``) or is
        counted (``skip``)."""
        if bad is None:
            return
        if self.config.nonfinite == "stop":
            self._close_logs()
            raise NonFinite(step, bad, self.checkpoints.latest())
        self._count_skipped(step, bad, "no dense step; the tables were updated in backward")

    def _batches(self) -> Iterator:
        """This epoch's training batches; a ``loader`` fault fires at its batch."""
        for batch in _iterate(self.train_loader):
            self._fetched += 1
            self.faults.on_batch(self._fetched)
            yield batch

    def _epoch_length(self) -> int | None:
        """Steps in this epoch, the same on every rank: the fewest batches any rank has (known
        from the footers, so an epoch that ends exactly at max_steps still counts as ended)."""
        dataset = getattr(self.train_loader, "dataset", None)
        if not hasattr(dataset, "batches_in_epoch"):
            return None
        workers = getattr(self.train_loader, "num_workers", 0)
        length = torch.tensor(
            [dataset.batches_in_epoch(self.epoch, workers)], device=collective_device()
        )
        if dist.is_initialized():
            dist.all_reduce(length, op=dist.ReduceOp.MIN)
        return int(length)

    def _train_step(self, batch) -> _Step:
        """One step, waiting for nothing unless non-finite steps are skipped (then the loss
        and the gradient norm are looked at before the updates they would spoil)."""
        self.model.train()
        tokens = batch_tokens(batch)  # on the host, before the batch moves
        out = self._forward(batch)
        out = out._replace(loss=self.faults.poison_loss(self.step + 1, out.loss))
        lr = self.schedule.get_last_lr()[0]  # the rate this step uses
        skip = self.config.nonfinite == "skip"
        if skip and self._skipped_before_backward(out.loss.item()):
            self._advance(batch, trained=False)
            return _Step(self.step, lr, out.loss.detach(), None, 0)
        self.dense.zero_grad()
        out.loss.backward()  # the tables' optimizer runs inside backward
        norm = self._grad_norm()
        finite = True
        if skip:  # the dense step waits for the norm (the default path does not wait)
            finite = math.isfinite(float(norm)) and math.isfinite(out.loss.item())
        if finite:
            self.dense.step()
            # A non-finite step stops the run (the default) or was just found (skip): its
            # metrics are not kept either way.
            self._update(self.train_metrics, out, batch)
        self._advance(batch, trained=finite)
        trained = len(batch) if finite else 0
        return _Step(self.step, lr, out.loss.detach(), norm.detach(), trained, tokens)

    def _grad_norm(self) -> torch.Tensor:
        """The dense gradients' norm, clipped to ``clip_norm`` when set. Without clipping it
        is still measured, so a non-finite gradient behind a finite loss is caught too."""
        norm = clip(self.model, self.optim)
        if norm is None:
            grads = [p.grad for p in dense_parameters(self.model).values() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
        return norm

    def _advance(self, batch, trained: bool = True) -> None:
        """Count a step (trained or skipped): schedule, sample record, faults."""
        with warnings.catch_warnings():
            # A skipped first step advances the schedule before any optimizer step.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
            self.schedule.step()
        self.step += 1
        self.epoch_step += 1
        if trained:
            self.samples += len(batch)
        if self.samples_log is not None:
            self.samples_log.record(self.step, self.epoch, batch.row_ids.tolist())
        self.faults.after_step(self.step)

    def _skipped_before_backward(self, loss: float) -> bool:
        """``nonfinite="skip"``: whether any rank's loss is non-finite, agreed before backward
        (every rank skips it together: backward is collective, and it updates the tables)."""
        _, bad, _, _ = self._agree(nonfinite("loss", loss, self.rank), step=self.step + 1)
        if bad is not None:
            self._count_skipped(self.step + 1, bad, "no update")
        return bad is not None

    def _count_skipped(self, step: int, bad: NonFiniteValue, what: str) -> None:
        self.nonfinite_steps += 1
        log.warning("step %d: %s: skipped (%s; run.nonfinite=skip)", step, bad, what)

    def _skipped_rows(self) -> int:
        """Rows of bad row groups the ranks' training streams skipped this epoch (their
        cursors count them; ``skip_bad_row_groups``)."""

        def total(state: Any) -> int:
            if isinstance(state, dict):
                own = state.get("skipped_rows", 0) if "rows_done" in state else 0
                return int(own) + sum(total(v) for k, v in state.items() if k != "skipped_rows")
            return 0

        count = torch.tensor([total(self.train_loader.state_dict())], device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(count)
        return int(count.item())

    def _end_epoch(self) -> dict[str, float]:
        results = {f"train_{k}": v for k, v in self.train_metrics.compute().items()}
        self.train_metrics.reset()
        skipped = self._skipped_rows()
        if skipped:
            log.warning("epoch %d: %d rows of bad row groups skipped", self.epoch, skipped)
            results["train_skipped_rows"] = skipped
        if self.config.nonfinite == "skip":
            results["train_nonfinite_steps"] = self.nonfinite_steps
        self.nonfinite_steps = 0
        if self.valid_loader is not None:
            valid = self.evaluate(self.valid_loader)
            results.update({f"valid_{k}": v for k, v in valid.items()})
            if "train_auc" in results:
                # GPSD's overfitting signal: how far training AUC runs ahead of validation.
                results["gap_auc"] = results["train_auc"] - results["valid_auc"]
        self.epoch += 1
        self.epoch_step = 0
        self.log.record(self.step, "epoch", {"epoch": self.epoch, **results})
        return results

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """Metrics of ``loader``'s data under the current weights, over all ranks."""
        self.model.eval()
        metrics = self._metrics()
        for batch, scored in until_every_rank_is_done(_iterate(loader)):
            out = self._forward(batch)
            if scored:
                self._update(metrics, out, batch)
        return metrics.compute()

    def _forward(self, batch):
        device = self.device
        batch = batch.to(device)
        with torch.autocast(
            device_type=device.type,
            dtype=torch.bfloat16,
            enabled=self.bf16,
        ):
            if self.task == "ctr" and batch.extra is not None:
                return self.model(batch.features, batch.labels, extra=batch.extra)
            if self.task == "ctr":
                return self.model(batch.features, batch.labels)
            return self.model(batch.features)

    def _update(self, metrics, out, batch) -> None:
        if self.task == "ctr":
            metrics.update(out.logits, batch.labels, batch.user_ids)
        else:
            metrics.update(out.loss, out.hits, out.targets)

    def _set_epoch(self, epoch: int) -> None:
        dataset = getattr(self.train_loader, "dataset", None)
        if hasattr(dataset, "set_epoch") and dataset.epoch != epoch:
            dataset.set_epoch(epoch)

    def _done(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps
