"""The two dataset schemas (``seq`` and ``ctr``), their ``dataset.json`` metadata, and checks.

This module owns what a recsys dataset is: the columns of each kind and their Arrow types,
the metadata file written beside the Parquet files, and the schema-level validation done when
a dataset is opened (a ``dataset.json`` that is not JSON or holds a key of the wrong type, a
missing column, a column of the wrong type). Value-level checks (nulls, id ranges, labels,
list lengths) are ``checks``, run on every decoded chunk by ``batch``. The layout is
documented in docs/data.md.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

import pyarrow as pa

from recsys.errors import UserError

KINDS = ("seq", "ctr")
ID_MODES = ("remap", "hash")
METADATA_FILE = "dataset.json"
FORMAT_VERSION = 1


class DataError(UserError, ValueError):
    """Input data is not what recsys expects; the message names where and what."""


def describe(
    path: str, *, row_group: int | None = None, row: int | None = None, column: str | None = None
) -> str:
    """'file X, row group G, row R, column C' for error messages."""
    parts = [f"{path}"]
    if row_group is not None:
        parts.append(f"row group {row_group}")
    if row is not None:
        parts.append(f"row {row}")
    if column is not None:
        parts.append(f"column {column!r}")
    return ", ".join(parts)


@dataclass
class DatasetMeta:
    """The content of ``dataset.json``: what the Parquet files beside it hold."""

    kind: str
    """``seq`` (behaviour sequences for pretraining) or ``ctr`` (labelled samples)."""
    vocab: dict[str, int]
    """Table size (rows) per feature: ids lie in [0, size) in remap mode. Always has
    ``item`` and one entry per side feature; ``user`` (number of users) when known."""
    side_features: list[str] = field(default_factory=list)
    """Per-event features aligned with the items, e.g. ``["category"]``."""
    conditions: list[str] = field(default_factory=list)
    """Per-event condition features aligned with the items (LUM's condition tokens, e.g.
    ``["liked"]``): lists in ``seq`` and in ``ctr`` histories, no candidate column; read only
    by streams that ask for them (``StreamConfig.conditions``)."""
    id_mode: str = "remap"
    """``remap``: ids are dense in [0, vocab); ``hash``: raw 64-bit ids, hashed into the
    table size when batches are made."""
    rows: int = 0
    """Rows across all files."""
    files: dict[str, int] = field(default_factory=dict)
    """Rows per Parquet file, by file name."""
    has_timestamps: bool = False
    """``seq`` only: whether the ``timestamps`` column is present."""
    protocol: dict[str, Any] = field(default_factory=dict)
    """How the data was produced: converter, source files, parameters, counts."""
    vocabularies: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Raw keys of each table's ids (``recsys.data.vocab``), by table: ``file`` (Parquet,
    relative to this dataset), ``keys`` (known keys: ids ``[0, keys)``), ``unknown`` and
    ``padding`` (the reserved ids after them; ``vocab`` counts them). Empty: the ids have
    no recorded raw keys (hash mode, or data written by hand)."""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise DataError(f"dataset kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.vocab, dict) or not all(isinstance(k, str) for k in self.vocab):
            raise DataError(f"vocab must map feature names to table sizes, got {self.vocab!r}")
        _names("side_features", self.side_features)
        _names("conditions", self.conditions)
        if not isinstance(self.id_mode, str) or self.id_mode not in ID_MODES:
            raise DataError(f"id_mode must be one of {ID_MODES}, got {self.id_mode!r}")
        _count("rows", self.rows)
        if not isinstance(self.files, dict):
            raise DataError(f"files must map file names to row counts, got {self.files!r}")
        for name, rows in self.files.items():
            _count(f"files[{name!r}]", rows)
        if not isinstance(self.has_timestamps, bool):
            raise DataError(f"has_timestamps must be true or false, got {self.has_timestamps!r}")
        if not isinstance(self.protocol, dict):
            raise DataError(f"protocol must be a JSON object, got {self.protocol!r}")
        if not _integer(self.format_version):
            raise DataError(f"format_version must be an integer, got {self.format_version!r}")
        clash = sorted(set(self.conditions) & {"item", *self.side_features})
        if clash:
            raise DataError(f"conditions {clash} are also item features")
        needed = ["item", *self.side_features, *self.conditions]
        missing = [f for f in needed if f not in self.vocab]
        if missing:
            raise DataError(f"vocab has no size for features {missing}")
        small = {f: n for f, n in self.vocab.items() if not _integer(n) or n < 1}
        if small:
            raise DataError(f"vocab sizes must be positive integers: {small}")
        self._check_vocabularies()

    def _check_vocabularies(self) -> None:
        if not isinstance(self.vocabularies, dict):
            raise DataError(f"vocabularies must be a JSON object, got {self.vocabularies!r}")
        for name, entry in self.vocabularies.items():
            where = f"vocabularies[{name!r}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise DataError(f"{where} must be an object with a 'file', got {entry!r}")
            keys = entry.get("keys")
            if not _integer(keys) or keys < 1:
                raise DataError(f"{where}['keys'] must be an integer >= 1, got {keys!r}")
            if name == "user":
                continue
            expected = {"unknown": keys, "padding": keys + 1}
            if {k: entry.get(k) for k in expected} != expected:
                raise DataError(f"{where}: reserved ids must be {expected}, got {entry!r}")
            if self.vocab.get(name) != keys + 2:
                raise DataError(
                    f"{where}: {keys} keys and 2 reserved ids, but vocab[{name!r}] is "
                    f"{self.vocab.get(name)!r} (should be {keys + 2})"
                )

    def keys(self, table: str) -> int:
        """Ids of ``table`` that stand for keys, ``[0, keys)``: the table's rows less its
        reserved ones (negatives are drawn among them)."""
        entry = self.vocabularies.get(table)
        return int(entry["keys"]) if entry else self.vocab[table]

    def to_json(self) -> str:
        fields = asdict(self)
        if not self.vocabularies:  # data without raw keys reads as it did before they existed
            del fields["vocabularies"]
        return json.dumps(fields, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> DatasetMeta:
        """The metadata in ``text`` (the content of ``source``, UTF-8 when bytes)."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{source}: not UTF-8 text ({err.reason} at byte {err.start})"
                ) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION or not _integer(version):
            raise DataError(
                f"{source}: format_version {version!r} is not supported "
                f"(this recsys reads {FORMAT_VERSION})"
            )
        fields = cls.__dataclass_fields__
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise DataError(f"{source}: unknown keys {unknown}")
        required = sorted(k for k, f in fields.items() if f.default is f.default_factory is MISSING)
        missing = [k for k in required if k not in raw]
        if missing:
            raise DataError(f"{source}: missing keys {missing}")
        try:
            return cls(**raw)
        except DataError as err:
            raise DataError(f"{source}: {err}") from None


def _integer(value: Any) -> bool:
    """Whether ``value`` is a JSON integer (``true`` is not one, though Python's bool is)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _count(key: str, value: Any) -> None:
    if not _integer(value) or value < 0:
        raise DataError(f"{key} must be a row count (an integer >= 0), got {value!r}")


def _names(key: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise DataError(f"{key} must be a list of feature names, got {value!r}")


def columns(meta: DatasetMeta) -> dict[str, pa.DataType]:
    """The required columns of a dataset and their Arrow types."""
    ids = pa.list_(pa.int64())
    if meta.kind == "seq":
        cols = {"user_id": pa.int64(), "item_ids": ids}
        cols.update({f"{side}_ids": ids for side in meta.side_features})
        cols.update({f"{name}_ids": ids for name in meta.conditions})
        if meta.has_timestamps:
            cols["timestamps"] = ids
        return cols
    cols = {"user_id": pa.int64(), "history_item_ids": ids}
    cols.update({f"history_{side}_ids": ids for side in meta.side_features})
    cols.update({f"history_{name}_ids": ids for name in meta.conditions})
    cols["item_id"] = pa.int64()
    cols.update({f"{side}_id": pa.int64() for side in meta.side_features})
    cols["label"] = pa.int64()
    cols["timestamp"] = pa.int64()
    return cols


def arrow_schema(meta: DatasetMeta) -> pa.Schema:
    """The schema writers use for ``meta``'s kind and features."""
    return pa.schema([pa.field(name, kind) for name, kind in columns(meta).items()])


def _compatible(found: pa.DataType, expected: pa.DataType) -> bool:
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        return (pa.types.is_list(found) or pa.types.is_large_list(found)) and _compatible(
            found.value_type, expected.value_type
        )
    if pa.types.is_int64(expected):
        return pa.types.is_integer(found)
    return found == expected


def schema_problems(schema: pa.Schema, meta: DatasetMeta) -> list[tuple[str, str]]:
    """``(column, problem)`` for every required column ``schema`` lacks or holds with a type
    that cannot serve ``meta``.

    Integer columns of any width are accepted (they are widened to int64 when read);
    anything else must match exactly.
    """
    problems = []
    for name, expected in columns(meta).items():
        index = schema.get_field_index(name)
        if index < 0:
            problems.append(
                (name, f"missing; a {meta.kind} dataset needs columns {list(columns(meta))}")
            )
            continue
        found = schema.field(index).type
        if not _compatible(found, expected):
            problems.append((name, f"type {found}, expected {expected}"))
    return problems


def check_schema(path: str, schema: pa.Schema, meta: DatasetMeta) -> None:
    """Raise :class:`DataError` naming the file and column of the first of
    :func:`schema_problems`."""
    for column, problem in schema_problems(schema, meta):
        raise DataError(f"{describe(path, column=column)}: {problem}")


def list_columns(meta: DatasetMeta, conditions: bool = False) -> dict[str, str]:
    """Aligned list columns → the vocab (table) their ids index; item list first, then side
    features, then (``conditions``) the condition features."""
    prefix = "" if meta.kind == "seq" else "history_"
    cols = {f"{prefix}item_ids": "item"}
    cols.update({f"{prefix}{side}_ids": side for side in meta.side_features})
    if conditions:
        cols.update({f"{prefix}{name}_ids": name for name in meta.conditions})
    if meta.kind == "seq" and meta.has_timestamps:
        cols["timestamps"] = ""
    return cols


def scalar_columns(meta: DatasetMeta) -> dict[str, str]:
    """Scalar columns → the vocab their ids index ('' for columns that are not ids)."""
    cols = {"user_id": ""}
    if meta.kind == "ctr":
        cols["item_id"] = "item"
        cols.update({f"{side}_id": side for side in meta.side_features})
        cols["label"] = ""
        cols["timestamp"] = ""
    return cols
