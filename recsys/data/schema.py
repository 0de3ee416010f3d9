"""The two dataset schemas (``seq`` and ``ctr``), their ``dataset.json`` metadata, and checks.

This module owns what a recsys dataset is: the columns of each kind and their Arrow types,
the metadata file written beside the Parquet files, and the schema-level validation done when
a dataset is opened (missing column, wrong type, files with different schemas). Value-level
checks (nulls, id ranges, labels, list lengths) run per batch in ``batch``. The layout is
documented in docs/data.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.vocab, dict) or not all(isinstance(k, str) for k in self.vocab):
            raise DataError(f"vocab must map feature names to table sizes, got {self.vocab!r}")
        if not isinstance(self.side_features, list) or not all(
            isinstance(f, str) for f in self.side_features
        ):
            raise DataError(
                f"side_features must be a list of feature names, got {self.side_features!r}"
            )
        if not isinstance(self.files, dict):
            raise DataError(f"files must map file names to row counts, got {self.files!r}")
        if self.kind not in KINDS:
            raise DataError(f"dataset kind must be one of {KINDS}, got {self.kind!r}")
        if self.id_mode not in ID_MODES:
            raise DataError(f"id_mode must be one of {ID_MODES}, got {self.id_mode!r}")
        if not isinstance(self.conditions, list) or not all(
            isinstance(f, str) for f in self.conditions
        ):
            raise DataError(f"conditions must be a list of feature names, got {self.conditions!r}")
        clash = sorted(set(self.conditions) & {"item", *self.side_features})
        if clash:
            raise DataError(f"conditions {clash} are also item features")
        needed = ["item", *self.side_features, *self.conditions]
        missing = [f for f in needed if f not in self.vocab]
        if missing:
            raise DataError(f"vocab has no size for features {missing}")
        small = {f: n for f, n in self.vocab.items() if not isinstance(n, int) or n < 1}
        if small:
            raise DataError(f"vocab sizes must be positive integers: {small}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> DatasetMeta:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{source}: expected a JSON object")
        version = raw.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise DataError(
                f"{source}: format_version {version} is not supported "
                f"(this recsys reads {FORMAT_VERSION})"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"{source}: unknown keys {unknown}")
        try:
            return cls(**raw)
        except TypeError as err:
            raise DataError(f"{source}: {err}") from None
        except DataError as err:
            raise DataError(f"{source}: {err}") from None


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


def check_schema(path: str, schema: pa.Schema, meta: DatasetMeta) -> None:
    """Raise :class:`DataError` naming the file and column if ``schema`` cannot serve ``meta``.

    Integer columns of any width are accepted (they are widened to int64 when read);
    anything else must match exactly.
    """
    for name, expected in columns(meta).items():
        index = schema.get_field_index(name)
        if index < 0:
            raise DataError(
                f"{describe(path, column=name)}: missing; a {meta.kind} dataset "
                f"needs columns {list(columns(meta))}"
            )
        found = schema.field(index).type
        if not _compatible(found, expected):
            raise DataError(f"{describe(path, column=name)}: type {found}, expected {expected}")


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
