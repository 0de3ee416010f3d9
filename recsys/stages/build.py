"""Building what a stage trains: its datasets checked, its model placed on the job's ranks,
its optimizers and loaders.

This module owns turning config sections into running objects: the datasets ``data`` names
(of the kind the stage reads, ``data.valid`` with ``data.train``'s vocabularies), the
sharding plan from ``plan`` (TorchRec's planner, or a plan file), the optimizers from
``optim`` (with the schedule's length filled in from the data when the config leaves it
out), a stateful loader from ``data``, and the trainer from ``run``. The models themselves
are built by ``recsys.models.build``.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from recsys.data import vocab
from recsys.data.files import open_dataset
from recsys.data.schema import DatasetMeta
from recsys.data.stream import ParquetStream, StreamConfig
from recsys.distributed.env import DistEnv, collective_device
from recsys.distributed.planning import planned, table_weights
from recsys.distributed.wrap import shard
from recsys.plan import measure, planfile, process
from recsys.stages.common import StageError
from recsys.stages.config import DataSection, ModelSection, PlanSection, StageConfig
from recsys.train import compiling
from recsys.train.optim import OptimConfig, attach_sparse_optimizer, dense_optimizer
from recsys.train.trainer import Trainer


def dataset_meta(path: str, kind: str, key: str) -> DatasetMeta:
    """The metadata of the dataset ``path`` (config key ``key``), which must be of ``kind``
    and have the vocabulary files its ``dataset.json`` references."""
    if not path:
        raise StageError(f"{key} is not set: give the {kind} dataset to read")
    meta = open_dataset(path).meta
    if meta.kind != kind:
        raise StageError(f"{key}={path} is a {meta.kind!r} dataset; this stage needs {kind!r}")
    vocab.files(path, meta)  # the raw keys a stage carries are there, before any training
    return meta


def valid_meta(path: str, kind: str, train: DatasetMeta, train_path: str) -> DatasetMeta:
    """The metadata of ``data.valid``, which must have ``data.train``'s vocabularies (an id
    past a table's end would be clamped silently, and the metrics recorded wrong)."""
    meta = dataset_meta(path, kind, "data.valid")
    if meta.vocab != train.vocab:
        raise StageError(
            f"data.valid={path} has vocabularies {meta.vocab}, but data.train={train_path} "
            f"has {train.vocab}: ids would mean other items; give a validation set made "
            "with the training set"
        )
    return meta


def same_as_trained(data: str, meta: DatasetMeta, train: str, kind: str) -> None:
    """A StageError unless ``meta`` (of ``--data``, scored by a finished stage) has the
    vocabularies of the ``kind`` dataset ``train`` that stage was trained on."""
    trained = dataset_meta(train, kind, "data.train")
    if trained.vocab != meta.vocab:
        raise StageError(
            f"--data {data} has vocabularies {meta.vocab}, but the model was trained "
            f"with {trained.vocab}: ids would mean other items"
        )


def training_meta(data: DataSection, kind: str) -> DatasetMeta:
    """The metadata of ``data.train`` (a ``kind`` dataset), with ``data.valid`` checked
    against it when given."""
    meta = dataset_meta(data.train, kind, "data.train")
    if data.valid:
        valid_meta(data.valid, kind, meta, data.train)
    return meta


def place(model: nn.Module, plan: PlanSection, env: DistEnv, optim: OptimConfig | None = None):
    """``model`` sharded over the job under TorchRec's plan (or the plan file
    ``plan.file``, checked against the model and job); with ``optim``, the table optimizer
    fused into backward (trainable tables only)."""
    if optim is not None:
        attach_sparse_optimizer(model, optim)
    if plan.file:
        chosen = planfile.sharding_plan(planfile.read(plan.file), model, env, plan.file)
    else:
        tables = table_weights(model)
        types = {t: v for t, v in plan.sharding_types.items() if t in tables}
        chosen = planned(
            model,
            world_size=env.world_size,
            local_world_size=env.local_world_size,
            device_type=env.device.type,
            sharding_types=types,
        )
    if env.device.type == "cpu":  # tables in host memory: a clear error, not an OOM kill
        _check_host_memory(model, chosen, env, optim)
    return shard(model, chosen, env)


