"""Opening a dataset: resolve paths or URIs, read ``dataset.json`` and every file's footer.

This module owns finding the Parquet files of a dataset on any filesystem pyarrow supports
(local paths, ``file://``, ``s3://``, ``gs://``, ``hdfs://`` ...), reading their footers (row
groups and their sizes, and the bounds of each column chunk that the footer records), and
rejecting, before any training starts, what cannot be read: a
path that does not exist, an empty or corrupt file, a file whose schema does not fit the
dataset, files with different schemas. It reads no rows.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recsys.data.schema import METADATA_FILE, DataError, DatasetMeta, check_schema, columns


@dataclass(frozen=True)
class ParquetPart:
    """One Parquet file of a dataset and the sizes of its row groups."""

    path: str
    row_groups: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


@dataclass(frozen=True)
class Dataset:
    """An opened dataset: its metadata, filesystem and files, checked but not read."""

    meta: DatasetMeta
    filesystem: pafs.FileSystem
    parts: tuple[ParquetPart, ...]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def open_file(self, part: ParquetPart) -> pq.ParquetFile:
        """The part's reader; local files are memory-mapped (pages decoded straight from the
        page cache, no copy through read buffers: about 7% faster streaming)."""
        if isinstance(self.filesystem, pafs.LocalFileSystem):
            return pq.ParquetFile(pa.memory_map(part.path))
        return pq.ParquetFile(self.filesystem.open_input_file(part.path))


def _leaves(kind: pa.DataType) -> int:
    """Parquet leaf columns an Arrow type is stored in."""
    if pa.types.is_struct(kind):
        return sum(_leaves(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_map(kind):
        return _leaves(kind.key_type) + _leaves(kind.item_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaves(kind.value_type)
    return 1


def column_bounds(metadata: pq.FileMetaData, row_group: int) -> dict[str, tuple[int, int]]:
    """Smallest and largest value of each int64 column (list columns: of their values) in one
    row group, where the footer's statistics record them (pyarrow, Spark and DuckDB write
    them by default); columns without statistics are left out. The stream skips its scan of
    a column whose recorded bounds already satisfy the schema (as engines skip row groups by
    the same statistics when they filter).

    Leaves are matched to top-level columns by position (each column's leaves are stored
    together, in schema order), never by their dotted paths: a column may have dots in its
    name. Columns of several leaves are left out."""
    group = metadata.row_group(row_group)
    bounds = {}
    leaf = 0
    for field in metadata.schema.to_arrow_schema():
        count = _leaves(field.type)
        first, leaf = leaf, leaf + count
        if count != 1 or first >= group.num_columns:
            continue
        chunk = group.column(first)
        stats = chunk.statistics
        if (
            stats is None
            or not stats.has_min_max
            or chunk.physical_type != "INT64"
            or str(stats.logical_type) not in ("None", "Int(bitWidth=64, isSigned=true)")
        ):
            continue
        bounds[field.name] = (int(stats.min), int(stats.max))
    if leaf != group.num_columns:  # the Arrow schema does not account for every leaf
        return {}
    return bounds


def _resolve(source: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(source)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), posixpath.abspath(source)


def dataset_directory(source: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and directory of a dataset given as its directory or one of its files
    (a local path or a URI): where its ``dataset.json`` and relative references start."""
    fs, path = _resolve(source)
    if fs.get_file_info(path).type == pafs.FileType.File:
        path = posixpath.dirname(path)
    return fs, path


def _info(fs: pafs.FileSystem, path: str, source: str) -> pafs.FileInfo:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{source}: no such file or directory")
    return info


def read_meta(fs: pafs.FileSystem, directory: str) -> DatasetMeta:
    """The ``dataset.json`` of ``directory``."""
    path = posixpath.join(directory, METADATA_FILE)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DataError(
            f"{path}: missing; every dataset directory holds a {METADATA_FILE} "
            "(written by `recsys data ...`; see docs/data.md)"
        )
    with fs.open_input_stream(path) as f:
        return DatasetMeta.from_json(f.read(), path)


def open_dataset(source: str | Sequence[str], meta: DatasetMeta | None = None) -> Dataset:
    """Open a dataset directory, or a list of its Parquet files, on any pyarrow filesystem.

    Without ``meta``, the ``dataset.json`` of the directory (or of the first file's
    directory) is read.
    """
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise DataError("no dataset files given")
    paths: list[tuple[str, str]] = []  # (path on the filesystem, what the user wrote)
    fs: pafs.FileSystem | None = None
    directory = None
    whole_directory = False
    for src in sources:
        src_fs, path = _resolve(str(src))
        fs = fs or src_fs
        info = _info(src_fs, path, str(src))
        if info.type == pafs.FileType.Directory:
            directory, whole_directory = directory or path, True
            listing = fs.get_file_info(pafs.FileSelector(path, recursive=False))
            files = sorted(
                i.path
                for i in listing
                if i.type == pafs.FileType.File and i.path.endswith(".parquet")
            )
            if not files:
                raise DataError(f"{src}: no .parquet files in this directory")
            paths += [(f, f) for f in files]
        else:
            directory = directory or posixpath.dirname(path)
            paths.append((path, str(src)))
    assert fs is not None and directory is not None
    listed = meta is None  # the files must agree with the dataset.json they come with
    meta = meta or read_meta(fs, directory)
    parts = []
    reference: tuple[str, pa.Schema] | None = None
    for path, shown in paths:
        try:
            metadata = pq.ParquetFile(fs.open_input_file(path)).metadata
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(
                f"{shown}: not a readable Parquet file (empty, truncated or corrupt): {err}"
            ) from None
        schema = metadata.schema.to_arrow_schema()
        check_schema(shown, schema, meta)
        if reference is None:
            reference = (shown, schema)
        else:
            _same_schema(reference, (shown, schema), meta)
        rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        parts.append(ParquetPart(path, rows))
    if listed and meta.files:
        _check_listed(meta, parts, whole_directory)
    return Dataset(meta, fs, tuple(parts))


def _check_listed(meta: DatasetMeta, parts: list[ParquetPart], whole_directory: bool) -> None:
    """Files and row counts must be the ones dataset.json lists (a stray or lost part file
    would otherwise be read twice or missed without a word)."""
    found = {posixpath.basename(p.path): p for p in parts}
    extra = sorted(set(found) - set(meta.files))
    if extra:
        raise DataError(
            f"{METADATA_FILE} does not list {extra}, found beside it; it lists {sorted(meta.files)}"
        )
    missing = sorted(set(meta.files) - set(found))
    if whole_directory and missing:
        raise DataError(f"{METADATA_FILE} lists {missing}, which are missing")
    for name, part in found.items():
        if part.rows != meta.files[name]:
            raise DataError(
                f"{part.path}: {part.rows} rows, but {METADATA_FILE} says {meta.files[name]}"
            )


def _same_schema(
    first: tuple[str, pa.Schema], other: tuple[str, pa.Schema], meta: DatasetMeta
) -> None:
    for name in columns(meta):
        a, b = first[1].field(name).type, other[1].field(name).type
        if a != b:
            raise DataError(
                f"files of one dataset have different schemas: column {name!r} is "
                f"{a} in {first[0]} but {b} in {other[0]}"
            )
