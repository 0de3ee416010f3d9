"""Run a function on several local ranks in-process, the way torchrun would.

This module owns launching a Python callable on ``world_size`` processes of this host through
``torch.distributed.launcher.elastic_launch`` (the pattern of TorchRec's golden-training test),
collecting each rank's return value, and reporting a failed rank with its traceback. The
callable joins the process group itself (``recsys.distributed.env.distributed``).
"""

from __future__ import annotations

import glob
import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """A rank launched by :func:`run_on_ranks` raised or died."""


def _child_env(threads_per_rank: int) -> dict[str, str]:
    return {
        # Each rank gets its share of the cores; oversubscription slows gloo collectives badly.
        "OMP_NUM_THREADS": str(threads_per_rank),
        # Sharing the rendezvous TCP store between agent and workers made gloo rendezvous
        # flaky on these hosts; a store of their own is reliable.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }


def run_on_ranks(
    fn: Callable[..., T],
    *args: Any,
    world_size: int = 2,
    threads_per_rank: int | None = None,
    quiet: bool = False,
) -> list[T]:
    """Run ``fn(*args)`` on ``world_size`` new processes of this host; return their results.

    ``fn`` and ``args`` must be picklable (a module-level function): workers are spawned.
    Results are ordered by rank. A failing rank raises :class:`RankFailedError` carrying the
    rank's own traceback. ``quiet`` keeps the ranks' output off the console; on failure its
    last lines are added to the error.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    log_dir = tempfile.TemporaryDirectory(prefix="recsys-ranks-") if quiet else None
    logs = DefaultLogsSpecs(log_dir=log_dir.name, redirects=Std.ALL) if log_dir else None
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        logs_specs=logs,
    )
    child_env = _child_env(threads_per_rank)
    saved = {key: os.environ.get(key) for key in child_env}
    os.environ.update(child_env)
    try:
        results = elastic_launch(config, _call)(fn, *args)
    except ChildFailedError as err:
        name = getattr(fn, "__qualname__", repr(fn))
        raise RankFailedError(
            _describe_failure(err, name, log_dir.name if log_dir else None)
        ) from err
    finally:
        if log_dir is not None:
            log_dir.cleanup()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [results[rank] for rank in range(world_size)]


@record  # writes the rank's traceback where the launcher can report it
def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def _describe_failure(err: ChildFailedError, name: str, log_dir: str | None) -> str:
    lines = [f"{len(err.failures)} rank(s) failed running {name}:"]
    for rank, failure in sorted(err.failures.items()):
        message = failure.message
        if isinstance(message, dict):
            # The error file written by @record: the traceback, or failing that the message.
            extra = message.get("extraInfo") or {}
            message = extra.get("py_callstack") or message.get("message", message)
        lines.append(f"--- rank {rank} (exit code {failure.exitcode}) ---\n{message}")
        if log_dir is not None:
            for path in glob.glob(
                os.path.join(log_dir, "**", str(failure.local_rank), "stderr.log"), recursive=True
            ):
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-30:]
                lines.append(f"--- rank {rank} stderr (last lines) ---\n{''.join(tail)}")
    return "\n".join(lines)