def _check_host_memory(model: nn.Module, plan, env: DistEnv, optim: OptimConfig | None) -> None:
    """Stop every rank with one line (``TableTooLarge``) when this host's ranks' shards of
    ``plan``, their fused optimizer state (with ``optim``) and runtime exceed the host's
    available memory; agreed over the job, so that no rank goes on alone."""
    tables = table_weights(model)
    frozen = set(model.sparse.config.frozen)
    first = env.rank - env.local_rank  # this host's ranks: first .. first + local_world_size
    need = env.local_world_size * process.RUNTIME_BYTES
    for module_plan in plan.plan.values():
        for name, sharding in module_plan.items():
            element = tables[name].element_size()
            trainable = optim is not None and name not in frozen
            for shard_ in sharding.sharding_spec.shards:
                if first <= shard_.placement.rank() < first + env.local_world_size:
                    rows, cols = shard_.shard_sizes
                    need += rows * cols * element
                    if trainable:
                        need += planfile.optimizer_bytes(rows, cols, 4, optim.sparse)
    # int8 frozen tables hold their blocks since the model was built: MemAvailable counts them.
    error = None
    try:
        measure.check_host_fits(need, env.local_world_size)
    except measure.TableTooLarge as err:
        error = err
    failed = torch.tensor([int(error is not None)])
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise error or measure.TableTooLarge(
            "another host of this job cannot place its ranks' tables in its available memory; "
            "its log names the bytes"
        )


def sharding(sharded: nn.Module) -> dict[str, dict]:
    """How the sharded model's tables are placed, by table name (for ``stage.json``)."""
    return {
        table: {
            "sharding_type": p.sharding_type,
            "compute_kernel": p.compute_kernel,
            "ranks": list(p.ranks or []),
        }
        for module in sharded.plan.plan.values()
        for table, p in sorted(module.items())
    }


def loader(
    path: str,
    data: DataSection,
    model: ModelSection,
    seed: int,
    *,
    train: bool,
    conditions: bool = False,
    whole: bool = False,
) -> StatefulDataLoader:
    """Batches of ``path``, sequences cut to their last ``model.max_len`` events (``whole``:
    kept whole, for a stage that reads more of a history than the model does)."""
    stream = ParquetStream(
        path,
        StreamConfig(
            batch_size=data.batch_size,
            max_len=None if whole else model.max_len,
            shuffle=data.shuffle and train,
            seed=seed,
            skip_bad_row_groups=data.skip_bad_row_groups,
            conditions=conditions,
        ),
    )
    return StatefulDataLoader(
        stream,
        batch_size=None,
        num_workers=data.workers,
        worker_init_fn=ignore_sigterm if data.workers else None,
    )


def ignore_sigterm(worker_id: int) -> None:
    """In a loader worker: leave SIGTERM to the training process. A scheduler stopping a job
    signals all of its processes; a worker that died of it would make the trainer's next
    batch fail before the trainer could save its checkpoint (workers exit with their parent
    anyway)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def steps_per_epoch(train_loader: StatefulDataLoader) -> int:
    """Training steps in an epoch: the fewest batches any rank has (the trainer's rule)."""
    batches = torch.tensor(
        [train_loader.dataset.batches_in_epoch(0, train_loader.num_workers)],
        device=collective_device(),
    )
    if dist.is_initialized():
        dist.all_reduce(batches, op=dist.ReduceOp.MIN)
    return int(batches)


def run_steps(config: StageConfig, steps_per_epoch: int) -> int:
    """Training steps of the run: ``run.epochs`` × ``steps_per_epoch``, or ``run.max_steps``
    if fewer."""
    total = config.run.epochs * steps_per_epoch
    if config.run.max_steps is not None:
        total = min(total, config.run.max_steps)
    return max(1, total)


def optim_config(config: StageConfig, steps_per_epoch: int) -> OptimConfig:
    """The ``optim`` section, the schedule's lengths it leaves unset fitted to the run
    (:func:`run_steps`)."""
    return config.optim.fitted(run_steps(config, steps_per_epoch))


def sharded_with_optimizers(model: nn.Module, optim: OptimConfig, plan: PlanSection, env: DistEnv):
    """``model`` sharded with its fused table optimizer, and its dense optimizer (AdamW) and
    schedule: what training starts from (nothing is trained here)."""
    sharded = place(model, plan, env, optim)
    dense, schedule = dense_optimizer(sharded, optim)
    return sharded, dense, schedule


def trainer(
    model: nn.Module,
    train,
    valid,
    config: StageConfig,
    env: DistEnv,
    run_dir: str,
    task: str,
) -> tuple[nn.Module, Trainer]:
    """``model`` sharded with its optimizers (schedule fitted to ``train``) and the
    :class:`Trainer` of a training stage, set up by the config's ``run`` section."""
    per_epoch = steps_per_epoch(train)
    steps, optim = run_steps(config, per_epoch), optim_config(config, per_epoch)
    sharded, dense, schedule = sharded_with_optimizers(model, optim, config.plan, env)
    if compiling.wanted(config.run.compile, env.device, steps):
        compiling.compile_towers(sharded)
    loop = Trainer(
        sharded, dense, schedule, train, config.run, optim, valid, run_dir=run_dir, task=task
    )
    return sharded, loop
