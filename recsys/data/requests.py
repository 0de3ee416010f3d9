"""Requests to score: raw-key Parquet → chunks → the CTR model's batches, with a status each.

This module owns what ``predict`` reads (docs/serving.md, *Requests and predict*): finding
the request files and checking their columns before any work (:func:`open_requests`), the
chunk plan (one chunk per row group of one file, numbered in file order: the same for any
world size), reading one chunk, the rule for bad requests (:data:`STATUSES`, one status per
request) and encoding the scorable ones into the :class:`~recsys.data.batch.Batch` a CTR
model takes: raw keys mapped to dense ids by the vocabularies, side features looked up from
the item vocabulary, histories ordered by time when timestamps are given and cut to their
last ``max_len`` events as training cut them. It does not score, split work between ranks or
write anything (``recsys.stages.predict`` does).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.batch import ROW_ID, Batch, Columns, Layout, Lists, assemble, hash_ids
from recsys.data.schema import DataError, DatasetMeta, describe
from recsys.data.vocab import Vocabulary

REQUIRED = ("user_id", "history", "candidate")
"""Columns every request file has."""
TIMESTAMPS, LABEL = "history_timestamps", "label"
"""Optional columns: when a file has one, every file must."""

OK = "ok"
MISSING_VALUE = "missing_value"
BAD_TIMESTAMPS = "bad_timestamps"
EMPTY_HISTORY = "empty_history"
ALL_UNKNOWN = "all_unknown"
STATUSES = (OK, MISSING_VALUE, BAD_TIMESTAMPS, EMPTY_HISTORY, ALL_UNKNOWN)
"""A request's status, the first that applies in this order from the second on: a null
``user_id``, ``history`` or ``candidate``; ``history_timestamps`` null, of another length
than ``history`` or holding a null; an empty history; every id the model would read (the
last ``max_len`` history items and the candidate) unknown. Only ``ok`` requests are scored."""


@dataclass(frozen=True)
class Chunk:
    """One row group of one request file: the unit of work, of resuming and of writing."""

    index: int
    file: str
    row_group: int
    first_row: int
    """The request number of its first row (requests are numbered in file order from 0)."""
    rows: int


@dataclass(frozen=True)
class Requests:
    """The request files, checked, and their chunks."""

    files: tuple[str, ...]
    chunks: tuple[Chunk, ...]
    user_type: pa.DataType
    candidate_type: pa.DataType
    timestamps: bool
    labelled: bool

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    def digest(self) -> str:
        """What the predictions depend on in the files (names, sizes, row groups, schema)."""
        parts = []
        for file in self.files:
            meta = pq.ParquetFile(file).metadata
            groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            parts.append(f"{Path(file).name}:{Path(file).stat().st_size}:{groups}")
        parts.append(str(self.user_type) + str(self.candidate_type))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def output_schema(self) -> pa.Schema:
        """The predictions' columns: the request's number, its raw ids, score, status, label."""
        fields = [
            ("row", pa.int64()),
            ("user_id", self.user_type),
            ("candidate", self.candidate_type),
            ("score", pa.float32()),
            ("status", pa.string()),
        ]
        return pa.schema(fields + ([(LABEL, pa.int64())] if self.labelled else []))


def _family(kind: pa.DataType) -> str | None:
    if pa.types.is_integer(kind):
        return "integer"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    return None


def request_files(path: str | Path) -> list[Path]:
    """A Parquet file, or a directory's ``*.parquet`` files sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"--requests {path}: no such file or directory")
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise DataError(f"--requests {path}: a directory without *.parquet files")
    return files


