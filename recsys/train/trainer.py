"""The training loop every stage runs: resume → { step, log, evaluate, save } → save.

This module owns the order of a run and what survives a restart. It is handed a sharded
model, its optimizers and data loaders, all built elsewhere; it never builds or shards a
model. Everything a restart needs is checkpointed through ``CheckpointManager``: the model
(sharded tables and dense part), the fused table optimizer, the dense optimizer and its
schedule, and per rank the step, epoch, data cursor, metric states and random-number
generators — so a resumed run continues bit for bit where it stopped.

Every rank has the same number of batches in an epoch (the stream sizes each reader's share
so); the epoch's length is still taken as the fewest any rank has, so collectives stay
matched whatever the loader. SIGTERM (preemption) makes every rank save at the next step or
epoch end and stop; ``recsys.train.faults`` injects failures for the recovery tests.
"""

from __future__ import annotations

import io
import logging
import random
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recsys.checkpoint.manager import CheckpointManager, keys
from recsys.distributed.env import collective_device
from recsys.train.faults import Faults
from recsys.train.host import reuse_freed_memory
from recsys.train.log import RunLog, SampleLog
from recsys.train.metrics import CTRMetrics, PretrainMetrics
from recsys.train.optim import OptimConfig, clip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """The loop's own settings."""

    run_dir: str
    """Where checkpoints, metrics.jsonl, TensorBoard files and config.json go."""
    task: str = "ctr"
    """``ctr`` (labels, AUC/gAUC) or ``pretrain`` (next-item loss, hit rate)."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many steps in all (None: after ``epochs``)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep: int = 3
    """Checkpoints kept."""
    resume: bool = True
    """Continue from the latest checkpoint of ``run_dir`` when there is one."""
    seed: int = 0
    bf16: bool = True
    """bf16 autocast of the forward pass on CUDA (on CPU only with ``cpu_bf16``)."""
    cpu_bf16: bool = False
    """bf16 autocast on CPU too (attention stays fp32, see ``recsys.models.tower.attend``):
    ~1.4x faster CTR training steps (the tower alone ~1.7x) on CPUs with bf16 matrix units
    (AMX: Xeon Sapphire Rapids and later), slower on CPUs without them."""
    record_samples: bool = False
    """Write the row ids of every trained batch to ``RUN/samples/rank<r>.jsonl``."""
    nonfinite: str = "stop"
    """A non-finite loss or dense gradient norm: ``stop`` (raise :class:`NonFinite`) or
    ``skip`` the step and count it."""

    def __post_init__(self) -> None:
        if self.task not in ("ctr", "pretrain"):
            raise ValueError(f"task must be ctr or pretrain, got {self.task!r}")
        if self.epochs < 1 or self.checkpoint_every < 0:
            raise ValueError("epochs must be >= 1 and checkpoint_every >= 0")


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


def every_batch(batches: Iterator) -> Iterator:
    """Every batch of every rank, with whether to score it: a rank that has run out repeats
    its last batch unscored while others finish (each forward of a sharded model is
    collective)."""
    last = None
    while True:
        batch = next(batches, None)
        last = batch if batch is not None else last
        if not dist.is_initialized():
            if batch is None:
                return
            yield batch, True
            continue
        flags = torch.tensor(
            [int(batch is not None), int(last is None)], device=collective_device()
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if not flags[0]:
            return  # every rank is done
        if flags[1]:
            # A rank has had no batch at all, so it cannot take part: stop every rank.
            log.warning("a rank has no evaluation data; evaluation stops at the shortest")
            return
        yield last, batch is not None


class Preempted(RuntimeError):
    """The run stopped on SIGTERM after saving a checkpoint; run it again to resume."""

    def __init__(self, step: int, path) -> None:
        super().__init__(
            f"preempted (SIGTERM) after step {step}: saved {path}; run again to resume"
        )
        self.step, self.path = step, path


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        dense_optimizer,
        schedule,
        train_loader,
        config: TrainConfig,
        optim: OptimConfig,
        valid_loader=None,
    ) -> None:
        self.model, self.dense, self.schedule = model, dense_optimizer, schedule
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.config, self.optim = config, optim
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        dense = next(iter(self.dense.params.values()), None)
        self.device = dense.device if dense is not None else torch.device("cpu")
        if self.device.type == "cpu":
            reuse_freed_memory()  # steps reuse the last step's pages (recsys.train.host)
        self.step = self.epoch = self.epoch_step = 0
        self.results: dict[str, float] = {}
        """The metrics of the last epoch that ended (what :meth:`train` returns)."""
        self.samples = 0
        """Rows this rank trained on since this process started (throughput; not saved)."""
        self.train_metrics = self._metrics()
        self.faults = Faults(config.run_dir, self.rank)
        self.checkpoints = CheckpointManager(
            f"{config.run_dir}/checkpoint", keep=config.keep, faults=self.faults
        )
        self._sigterm = False  # set by the SIGTERM handler while train() runs
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
                }
            ),
        }
        if with_rank_state:
            state[self._rank_key] = _blob(
                {
                    "loader": self.train_loader.state_dict(),
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
        return CTRMetrics() if self.config.task == "ctr" else PretrainMetrics(self.device)

    def _resume(self) -> int | None:
        """Load the latest usable checkpoint; the size of metrics.jsonl it saw (rank 0's,
        None when unknown)."""
        self.dense.init_state()  # AdamW's state is lazy: make room for the saved one
        loaded: dict[str, Any] = {}

        def state_for(path) -> dict[str, Any]:
            saved_ranks = {k for k in keys(path) if k.startswith("rank")}
            same_world = len(saved_ranks) == self.world_size
            loaded.clear()
            loaded.update(self.state(with_rank_state=same_world))
            return loaded

        path = self.checkpoints.load(state_for)
        shared = _unblob(loaded["trainer"])
        self.step, self.epoch = int(shared["step"]), int(shared["epoch"])
        self.epoch_step = int(shared["epoch_step"])
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

        On SIGTERM (preemption) every rank finishes its step, the job saves a checkpoint and
        :class:`Preempted` is raised; the next run resumes from it."""
        self._sigterm = False
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._train()
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self._sigterm = True

    def _preempted(self) -> bool:
        """Whether any rank got SIGTERM (all ranks agree, so they save together)."""
        flag = torch.tensor([int(self._sigterm)], device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _train(self) -> dict[str, float]:
        seed_everything(self.config.seed, self.rank)
        resumed, log_bytes = 0, None  # a run that starts over forgets earlier logs
        if self.config.resume and self.checkpoints.latest() is not None:
            log_bytes = self._resume()
            resumed = self.step
        # Steps run after the checkpoint by the interrupted run are logged again by this one:
        # the log forgets the earlier copies.
        self.log = RunLog(
            self.config.run_dir,
            main=self.rank == 0,
            total_steps=self.config.max_steps,
            config={"train": asdict(self.config), "optim": asdict(self.optim)},
            resumed_at=resumed,
            keep_bytes=log_bytes,
        )
        self.samples_log = (
            SampleLog(self.config.run_dir, self.rank, resumed)
            if self.config.record_samples
            else None
        )
        while self.epoch < self.config.epochs and not self._done():
            if not self._run_epoch():
                break  # max_steps reached inside the epoch: it is not over
            self.results = self._end_epoch()
            self._stop_if_preempted()
        if not self._saved_now():
            self.checkpoints.save(self.step, self.state())
        self._close_logs()
        return self.results

    def _saved_now(self) -> bool:
        latest = self.checkpoints.latest()
        return latest is not None and latest.name == f"step-{self.step:08d}"

    def _stop_if_preempted(self) -> None:
        """After a step or an epoch's end: if any rank got SIGTERM, save and stop."""
        if self._preempted():
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
        """Train through the rest of the current epoch; False if max_steps stopped it first."""
        self._set_epoch(self.epoch)
        length = self._epoch_length()
        for batch in self._aligned(self._batches()):
            self._train_step(batch)
            self.epoch_step += 1
            self.faults.after_step(self.step)
            if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                self.checkpoints.save(self.step, self.state())
            if length is not None and self.epoch_step >= length:
                return True  # every rank's share is done
            if self._done():
                return False
            self._stop_if_preempted()  # (at an epoch's end, after the epoch is ended)
        if length is not None and self.epoch_step < length:
            log.warning(
                "epoch %d ended after %d of %d steps: a rank's data ran out (rows of bad row "
                "groups skipped); the other ranks' last batches of the epoch were not trained",
                self.epoch,
                self.epoch_step,
                length,
            )
        return True

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

    def _train_step(self, batch) -> None:
        self.model.train()
        out = self._forward(batch)
        self.dense.zero_grad()
        out.loss.backward()  # the tables' optimizer runs inside backward
        norm = clip(self.model, self.optim)
        lr = self.schedule.get_last_lr()[0]  # the rate this step used
        self.dense.step()
        self.schedule.step()
        self.step += 1
        self.samples += len(batch)
        self._update(self.train_metrics, out, batch)
        values = {"loss": out.loss.item(), "lr": lr}
        if norm is not None:
            values["grad_norm"] = float(norm)
        self.log.record(self.step, "step", values)
        if self.samples_log is not None:
            self.samples_log.record(self.step, self.epoch, batch.row_ids.tolist())
        self.log.progress(self.step, values)

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
        for batch, scored in every_batch(_iterate(loader)):
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
            enabled=self.config.bf16 and (device.type == "cuda" or self.config.cpu_bf16),
        ):
            if self.config.task == "ctr" and batch.extra is not None:
                return self.model(batch.features, batch.labels, extra=batch.extra)
            if self.config.task == "ctr":
                return self.model(batch.features, batch.labels)
            return self.model(batch.features)

    def _update(self, metrics, out, batch) -> None:
        if self.config.task == "ctr":
            metrics.update(out.logits, batch.labels, batch.user_ids)
        else:
            metrics.update(out.loss, out.hits, out.targets)

    def _aligned(self, batches: Iterator) -> Iterator:
        """Batches while every rank still has one (collectives need all ranks each step)."""
        while True:
            batch = next(batches, None)
            if dist.is_initialized():
                has = torch.tensor(
                    [batch is not None], dtype=torch.int32, device=collective_device()
                )
                dist.all_reduce(has, op=dist.ReduceOp.MIN)
                if not has.item():
                    return
            elif batch is None:
                return
            yield batch

    def _set_epoch(self, epoch: int) -> None:
        dataset = getattr(self.train_loader, "dataset", None)
        if hasattr(dataset, "set_epoch") and dataset.epoch != epoch:
            dataset.set_epoch(epoch)

    def _done(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps
