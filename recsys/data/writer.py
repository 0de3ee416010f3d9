"""Writing a dataset atomically: Parquet parts plus ``dataset.json``, all or nothing.

This module owns the on-disk layout converters and generators produce: ``part-NNNNN.parquet``
files of bounded size with row groups of a fixed number of rows, and the metadata file. Files
go to a temporary sibling directory that is renamed into place at the end, so a crash or an
error never leaves a half-written dataset behind. An output path that cannot become a
directory (a file, under a file, in a directory that takes no new entries) is refused before
any work (:func:`check_target`); an OS error while writing (a full disk) names the file it
was writing, as it would have been called in place.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data.schema import METADATA_FILE, DatasetMeta, arrow_schema, check_schema


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out`` to fill; renamed to ``out`` when the block succeeds,
    removed when it fails. An existing ``out`` is replaced only with ``overwrite``."""
    out = Path(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _permissions_from_umask(tmp)
        if out.exists():
            # Move the old output aside, the new one in, then delete the old: a crash between
            # the two renames leaves the old output intact in .NAME.old-*.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _in_place(err, tmp, out) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_target(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an output directory ``out`` that cannot be written: an existing one without
    ``overwrite``, an existing file, a path under a file, a directory where no entry can be
    made (read-only, no permission; found by making and removing an empty one)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(out))
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    ancestor = out.parent
    while not ancestor.exists():  # a path under a file does not exist either
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{ancestor} is not a directory", str(out))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.check-", dir=ancestor))
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        raise type(err)(err.errno, f"cannot create it in {ancestor}: {reason}", str(out)) from None


def _in_place(err: OSError, tmp: Path, out: Path) -> OSError:
    """``err`` naming the path a file under ``tmp`` would have had under ``out``."""
    name = err.filename
    if not isinstance(name, str) or not name.startswith(f"{tmp}{os.sep}"):
        return err
    return type(err)(err.errno, err.strerror, f"{out}{name[len(str(tmp)) :]}")


def naming(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` when it names no file (pyarrow's write errors do not)."""
    if err.filename is not None:
        return err
    reason = os.strerror(err.errno) if err.errno else str(err)
    return type(err)(err.errno, reason, str(path))


def _permissions_from_umask(directory: Path) -> None:
    """mkdtemp makes directories private (0700); a dataset gets the usual mode instead."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_dataset(
    out: str | os.PathLike,
    meta: DatasetMeta,
    tables: Iterable[pa.Table],
    *,
    rows_per_file: int = 1_000_000,
    row_group_rows: int = 65_536,
    overwrite: bool = False,
) -> DatasetMeta:
    """Write ``tables`` (in order) as the dataset ``out``; return the metadata written.

    ``meta.rows`` and ``meta.files`` are filled in from what was written.
    """
    schema = arrow_schema(meta)
    with atomic_directory(out, overwrite) as tmp:
        files: dict[str, int] = {}
        writer, name = None, ""
        try:
            for table in tables:
                check_schema(f"table written to {out}", table.schema, meta)
                table = table.select(schema.names).cast(schema)
                start = 0
                while start < table.num_rows:
                    if writer is None or files[name] >= rows_per_file:
                        if writer is not None:
                            writer.close()
                        name = f"part-{len(files):05d}.parquet"
                        writer = pq.ParquetWriter(tmp / name, schema)
                        files[name] = 0
                    chunk = table.slice(start, rows_per_file - files[name])
                    writer.write_table(chunk, row_group_size=row_group_rows)
                    files[name] += chunk.num_rows
                    start += chunk.num_rows
            if writer is not None:
                writer.close()
        except OSError as err:
            raise naming(err, tmp / name) from err
        meta = replace(meta, rows=sum(files.values()), files=files)
        (tmp / METADATA_FILE).write_text(meta.to_json() + "\n")
    return meta
