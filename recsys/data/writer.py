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
    with atomic_directory(out, overwrite) as tmp:
        parts = PartWriter(
            tmp, meta, rows_per_file=rows_per_file, row_group_rows=row_group_rows, where=out
        )
        for table in tables:
            parts.write(table)
        return parts.close()


class PartWriter:
    """One dataset written table by table into ``directory`` (already the temporary
    directory of an :func:`atomic_directory`): part files of at most ``rows_per_file`` rows,
    then ``dataset.json`` on :meth:`close`.

    Without ``buffer`` each table is written as it comes (its row groups never span two
    tables); with ``buffer`` small tables are gathered until ``row_group_rows`` rows, so a
    generator writing many small blocks still gets full row groups (memory: one row group).
    """

    def __init__(
        self,
        directory: Path,
        meta: DatasetMeta,
        *,
        rows_per_file: int = 1_000_000,
        row_group_rows: int = 65_536,
        buffer: bool = False,
        where: str | os.PathLike | None = None,
    ) -> None:
        self.directory, self.meta = Path(directory), meta
        self.where = where or directory  # what messages call the dataset
        self.rows_per_file, self.row_group_rows, self.buffer = rows_per_file, row_group_rows, buffer
        self.schema = arrow_schema(meta)
        self.files: dict[str, int] = {}
        self._writer: pq.ParquetWriter | None = None
        self._name = ""
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    @property
    def rows(self) -> int:
        """Rows written or buffered so far."""
        return sum(self.files.values()) + self._pending_rows

    def write(self, table: pa.Table) -> None:
        """Append ``table``'s rows (checked against the dataset's schema)."""
        check_schema(f"table written to {self.where}", table.schema, self.meta)
        table = table.select(self.schema.names).cast(self.schema)
        if not self.buffer:
            self._write(table)
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_rows:
            self._flush(whole_groups=True)

    def close(self, protocol: dict | None = None) -> DatasetMeta:
        """Write what is buffered, close the last file and write ``dataset.json`` (with
        ``protocol`` when given: counts known only at the end); return the metadata."""
        self._flush(whole_groups=False)
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        except OSError as err:
            raise naming(err, self.directory / self._name) from err
        meta = replace(self.meta, rows=sum(self.files.values()), files=dict(self.files))
        if protocol is not None:
            meta = replace(meta, protocol=protocol)
        (self.directory / METADATA_FILE).write_text(meta.to_json() + "\n")
        return meta

    def _flush(self, whole_groups: bool) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        keep = table.num_rows % self.row_group_rows if whole_groups else 0
        self._write(table.slice(0, table.num_rows - keep))
        rest = table.slice(table.num_rows - keep)
        self._pending = [rest] if keep else []
        self._pending_rows = keep

    def _write(self, table: pa.Table) -> None:
        start = 0
        try:
            while start < table.num_rows:
                if self._writer is None or self.files[self._name] >= self.rows_per_file:
                    if self._writer is not None:
                        self._writer.close()
                    self._name = f"part-{len(self.files):05d}.parquet"
                    self._writer = pq.ParquetWriter(self.directory / self._name, self.schema)
                    self.files[self._name] = 0
                chunk = table.slice(start, self.rows_per_file - self.files[self._name])
                self._writer.write_table(chunk, row_group_size=self.row_group_rows)
                self.files[self._name] += chunk.num_rows
                start += chunk.num_rows
        except OSError as err:
            raise naming(err, self.directory / self._name) from err
