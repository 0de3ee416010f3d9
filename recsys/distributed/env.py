"""Process-group set-up: world info from torchrun's environment, gloo on CPU, nccl on CUDA.

This module owns joining and leaving the default process group and describing the world a
process runs in. It does not launch processes (see ``launch``) nor shard models
(see ``planning``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    """Global rank, 0 ≤ rank < world_size."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank among the processes of this host; selects the CUDA device."""
    local_world_size: int
    """Number of processes on this host."""
    backend: str
    """Collective backend of the default process group: ``gloo`` or ``nccl``."""
    device: torch.device
    """Device this rank computes on."""

    @property
    def is_main(self) -> bool:
        """True on the rank that writes logs, reports and files shared by the job."""
        return self.rank == 0


def default_backend(device_type: str) -> str:
    """The collective backend for a device type: nccl for CUDA, gloo otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def collective_device() -> torch.device:
    """Where tensors handed to this job's collectives must live: the rank's CUDA device under
    nccl (which takes no CPU tensors), the CPU otherwise."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def summed_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank of the job (collective; itself in a world of one),
    on ``tensor``'s device."""
    if not dist.is_initialized():
        return tensor
    local = tensor.to(collective_device())
    dist.all_reduce(local)
    return local.to(tensor.device)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} must be an integer (set by torchrun)"
        ) from None


@contextmanager
def distributed(device_type: str | None = None) -> Iterator[DistEnv]:
    """Join the default process group for the body of a ``with`` block, then leave it.

    World info comes from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without them the process runs alone as a
    world of size 1. ``device_type`` defaults to ``cuda`` when a CUDA device is present. If
    the default group already exists, it is described and left open at the end.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    backend = default_backend(device_type)
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    owns_group = not dist.is_initialized()
    if not owns_group:
        # Joined already (by the caller): the group, not the environment, is the truth.
        rank, world_size, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    store_dir = None
    if owns_group:
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        elif world_size == 1:
            # A lone process needs no rendezvous address: a file store in a private directory.
            store_dir = tempfile.TemporaryDirectory(prefix="recsys-pg-")
            init_method = f"file://{os.path.join(store_dir.name, 'store')}"
            dist.init_process_group(backend=backend, init_method=init_method, rank=0, world_size=1)
        else:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun "
                "(or `torchx run`), which sets the rendezvous variables"
            )
    try:
        yield DistEnv(rank, world_size, local_rank, local_world_size, backend, device)
    finally:
        if owns_group:
            dist.destroy_process_group()
        if store_dir is not None:
            store_dir.cleanup()