def _check_columns(file: Path, schema: pa.Schema, keys: dict[str, pa.DataType]) -> None:
    """A DataError naming ``file`` and the column when one is missing or of a type that no
    key can be (``keys``: the key type each id column is looked up in)."""
    for column in REQUIRED:
        if column not in schema.names:
            raise DataError(
                f"{describe(str(file), column=column)}: missing; requests need columns "
                f"{', '.join(REQUIRED)} (docs/serving.md, Requests and predict)"
            )
    if _family(schema.field("user_id").type) is None:
        kind = schema.field("user_id").type
        raise DataError(f"{describe(str(file), column='user_id')}: {kind}, not integer or string")
    for column, key in keys.items():
        kind = schema.field(column).type
        if column == "history":
            if not pa.types.is_list(kind) and not pa.types.is_large_list(kind):
                raise DataError(f"{describe(str(file), column=column)}: {kind}, not a list")
            kind = kind.value_type
        if _family(kind) is None or _family(kind) != _family(key):
            raise DataError(
                f"{describe(str(file), column=column)}: {kind} keys, but the vocabulary's keys "
                f"are {key}"
            )
    if TIMESTAMPS in schema.names:
        kind = schema.field(TIMESTAMPS).type
        inner = kind.value_type if pa.types.is_list(kind) else None
        if inner is None or not (pa.types.is_integer(inner) or pa.types.is_timestamp(inner)):
            raise DataError(
                f"{describe(str(file), column=TIMESTAMPS)}: {kind}, not a list of integers or "
                "timestamps"
            )
    if LABEL in schema.names:
        kind = schema.field(LABEL).type
        if not (pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise DataError(f"{describe(str(file), column=LABEL)}: {kind}, not 0/1 integers")


def open_requests(path: str | Path, vocabularies: dict[str, Vocabulary]) -> Requests:
    """The request files at ``path``, every one's columns checked against the first's and
    item keys against the item vocabulary's key type (from the footers, before any work),
    and their chunks. Users are only grouped (gAUC), never looked up: any integer or string
    key will do."""
    files = request_files(path)
    item = vocabularies["item"]
    keys = {"history": item.keys.type, "candidate": item.keys.type}
    first: pa.Schema | None = None
    chunks: list[Chunk] = []
    row = 0
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{file}: not a readable Parquet file ({err})") from None
        schema = parquet.schema_arrow
        _check_columns(file, schema, keys)
        if first is None:
            first = schema
        for column in (*REQUIRED, TIMESTAMPS, LABEL):
            ours = schema.field(column).type if column in schema.names else None
            theirs = first.field(column).type if column in first.names else None
            if ours != theirs:
                raise DataError(
                    f"{describe(str(file), column=column)}: {ours or 'missing'}, but "
                    f"{files[0]} has {theirs or 'none'}; every request file needs the same "
                    "columns of the same types"
                )
        meta = parquet.metadata
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            chunks.append(Chunk(len(chunks), str(file), group, row, rows))
            row += rows
    assert first is not None
    if not row:
        raise DataError(f"--requests {path}: no requests (every file has 0 rows)")
    return Requests(
        tuple(str(f) for f in files),
        tuple(chunks),
        first.field("user_id").type,
        first.field("candidate").type,
        TIMESTAMPS in first.names,
        LABEL in first.names,
    )


def read_chunk(chunk: Chunk, requests: Requests) -> pa.Table:
    """The chunk's rows (its row group alone: memory holds one row group at a time)."""
    columns = [*REQUIRED]
    columns += [TIMESTAMPS] if requests.timestamps else []
    columns += [LABEL] if requests.labelled else []
    return pq.ParquetFile(chunk.file).read_row_group(chunk.row_group, columns=columns)


def model_meta(vocabularies: dict[str, Vocabulary]) -> DatasetMeta:
    """The ``ctr`` dataset a model with these vocabularies was trained on, as far as the
    model and its batches need it: the item table, each side feature's table, in the item
    vocabulary's order."""
    if "item" not in vocabularies:
        raise DataError("the vocabularies have no 'item' table")
    sides = list(vocabularies["item"].side)
    missing = [s for s in sides if s not in vocabularies]
    if missing:
        raise DataError(f"the item vocabulary has side features {missing} without a vocabulary")
    tables = {name: vocabularies[name].rows for name in ["item", *sides]}
    return DatasetMeta(kind="ctr", vocab=tables, side_features=sides)


def user_groups(users: pa.Array) -> np.ndarray:
    """A stable 62-bit group number per raw user key (gAUC groups by it): the same key gives
    the same number on every rank and run, integer or string keys alike."""
    if _family(users.type) == "integer":
        return hash_ids(np.asarray(users.fill_null(0).cast(pa.int64(), safe=False)), 2**62)
    unique = pc.unique(users.fill_null(""))
    numbers = np.array(
        [
            int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest()) >> 2
            for key in unique.to_pylist()
        ],
        dtype=np.int64,
    )
    codes = pc.index_in(users.fill_null(""), value_set=unique).to_numpy(zero_copy_only=False)
    return numbers[np.asarray(codes, dtype=np.int64)]


