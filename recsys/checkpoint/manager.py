"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, kept K deep, resharding.

This module owns the checkpoint directory of a run::

    checkpoint/
      step-00000100/     a complete checkpoint (DCP files + .metadata)
      step-00000200/
      .step-00000300.tmp being written; renamed when every rank has finished

Every rank writes its shards into the temporary directory; when all have finished, rank 0
renames it, so a crash during a save leaves the previous checkpoint as the latest complete
one. The last ``keep`` checkpoints are kept. Loading goes through DCP, which reshards: a
checkpoint saved on 2 ranks with one plan loads on 1 rank or under another plan. Loading
"latest" falls back to the previous checkpoint when the newest cannot be read, and says so.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from recsys.distributed.env import collective_device
from recsys.errors import UserError

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory or file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True only if every rank says True (so that all ranks take the same branch)."""
    if not _distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CheckpointManager:
    """Saves and loads the checkpoints of one run directory."""

    def __init__(self, directory: str | Path, keep: int = 3, faults: Any = None) -> None:
        """``faults``: a ``recsys.train.faults.Faults`` whose ``save`` faults fire in saves."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.faults = faults

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[-1] if complete else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (values: ``Stateful`` objects or state dicts) as step ``step``;
        every rank calls it."""
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".step-{step:08d}.tmp"
        if _rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash during an earlier save of this step
                shutil.rmtree(tmp)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        if self.faults is not None:
            self.faults.in_save(step)
        _barrier()  # every rank's shards are written
        error = None
        if _rank() == 0:
            try:
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                for old in self.complete()[: -self.keep]:
                    shutil.rmtree(old)
            except OSError as err:
                error = f"{final}: cannot complete the checkpoint: {err}"
        error = _from_rank0(error)  # every rank learns of rank 0's failure, none waits
        if error:
            raise CheckpointError(error)
        log.info("checkpoint saved: %s", final)
        return final

    def load(
        self,
        state: dict[str, Any] | Callable[[Path], dict[str, Any]],
        path: str | Path | None = None,
    ) -> Path:
        """Load a checkpoint into ``state`` in place (resharding as needed).

        ``state`` may be a function of the checkpoint's path that returns the state to load
        into (for callers whose layout depends on what the checkpoint holds). ``path`` None
        means the latest complete checkpoint, falling back to older ones when it cannot be
        read; an explicit path that cannot be read is an error.
        """
        # Rank 0's view of the directory decides, and a candidate is used only if every rank
        # could read it: ranks must never load different checkpoints.
        if path is not None:
            candidates = [Path(path)]
        else:
            candidates = _from_rank0(list(reversed(self.complete())))
            if not candidates:
                raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        errors = []
        for candidate in candidates:
            error = None
            try:
                verify(candidate)  # each rank checks the files it can see
            except CheckpointError as err:
                error = str(err)
            if _all_ok(error is None):
                try:
                    target = state(candidate) if callable(state) else state
                    self._read(target, candidate)  # collective: fails on every rank or none
                except CheckpointError as err:
                    error = str(err)
                else:
                    if errors:
                        log.warning("resumed from %s instead of the newest checkpoint", candidate)
                        self._set_aside([c for c in candidates if c.name > candidate.name])
                    return candidate
            error = error or f"{candidate}: another rank could not read it"
            if path is not None:
                raise CheckpointError(error)
            errors.append(error)
            log.warning("%s; trying the previous checkpoint", error)
        raise CheckpointError("no checkpoint could be read:\n" + "\n".join(errors))

    def _set_aside(self, broken: list[Path]) -> None:
        """Rename unreadable checkpoints newer than the one resumed from, so that they are
        neither "latest" again nor kept in place of good ones by pruning."""
        if _rank() == 0:
            for path in broken:
                if path.exists():
                    path.rename(path.with_name(f".{path.name}.broken"))
                    log.warning("set aside unreadable checkpoint %s", path)
        _barrier()

    @staticmethod
    def _read(state: dict[str, Any], path: Path) -> None:
        try:
            dcp.load(state, checkpoint_id=str(path))
        # DCP reports reader failures as CheckpointException, a BaseException; the storage
        # layer may raise plain errors too.
        except (CheckpointException, Exception) as err:
            broken = _broken_file(path, err)
            raise CheckpointError(
                f"{broken}: cannot be read ({type(err).__name__}: {_first_line(err)})"
            ) from err


def keys(path: str | Path) -> set[str]:
    """The top-level keys a checkpoint holds (``model``, ``dense``, ``rank0``, ...)."""
    metadata = FileSystemReader(str(path)).read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


def verify(path: str | Path) -> None:
    """Check that every file the checkpoint's metadata refers to is there and long enough,
    naming the first that is not (a truncated or lost file is the common damage)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no .metadata file)")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"{path / '.metadata'}: cannot be read ({err})") from err
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(
            needed.get(info.relative_path, 0), info.offset + info.length
        )
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if file.stat().st_size < size:
            raise CheckpointError(
                f"{file}: truncated ({file.stat().st_size} bytes, the "
                f"checkpoint's metadata needs {size})"
            )


def _first_line(err: BaseException) -> str:
    failures = getattr(err, "failures", None)  # CheckpointException: rank → (error, stack)
    if failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return f"rank {rank}: {type(inner).__name__}: {_first_line(inner)}"
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _broken_file(path: Path, err: BaseException) -> Path:
    """The checkpoint file an error is about, when its message names one."""
    text = str(err)
    for candidate in sorted(path.iterdir()):
        if candidate.name in text:
            return candidate
    return path


def export(path: str | Path, out: str | Path) -> Path:
    """A checkpoint as one plain ``torch.save`` file (full tables, no sharding), for
    inspection or for tools that know nothing of DCP."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(str(path), str(out))
    return out
