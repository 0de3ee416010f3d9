"""``recsys data inspect``: what a dataset holds, and (``--check``) everything wrong with it.

This module owns the summary of a dataset: kind, id mode, files, rows and row groups, the
Parquet schema, vocabulary sizes, the protocol that produced it, and the distribution of
sequence lengths (read from the item-list column alone). It also owns the validator,
:func:`check`: every row group of every file read and put through the stream's own checks
(``recsys.data.batch.decode`` with :mod:`recsys.data.checks`), collecting every problem
instead of stopping at the first, with the first few of each column kept (:class:`Findings`).
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recsys.data import checks
from recsys.data.batch import Layout, decode
from recsys.data.files import Dataset, ParquetPart, open_dataset, read_meta
from recsys.data.schema import (
    DataError,
    DatasetMeta,
    describe,
    list_columns,
    scalar_columns,
    schema_problems,
)

CHECK_CHUNK_ROWS = 65_536
"""Rows decoded at a time by :func:`check`."""
SHOWN_PER_COLUMN = 20
"""Problems of each column (and of files and row groups) that :func:`check` keeps; the rest
are counted."""


def summarise(source: str) -> dict:
    """The summary of the dataset at ``source`` (directory, file or URI)."""
    dataset = open_dataset(source)
    meta = dataset.meta
    item_column = next(iter(list_columns(meta)))
    lengths = []
    schema = None
    for part in dataset.parts:
        file = dataset.open_file(part)
        schema = schema or file.schema_arrow
        for group in range(len(part.row_groups)):
            column = file.read_row_group(group, columns=[item_column]).column(0)
            for chunk in column.chunks:
                offsets = np.asarray(chunk.offsets, dtype=np.int64)
                lengths.append(np.diff(offsets))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    top = int(lengths.max()) + 1 if len(lengths) else 1
    edges = [0] + [2**k for k in range(top.bit_length() + 1)]
    bins = [e for e in edges if e < top] + [top]
    counts, _ = np.histogram(lengths, bins=bins)
    return {
        "kind": meta.kind,
        "id_mode": meta.id_mode,
        "files": {p.path: {"rows": p.rows, "row_groups": len(p.row_groups)} for p in dataset.parts},
        "rows": dataset.rows,
        "vocab": meta.vocab,
        "side_features": meta.side_features,
        "schema": {field.name: str(field.type) for field in schema} if schema else {},
        "protocol": meta.protocol,
        "lengths": {
            "column": item_column,
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "percentiles": {
                f"p{q}": int(np.percentile(lengths, q)) if len(lengths) else 0 for q in (50, 90, 99)
            },
            "max": int(lengths.max()) if len(lengths) else 0,
            "histogram": {
                f"{lo}-{hi - 1}" if hi - 1 > lo else f"{lo}": int(c)
                for lo, hi, c in zip(bins[:-1], bins[1:], counts, strict=True)
                if c
            },
        },
    }


def render(summary: dict) -> str:
    """The summary as text."""
    lines = [
        f"kind {summary['kind']}, id mode {summary['id_mode']}, {summary['rows']:,} rows "
        f"in {len(summary['files'])} file(s)"
    ]
    for path, info in summary["files"].items():
        lines.append(f"  {path}: {info['rows']:,} rows, {info['row_groups']} row group(s)")
    lines.append("schema")
    lines += [f"  {name:<24} {kind}" for name, kind in summary["schema"].items()]
    lines.append("vocab sizes")
    lines += [f"  {name:<24} {size:,}" for name, size in summary["vocab"].items()]
    stats = summary["lengths"]
    lines.append(
        f"lengths of {stats['column']}: mean {stats['mean']:.1f}, "
        + ", ".join(f"{k} {v}" for k, v in stats["percentiles"].items())
        + f", max {stats['max']}"
    )
    peak = max(stats["histogram"].values(), default=1)
    for label, count in stats["histogram"].items():
        lines.append(f"  {label:>10} {count:>10,} {'#' * max(1, round(40 * count / peak))}")
    if summary["protocol"]:
        lines.append("protocol")
        lines += [f"  {k}: {v}" for k, v in summary["protocol"].items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class Problem:
    """One thing the stream would refuse: a value, a row group, a file or the whole dataset
    (where it is known: file, row group, row and column; ``line`` says it all)."""

    line: str
    file: str | None = None
    row_group: int | None = None
    row: int | None = None
    column: str | None = None


@dataclass
class Findings:
    """What :func:`check` found: the first ``limit`` problems of each column (and of files
    and row groups), the rest counted, and how much was read."""

    limit: int = SHOWN_PER_COLUMN
    problems: list[Problem] = field(default_factory=list)
    not_shown: Counter = field(default_factory=Counter)
    """Problems beyond ``limit``, by column ('' for files and row groups)."""
    rows: int = 0
    row_groups: int = 0

    def room(self, column: str | None) -> int:
        """How many more problems of ``column`` are kept."""
        shown = sum(p.column == column for p in self.problems)
        return max(self.limit - shown, 0)

    def add(self, problem: Problem) -> None:
        if self.room(problem.column):
            self.problems.append(problem)
        else:
            self.not_shown[problem.column or ""] += 1

    def report(self, path: str, row_group: int, first: int) -> checks.Report:
        """A report of bad values in rows from ``first`` of a row group: every one recorded."""

        def record(bad: checks.Bad) -> None:
            total, room = bad.count(), self.room(bad.column)
            for i in bad.positions(room) if room else []:
                row = first + bad.row_of(i)
                where = describe(path, row_group=row_group, row=row, column=bad.column)
                self.problems.append(
                    Problem(f"{where}: {bad.what(i)}", path, row_group, row, bad.column)
                )
            if total > room:
                self.not_shown[bad.column] += total - room

        return record

    def count(self) -> int:
        return len(self.problems) + sum(self.not_shown.values())

    def in_order(self) -> list[Problem]:
        """The problems kept, in file order, then by row group and row (the dataset's own
        first); within a row, in column order."""
        files = {p.file: i for i, p in reversed(list(enumerate(self.problems)))}

        def key(p: Problem) -> tuple[int, int, int]:
            at = -1 if p.file is None else files[p.file]
            return (at, -1 if p.row_group is None else p.row_group, -1 if p.row is None else p.row)

        return sorted(self.problems, key=key)

    def as_dict(self) -> dict:
        return {
            "ok": not self.count(),
            "rows": self.rows,
            "row_groups": self.row_groups,
            "problems": self.count(),
            "shown": [asdict(p) for p in self.in_order()],
            "not_shown": dict(self.not_shown),
        }


def check(source: str, limit: int = SHOWN_PER_COLUMN) -> Findings:
    """Every problem of the dataset at ``source`` that the stream would refuse, each value
    checked (footer statistics are not trusted to spare a scan). A ``dataset.json`` that
    cannot be read, or a source with no Parquet file, raises its :class:`DataError`."""
    findings = Findings(limit)
    dataset = _open_checked(source, findings)
    meta = dataset.meta
    layout = Layout.of(meta, conditions=True)
    first_row_id = 0
    for part in dataset.parts:
        try:
            file = dataset.open_file(part)
        except (OSError, pa.ArrowException) as err:
            findings.add(Problem(f"{part.path}: cannot be opened: {err}", part.path))
            continue
        for group, rows in enumerate(part.row_groups):
            _check_row_group(file, part.path, group, rows, first_row_id, meta, layout, findings)
            findings.rows += rows
            findings.row_groups += 1
            first_row_id += rows
    return findings


def _check_row_group(
    file: pq.ParquetFile,
    path: str,
    group: int,
    rows: int,
    first_row_id: int,
    meta: DatasetMeta,
    layout: Layout,
    findings: Findings,
) -> None:
    """Decode and check one row group chunk by chunk, its problems added to ``findings``."""
    columns = [*layout.lists, *scalar_columns(meta)]
    read = 0
    try:
        for batch in file.iter_batches(
            batch_size=CHECK_CHUNK_ROWS, row_groups=[group], columns=columns
        ):

            def locate(row: int, column: str, first: int = read) -> str:
                return describe(path, row_group=group, row=first + row, column=column)

            report = findings.report(path, group, read)
            decode(batch, meta, first_row_id + read, locate, True, columns=columns, report=report)
            read += batch.num_rows
    except (OSError, pa.ArrowException) as err:
        findings.add(Problem(checks.unreadable(path, group, err), path, group))
        return
    if read != rows:
        where = describe(path, row_group=group)
        findings.add(Problem(f"{where}: {read} rows, but its footer says {rows}", path, group))


def _open_checked(source: str, findings: Findings) -> Dataset:
    """The dataset at ``source`` with every file that can be read on its own. What makes the
    stream refuse the dataset when it opens it (a file it cannot read, columns missing or of
    the wrong type, files that disagree with each other or with ``dataset.json``) goes to
    ``findings``, for every file."""
    try:
        return open_dataset(source)
    except DataError as err:
        refusal = err
    fs, directory, files = _files(source)
    if not files:
        raise refusal
    meta = read_meta(fs, directory)  # the dataset.json of the stream's refusal raises here
    parts: list[ParquetPart] = []
    good: list[str] = []
    for name in files:
        try:
            parts += open_dataset([name], meta).parts
            good.append(name)
        except DataError as err:
            for problem in _file_problems(fs, name, meta, err):
                findings.add(problem)
    if len(good) == len(files):
        findings.add(Problem(str(refusal)))  # the files disagree with each other, or the json
    elif good:
        try:
            open_dataset(good)  # what the readable files alone would be refused for
        except DataError as err:
            findings.add(Problem(str(err)))
    return Dataset(meta, fs, tuple(parts))


def _files(source: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """The filesystem of ``source``, its dataset directory, and its Parquet files as sources
    (local paths as the stream names them; other filesystems' as URIs)."""
    try:
        fs, path = pafs.FileSystem.from_uri(source)
    except (pa.ArrowInvalid, ValueError):
        fs, path = pafs.LocalFileSystem(), posixpath.abspath(source)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return fs, posixpath.dirname(path), [source] if info.type == pafs.FileType.File else []
    local = isinstance(fs, pafs.LocalFileSystem)
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(
        i.path for i in listing if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
    files = [n if local else posixpath.join(source, posixpath.basename(n)) for n in names]
    return fs, path, files


def _file_problems(
    fs: pafs.FileSystem, name: str, meta: DatasetMeta, error: DataError
) -> list[Problem]:
    """Every missing or mistyped column of file ``name``, or ``error`` when its footer
    cannot be read."""
    try:
        _, path = (fs, name) if isinstance(fs, pafs.LocalFileSystem) else fs.from_uri(name)
        schema = pq.ParquetFile(fs.open_input_file(path)).schema_arrow
    except (OSError, pa.ArrowException, ValueError):
        return [Problem(str(error), name)]
    found = schema_problems(schema, meta)
    if not found:
        return [Problem(str(error), name)]
    return [
        Problem(f"{describe(name, column=column)}: {what}", name, column=column)
        for column, what in found
    ]


def render_check(findings: Findings, source: str) -> str:
    """What :func:`check` found, as text: one line per problem kept, one per column of
    problems not shown, and a last line, ``ok: ...`` when there are none."""
    checked = f"{findings.rows:,} rows in {findings.row_groups:,} row groups checked"
    if not findings.count():
        return f"ok: {checked}"
    lines = [p.line for p in findings.in_order()]
    for column, count in findings.not_shown.items():
        what = f"in column {column!r}" if column else "of files and row groups"
        lines.append(f"... and {count:,} more {what} (first {findings.limit} shown)")
    count = findings.count()
    lines.append(f"error: {source}: {count:,} problem{'s' * (count != 1)}; {checked}")
    return "\n".join(lines)