@dataclass
class Encoded:
    """A chunk's requests: each one's status and, for the scorable ones, their encoded rows."""

    status: np.ndarray
    """int8 per request: its index in :data:`STATUSES`."""
    scorable: np.ndarray
    """Indices (ascending) of the ``ok`` requests."""
    columns: Columns
    """Every request's ids as :func:`~recsys.data.batch.assemble` takes them."""
    labels: pa.Array | None
    unknown_candidate: int
    """Scored requests whose candidate is unknown."""
    unknown_history_ids: int
    """Unknown ids among the history items the model reads of the scored requests."""

    def batches(self, layout: Layout, max_len: int, size: int) -> list[tuple[Batch, int]]:
        """The scorable requests in batches of ``size`` and how many each holds."""
        out = []
        for start in range(0, len(self.scorable), size):
            rows = self.scorable[start : start + size]
            out.append((assemble([(self.columns, rows)], layout, max_len), len(rows)))
        return out


def _flat(lists: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Each row's list length (0 when null) and the values of every list, end to end."""
    lengths = np.asarray(pc.list_value_length(lists).fill_null(0), dtype=np.int64)
    return lengths, pc.list_flatten(lists)


def _time_order(ids: np.ndarray, lengths: np.ndarray, times: pa.Array, good: np.ndarray):
    """Put each ``good`` row's history ids (in place) in order of time; ties keep their
    order. On good rows, ``times`` has the same lengths as the history."""
    n = len(lengths)
    t_lengths, t_flat = _flat(times)
    row_of = np.repeat(np.arange(n), lengths)
    at = np.flatnonzero(good[row_of])
    if not len(at):
        return
    stamps = t_flat.cast(pa.int64()) if pa.types.is_timestamp(t_flat.type) else t_flat
    stamps = np.asarray(stamps.fill_null(0).cast(pa.int64()), dtype=np.int64)
    stamps = stamps[good[np.repeat(np.arange(n), t_lengths)]]
    order = np.lexsort((at, stamps, row_of[at]))
    ids[at] = ids[at][order]


def encode(
    table: pa.Table,
    chunk: Chunk,
    vocabularies: dict[str, Vocabulary],
    layout: Layout,
    max_len: int,
) -> Encoded:
    """Statuses and dense ids of a chunk's requests (raw keys → ids: unknown keys get each
    table's unknown id; side features from the item vocabulary)."""
    n = table.num_rows
    item = vocabularies["item"]
    users = table["user_id"].combine_chunks()
    candidates = table["candidate"].combine_chunks()
    history = table["history"].combine_chunks()
    missing = np.asarray(
        pc.or_(pc.or_(users.is_null(), candidates.is_null()), history.is_null()), dtype=bool
    )
    lengths, raw_history = _flat(history)
    ids = item.ids(raw_history)
    bad_times = np.zeros(n, dtype=bool)
    if TIMESTAMPS in table.column_names:
        times = table[TIMESTAMPS].combine_chunks()
        t_lengths, t_flat = _flat(times)
        nulls = np.bincount(
            np.repeat(np.arange(n), t_lengths),
            weights=np.asarray(t_flat.is_null(), dtype=np.float64),
            minlength=n,
        )
        bad_times = np.asarray(times.is_null(), dtype=bool) | (t_lengths != lengths) | (nulls > 0)
        _time_order(ids, lengths, times, ~missing & ~bad_times)
    candidate = item.ids(candidates)
    ends = np.cumsum(lengths)
    kept = np.minimum(lengths, max_len)
    unknown = np.concatenate([[0], np.cumsum(ids == item.unknown)])
    unknown_read = unknown[ends] - unknown[ends - kept]
    candidate_unknown = candidate == item.unknown
    status = np.select(
        [missing, bad_times, lengths == 0, (unknown_read == kept) & candidate_unknown],
        [STATUSES.index(s) for s in (MISSING_VALUE, BAD_TIMESTAMPS, EMPTY_HISTORY, ALL_UNKNOWN)],
        STATUSES.index(OK),
    ).astype(np.int8)
    ok = status == STATUSES.index(OK)
    labels = None
    if LABEL in table.column_names:
        labels = table[LABEL].combine_chunks().cast(pa.int64())
        values = np.asarray(labels.fill_null(0), dtype=np.int64)
        wrong = np.flatnonzero((values != 0) & (values != 1))
        if len(wrong):
            where = describe(chunk.file, row_group=chunk.row_group, row=int(wrong[0]), column=LABEL)
            raise DataError(f"{where}: {values[wrong[0]]}; a label is 0, 1 or null")
    columns = _columns(ids, lengths, candidate, users, labels, chunk, vocabularies, layout)
    return Encoded(
        status,
        np.flatnonzero(ok),
        columns,
        labels,
        int((candidate_unknown & ok).sum()),
        int(unknown_read[ok].sum()),
    )


def _side(ids: np.ndarray, item: Vocabulary, side: str) -> np.ndarray:
    """Each item id's ``side`` id: the item vocabulary's, the side's unknown id for the
    reserved items."""
    unknown = item.side_sizes[side]
    table = np.concatenate([np.asarray(item.side[side], np.int64), [unknown, unknown]])
    return table[ids]


def _columns(
    ids: np.ndarray,
    lengths: np.ndarray,
    candidate: np.ndarray,
    users: pa.Array,
    labels: pa.Array | None,
    chunk: Chunk,
    vocabularies: dict[str, Vocabulary],
    layout: Layout,
) -> Columns:
    """The requests as a decoded chunk of ``layout`` (the table's rows: candidate ids, user,
    request number, label, timestamp)."""
    item, n = vocabularies["item"], len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = {layout.lists[0]: ids}
    for column in layout.lists[1:]:
        values[column] = _side(ids, item, column[len("history_") : -len("_ids")])
    rows: dict[str, np.ndarray] = {"item_id": candidate, ROW_ID: chunk.first_row + np.arange(n)}
    for side in item.side:
        rows[f"{side}_id"] = _side(candidate, item, side)
    rows["user_id"] = user_groups(users)
    rows["label"] = np.zeros(n, np.int64) if labels is None else np.asarray(labels.fill_null(0))
    rows["timestamp"] = np.zeros(n, np.int64)
    table = np.stack([np.asarray(rows[name], dtype=np.int64) for name in layout.scalars])
    return Columns(Lists(offsets, values), table)


def placeholder(vocabularies: dict[str, Vocabulary], layout: Layout) -> Batch:
    """One request of unknown ids: the batch a rank without work runs (unscored) while the
    others score theirs (every forward of a sharded model is collective)."""
    item = vocabularies["item"]
    unknown = np.array([item.unknown], np.int64)
    chunk = Chunk(-1, "", 0, 0, 1)
    columns = _columns(unknown, np.ones(1, np.int64), unknown, pa.array([0]), None, chunk,
                       vocabularies, layout)  # fmt: skip
    return assemble([(columns, slice(0, 1))], layout, None)
