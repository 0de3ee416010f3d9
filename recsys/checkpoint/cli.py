"""``recsys checkpoint``: look inside DCP checkpoints offline, and export them to one file.

This module owns the command line of checkpoint inspection: ``ls`` lists what a checkpoint
holds (every tensor with its full shape and dtype, whatever plan saved it) and ``export``
writes it as one plain ``torch.save`` file. Both need no process group and accept a
checkpoint directory, a stage's ``weights/``, a stage directory or a run's ``checkpoint/``
directory (its latest complete checkpoint). Both verify the checkpoint's files first (sizes,
and checksums where it has a manifest), so a damaged file is named and nothing is listed or
written from it; ``export`` replaces an existing file only with ``--force``, and never writes
inside the checkpoint or the directory named (not even with ``--force``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def resolve(path: str | Path) -> Path:
    """The checkpoint ``path`` names (see the module doc), verified."""
    from recsys.checkpoint.manager import CheckpointError, CheckpointManager, verify

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not (path / ".metadata").exists():
        if (path / "weights" / ".metadata").exists():
            path = path / "weights"
        else:
            run = path / "checkpoint" if (path / "checkpoint").is_dir() else path
            latest = CheckpointManager(run).latest()
            if latest is None:
                raise CheckpointError(
                    f"{path}: neither a checkpoint (.metadata) nor a stage or run directory "
                    "holding one"
                )
            path = latest
    verify(path)
    return path


def listing(path: Path) -> list[tuple[str, str, str]]:
    """``(key, shape, dtype)`` of every tensor in the checkpoint, and the other entries."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    rows = []
    for key, info in sorted(metadata.state_dict_metadata.items()):
        if isinstance(info, TensorStorageMetadata):
            shape = "×".join(str(x) for x in info.size) or "scalar"
            rows.append((key, shape, str(info.properties.dtype).removeprefix("torch.")))
        else:
            rows.append((key, "–", "object"))
    return rows


def add_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "checkpoint", help="list or export DCP checkpoints (any plan, no process group)"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = p.add_parser(
        "ls",
        help="every tensor of a checkpoint with its full shape and dtype",
        description="PATH: a checkpoint, a stage's weights/, a stage or run directory "
        "(its latest checkpoint).",
    )
    ls.add_argument("path")
    ls.set_defaults(run=_run(_ls))
    export = p.add_parser(
        "export",
        help="write a checkpoint as one plain torch.save file (full tables)",
        description="PATH: a checkpoint, a stage's weights/, a stage or run directory "
        "(its latest checkpoint). The file loads with torch.load(OUT, weights_only=False).",
    )
    export.add_argument("path")
    export.add_argument("out")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(run=_run(_export))


def _run(action):
    """``action(path)`` on the checkpoint ``args.path`` names; a problem with the checkpoint
    or the arguments as one line and exit code 1 (an OSError, such as an OUT that cannot be
    written, goes to the guard of ``recsys.cli``: one line, exit code 2)."""

    def command(args: argparse.Namespace) -> int:
        action(resolve(args.path), args)  # a CheckpointError: one line (recsys.cli's guard)
        return 0

    return command


def _ls(path: Path, args: argparse.Namespace) -> None:
    rows = listing(path)
    width = max((len(k) for k, _, _ in rows), default=0)
    print(path)
    for key, shape, dtype in rows:
        print(f"  {key:<{width}}  {shape:>16}  {dtype}")


def _export(path: Path, args: argparse.Namespace) -> None:
    from recsys.checkpoint.manager import export
    from recsys.errors import UserError

    out = Path(args.out)
    target = out.resolve()
    # Never write into what is read: --force would replace one of the checkpoint's own files
    # (or a stage's or run's record), and the export would read a half-replaced checkpoint.
    for source in dict.fromkeys((path.resolve(), Path(args.path).resolve())):
        if target == source or source in target.parents:
            raise UserError(
                f"{out}: lies inside the source {source}, which an export must not overwrite; "
                "give an OUT outside it"
            )
    if out.exists() and not out.is_dir() and not args.force:
        raise UserError(f"{out}: exists already; pass --force to replace it")
    out = export(path, out)
    print(f"{path} → {out} ({out.stat().st_size:,} bytes)")
