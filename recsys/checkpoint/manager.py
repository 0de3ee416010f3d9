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

It also owns what every DCP directory of this project (checkpoints and a stage's
``weights/``) goes through on disk: writing with a full disk reported as one error on every
rank (:func:`write`), the checksums of ``manifest.json`` recorded after a save
(:func:`record`, format in ``manifest``) and verified before a load, the ranks splitting the
reading (:func:`check`), and reading with every DCP failure named by file (:func:`read`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from recsys.checkpoint import manifest
from recsys.errors import UserError, describe_os_error

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_DIR = re.compile(r"^\.step-(\d{8})\.tmp$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory or file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, by rank, on every rank."""
    if not _distributed():
        return [value]
    values: list[Any] = [None] * _world_size()
    dist.all_gather_object(values, value)
    return values


def agree(error: str | None) -> str | None:
    """The first error of any rank (by rank) on every rank, so that all take the same branch."""
    return next((e for e in _gather(error) if e), None)


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
        every rank calls it. A failure (a full disk) is the same CheckpointError on every rank
        and leaves the previous checkpoints as they were."""
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".step-{step:08d}.tmp"
        self._clear_stale()
        try:
            write(state, tmp, f"{self.directory}: cannot save the checkpoint of step {step}")
            if self.faults is not None:
                self.faults.in_save(step)
            _barrier()  # every rank's shards are written
            error = record(tmp)
            if error is None and _rank() == 0:
                error = self._complete(tmp, final)
            error = _from_rank0(error)  # every rank learns of rank 0's failure, none waits
            if error:
                raise CheckpointError(error)
        except CheckpointError:
            if _rank() == 0:  # give the space back now; the next save would clear it anyway
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("checkpoint saved: %s", final)
        return final

    def _clear_stale(self) -> None:
        """Create the directory and remove every ``.step-*.tmp`` left by a save that crashed
        or failed (any step: a run resumed from an older checkpoint never saves those steps
        again), so that an earlier full disk does not fill it again (rank 0; collective)."""
        error = None
        if _rank() == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for stale in self.directory.iterdir():
                    if TMP_DIR.match(stale.name):
                        shutil.rmtree(stale)
                        log.info("removed %s, left by an unfinished save", stale)
            except OSError as err:
                error = f"{self.directory}: cannot prepare a save: {describe_os_error(err)}"
        error = _from_rank0(error)
        if error:
            raise CheckpointError(error)

    def _complete(self, tmp: Path, final: Path) -> str | None:
        """Rename the written checkpoint into place and prune old ones (rank 0); the error."""
        try:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old)
        except OSError as err:
            return f"{final}: cannot complete the checkpoint: {describe_os_error(err)}"
        return None

    def load(
        self,
        state: dict[str, Any] | Callable[[Path], dict[str, Any]],
        path: str | Path | None = None,
    ) -> Path:
        """Load a checkpoint into ``state`` in place (resharding as needed).

        ``state`` may be a function of the checkpoint's path that returns the state to load
        into (for callers whose layout depends on what the checkpoint holds). ``path`` None
        means the latest complete checkpoint, falling back to older ones when it is damaged
        (a file missing, truncated or whose checksum differs) or cannot be read; an explicit
        path that cannot be read is an error.
        """
        # Rank 0's view of the directory decides, and every check is agreed on by all ranks:
        # ranks must never load different checkpoints.
        if path is not None:
            candidates = [Path(path)]
        else:
            candidates = _from_rank0(list(reversed(self.complete())))
            if not candidates:
                raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        errors = []
        for candidate in candidates:
            try:
                check(candidate)  # collective: the same verdict on every rank
                target = state(candidate) if callable(state) else state
                read(target, candidate)  # collective: fails on every rank or none
            except CheckpointError as err:
                error = str(err)
            else:
                if errors:
                    log.warning("resumed from %s instead of the newest checkpoint", candidate)
                    self._set_aside([c for c in candidates if c.name > candidate.name])
                return candidate
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


def write(state: dict[str, Any], directory: Path, what: str) -> None:
    """``dcp.save`` of ``state`` into ``directory`` (every rank calls it). An OS error on any
    rank (a full disk, a read-only directory) becomes ``CheckpointError("<what>: <reason>")``
    on every rank: DCP gathers each rank's failure before it raises, so none is left waiting.
    :func:`record` writes the new manifest afterwards."""
    _drop_manifest(directory)
    try:
        dcp.save(state, checkpoint_id=str(directory))
    # DCP reports a writer's failure as CheckpointException, a BaseException.
    except (CheckpointException, OSError) as err:
        cause = _os_error(err)
        if cause is not None:
            raise CheckpointError(f"{what}: {describe_os_error(cause)}") from err
        if isinstance(err, CheckpointException):  # raised on every rank: they agree here
            # torch.save's zip writer reports a short write on a full disk as a RuntimeError
            # ("unexpected pos"), not as the OSError behind it: rank 0 looks at the disk.
            free = _free_bytes(directory) if _rank() == 0 else None
            full = free is not None and free < FULL_DISK
            message = _from_rank0(
                f"{what}: no space left on device ({free:,} bytes free on the disk that holds "
                f"{directory})"
                if full
                else None
            )
            if message:
                raise CheckpointError(message) from err
        raise


FULL_DISK = 64 * 1024**2
"""A disk with less free space than this after a failed save is taken to be why it failed."""


def _free_bytes(directory: Path) -> int | None:
    """Free bytes on the disk that holds ``directory`` (None: it cannot be asked)."""
    for path in (directory, *directory.parents):
        try:
            return shutil.disk_usage(path).free
        except OSError:
            continue
    return None


def _drop_manifest(directory: Path) -> None:
    """Remove the manifest of files saved into ``directory`` before (a stage's ``weights/``
    saved again), so that a save that stops half-way leaves files that cannot be checked
    rather than files that fail their checks (rank 0; collective)."""
    error = None
    if _rank() == 0:
        try:
            manifest.remove(directory)
        except OSError as err:
            error = f"{directory}: cannot remove the old {manifest.MANIFEST}: "
            error += describe_os_error(err)
    error = _from_rank0(error)
    if error:
        raise CheckpointError(error)


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err``: itself, the first rank's failure of a CheckpointException,
    or what either was raised from."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        failures = getattr(err, "failures", None)  # CheckpointException: rank → (error, stack)
        if failures:
            for _, wrapped in sorted(failures.items()):
                found = _os_error(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
                if found is not None:
                    return found
        err = err.__cause__ or err.__context__
    return None


def record(directory: Path) -> str | None:
    """Write ``directory``'s manifest after a DCP save into it (every rank calls it): each
    rank checksums the files it wrote, rank 0 writes them all down. The error, if any, is
    returned on every rank."""
    mine: dict[str, manifest.Entry] = {}
    error = None
    try:
        mine = manifest.describe(directory, manifest.written_by(directory, _rank()))
    except OSError as err:
        error = f"{directory}: cannot checksum the files written: {describe_os_error(err)}"
    gathered = _gather((mine, error))
    error = next((e for _, e in gathered if e), None)
    if error is None and _rank() == 0:
        files = {name: entry for part, _ in gathered for name, entry in part.items()}
        try:
            manifest.write(directory, files)
        except OSError as err:
            error = f"{directory}: cannot write {manifest.MANIFEST}: {describe_os_error(err)}"
    return _from_rank0(error)


def check(path: str | Path) -> None:
    """:func:`verify` on every rank, each checksumming its share of the files; every rank
    raises the same CheckpointError (the first rank's problem) or none."""
    error = None
    try:
        verify(path, _rank(), _world_size())
    except CheckpointError as err:
        error = str(err)
    error = agree(error)
    if error:
        raise CheckpointError(error)


def read(state: dict[str, Any], path: str | Path) -> None:
    """``dcp.load`` of ``path`` into ``state`` (every rank calls it); any failure becomes a
    CheckpointError naming the file when the error does."""
    path = Path(path)
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
    return {key.split(".", 1)[0] for key in _metadata(Path(path)).state_dict_metadata}


def verify(path: str | Path, rank: int = 0, world_size: int = 1) -> None:
    """Check a checkpoint's files, naming the first that is damaged: every file its metadata
    refers to is there and long enough (a truncated or lost file is the common damage), and
    every file of its manifest has its recorded size and, for this rank's share of them when
    ``world_size`` ranks split the reading, its checksum. Without a manifest (written by an
    older version) only the sizes are checked, and a warning says so."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no .metadata file)")
    files = _manifest(path, warn=rank == 0)
    if files is not None and ".metadata" in files:
        # Checked before it is parsed, so that damage to it is named as such.
        _raise_if(manifest.checksum_problems(path, files, [".metadata"]))
    _check_sizes(path)
    if files is not None:
        for name, entry in sorted(files.items()):
            _raise_if(manifest.size_problem(path, name, entry))
        data = {name: entry for name, entry in files.items() if name != ".metadata"}
        _raise_if(manifest.checksum_problems(path, files, manifest.share(data, rank, world_size)))


def _manifest(path: Path, warn: bool) -> dict[str, manifest.Entry] | None:
    try:
        files = manifest.read(path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if files is None and warn:
        log.warning(
            "%s: no %s (written by an older version): the files' checksums cannot be "
            "checked, only their sizes",
            path,
            manifest.MANIFEST,
        )
    return files


def _metadata(path: Path) -> Any:
    """The DCP metadata of ``path``; any failure to read it is a CheckpointError naming it."""
    try:
        return FileSystemReader(str(path)).read_metadata()
    # Unpickling damaged bytes raises nearly anything (UnpicklingError, EOFError, KeyError).
    except Exception as err:
        raise CheckpointError(f"{path / '.metadata'}: cannot be read ({err})") from err


def _raise_if(problem: str | None) -> None:
    if problem:
        raise CheckpointError(problem)


def _check_sizes(path: Path) -> None:
    """Every file the DCP metadata refers to is there and long enough."""
    metadata = _metadata(path)
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
    names = sorted(path.iterdir()) if path.is_dir() else []
    return next((candidate for candidate in names if candidate.name in text), path)


def export(path: str | Path, out: str | Path) -> Path:
    """A checkpoint as one plain ``torch.save`` file (full tables, no sharding), for
    inspection or for tools that know nothing of DCP. ``out`` is replaced atomically: it is
    the previous file or the complete new one, never a part. A problem with ``out`` (a
    directory, under a file, read-only, a full disk) is an OSError naming it."""
    path, out = Path(path), Path(out)
    _make_parent(out)
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        # A Python file: torch.save's own file writer reports a failed write as a
        # RuntimeError without its reason; through this one it is an OSError with its errno.
        with open(tmp, "wb") as stream:
            dcp_to_torch_save(str(path), stream)  # type: ignore[arg-type]
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _naming(err, out) from err
    # Reading goes through DCP, which reports its failures as CheckpointException (a
    # BaseException); writing is to a Python file, whose failures are OSErrors.
    except (CheckpointException, Exception) as err:
        tmp.unlink(missing_ok=True)
        broken = _broken_file(path, err)
        raise CheckpointError(
            f"{broken}: cannot be read ({type(err).__name__}: {_first_line(err)})"
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _make_parent(out: Path) -> None:
    """Create ``out``'s directory; a file in the way is named as not a directory."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            break
    out.parent.mkdir(parents=True, exist_ok=True)


def _naming(err: OSError, out: Path) -> OSError:
    """``err`` about ``out`` (not the temporary file, nor no file at all)."""
    if err.errno is None:
        return err
    return type(err)(err.errno, err.strerror or os.strerror(err.errno), str(out))
