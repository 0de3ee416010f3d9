"""Vocabularies: the raw key behind every dense id of a table, and the two reserved rows.

This module owns the mapping a converter makes when it remaps raw ids densely, kept so that
new raw logs can be scored and answers given back in raw ids. One Parquet file per table
(``item``, each side feature, each condition feature) and one for users; a ``seq`` or ``ctr``
dataset's ``dataset.json`` references them (``vocabularies``) and a training stage carries a
copy in its own directory (``vocab/``).

Ids of a table with a vocabulary::

    0 .. keys-1     the raw keys, in sorted order of the raw keys
    keys            unknown: any key not seen in the data the vocabulary was made from
    keys + 1        padding: fills a fixed-width history (the exported model's input)

so a table has ``keys + 2`` rows. Known ids are the ones a converter always wrote (the
reserved rows sit after them). No training sample holds a reserved id and negatives are
drawn among the known ids only, so training never reads or changes these rows; scoring
(``predict``, the exported model) reads the unknown row, and zeroes both rows first
(:data:`RESERVED`): an unseen item adds nothing but its position to a history. An unseen
item's side features are unknown too (the item vocabulary holds each known item's side
feature ids). Users are not a table: their vocabulary has no reserved rows, and an unseen
user is kept by its raw key.

A file holds columns ``key`` (the raw key: integer or string), ``id`` (int64), ``reserved``
(``unknown``/``padding`` on the two reserved rows, whose key is null, else null) and, in the
item vocabulary, ``<side>_id`` per side feature.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recsys.data.files import dataset_directory
from recsys.data.schema import DataError, DatasetMeta
from recsys.data.writer import naming

DIRECTORY = "vocab"
"""Where a converter writes the vocabularies, beside its splits (``DATASET/vocab``), and
where a stage keeps its copy (``STAGE/vocab``)."""
RESERVED = ("unknown", "padding")
"""The reserved rows after the known keys, in order."""
USER = "user"
"""The users' vocabulary (no reserved rows: users are no table)."""
METADATA_KEY = b"recsys.vocabulary"


@dataclass
class Vocabulary:
    """One table's raw keys (``keys[i]`` is dense id ``i``) and, for the item table, each
    item's side feature ids."""

    table: str
    keys: pa.Array
    side: dict[str, np.ndarray] = field(default_factory=dict)
    side_sizes: dict[str, int] = field(default_factory=dict)
    """Known keys of each side feature's own vocabulary (its unknown id), item table only."""

    def __post_init__(self) -> None:
        self.keys = pa.array(self.keys) if not isinstance(self.keys, pa.Array) else self.keys
        if self.keys.null_count:
            raise DataError(f"vocabulary {self.table!r}: a raw key is null")
        for name, ids in self.side.items():
            if len(ids) != len(self.keys):
                raise DataError(
                    f"vocabulary {self.table!r}: {len(ids)} {name} ids for {len(self.keys)} keys"
                )

    @property
    def reserved(self) -> bool:
        return self.table != USER

    @property
    def size(self) -> int:
        """Known keys."""
        return len(self.keys)

    @property
    def unknown(self) -> int:
        return self.size

    @property
    def padding(self) -> int:
        return self.size + 1

    @property
    def rows(self) -> int:
        """The table's rows: the keys and the reserved rows."""
        return self.size + (len(RESERVED) if self.reserved else 0)

    def ids(self, raw: pa.Array | np.ndarray | list) -> np.ndarray:
        """The dense ids of ``raw`` keys (int64); a key not in the vocabulary (or null) gets
        the unknown id, or -1 for users."""
        values = raw if isinstance(raw, pa.Array | pa.ChunkedArray) else pa.array(raw)
        if values.type != self.keys.type:
            try:
                values = values.cast(self.keys.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(
                    f"vocabulary {self.table!r}: keys are {self.keys.type}, got {values.type} "
                    "values that do not convert"
                ) from None
        found = pc.index_in(values, value_set=self.keys)
        missing = self.unknown if self.reserved else -1
        return np.asarray(pc.fill_null(found, missing).to_numpy(zero_copy_only=False), np.int64)

    def raw(self, ids: np.ndarray) -> pa.Array:
        """The raw keys of dense ``ids``; null for reserved or out-of-range ids."""
        ids = np.asarray(ids, dtype=np.int64)
        known = (ids >= 0) & (ids < self.size)
        picked = self.keys.take(pa.array(np.where(known, ids, 0)))
        return pc.if_else(pa.array(known), picked, pa.scalar(None, self.keys.type))

    def about(self, file: str) -> dict[str, Any]:
        """What ``dataset.json`` records of this vocabulary, stored at ``file``."""
        entry: dict[str, Any] = {"file": file, "keys": self.size}
        if self.reserved:
            entry.update({name: self.size + i for i, name in enumerate(RESERVED)})
        return entry

    def to_table(self) -> pa.Table:
        n = self.size
        extra = len(RESERVED) if self.reserved else 0
        keys = pa.concat_arrays([self.keys, pa.nulls(extra, self.keys.type)])
        columns: dict[str, pa.Array] = {
            "key": keys,
            "id": pa.array(np.arange(n + extra, dtype=np.int64)),
            "reserved": pa.concat_arrays(  # no Python list of n entries: big tables too
                [pa.nulls(n, pa.string()), pa.array(list(RESERVED[:extra]), pa.string())]
            ),
        }
        for name, ids in self.side.items():
            unknown = np.full(extra, _side_unknown(self.side_sizes, name), dtype=np.int64)
            columns[f"{name}_id"] = pa.array(np.concatenate([np.asarray(ids, np.int64), unknown]))
        table = pa.table(columns)
        about = {"table": self.table, **self.about("")}
        about.pop("file")
        return table.replace_schema_metadata({METADATA_KEY: json.dumps(about).encode()})

    def write(self, path: str | os.PathLike) -> None:
        pq.write_table(self.to_table(), path)

    @classmethod
    def read(
        cls, path: str | os.PathLike, table: str | None = None, fs: pafs.FileSystem | None = None
    ) -> Vocabulary:
        """The vocabulary in ``path`` (on ``fs``, default local); a DataError naming the file
        when it is not one."""
        try:
            data = pq.read_table(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{path}: cannot read the vocabulary ({err})") from None
        raw = (data.schema.metadata or {}).get(METADATA_KEY)
        missing = [c for c in ("key", "id", "reserved") if c not in data.column_names]
        if raw is None or missing:
            why = f"no column {missing[0]!r}" if missing else "no recsys.vocabulary metadata"
            raise DataError(f"{path}: not a recsys vocabulary ({why})")
        about = json.loads(raw)
        name = about["table"]
        if table is not None and name != table:
            raise DataError(f"{path}: the vocabulary of {name!r}, not {table!r}")
        n = about["keys"]
        ids = data["id"].to_numpy()
        if len(ids) < n or not np.array_equal(ids, np.arange(len(ids))):
            raise DataError(f"{path}: ids are not 0, 1, 2, ... in order")
        keys = data["key"].combine_chunks().slice(0, n)
        side = {
            c[: -len("_id")]: data[c].to_numpy()[:n]
            for c in data.column_names
            if c.endswith("_id") and c != "id"
        }
        sizes = {
            s: int(data[f"{s}_id"][n].as_py()) for s in side if len(data) > n
        }  # a side feature's unknown id is its known keys' count
        return cls(name, keys, side, side_sizes=sizes)


def write_range(
    path: str | os.PathLike,
    table: str,
    keys: int,
    side: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    side_sizes: dict[str, int] | None = None,
    chunk: int = 1 << 20,
) -> dict[str, Any]:
    """Write the vocabulary of a table whose raw keys are ``0 .. keys-1`` (key ``i`` is id
    ``i``), ``chunk`` rows at a time, so that a catalogue of tens of millions of items never
    sits in memory whole; ``side[name](ids)`` gives the side feature ids of item ids. The file
    is the one :meth:`Vocabulary.write` would write; returns what ``dataset.json`` records
    of it (its ``file`` left empty)."""
    side, side_sizes = side or {}, side_sizes or {}
    reserved = table != USER
    extra = len(RESERVED) if reserved else 0
    about: dict[str, Any] = {"table": table, "keys": keys}
    if reserved:
        about.update({name: keys + i for i, name in enumerate(RESERVED)})
    fields = [pa.field("key", pa.int64()), pa.field("id", pa.int64())]
    fields += [pa.field("reserved", pa.string())]
    fields += [pa.field(f"{name}_id", pa.int64()) for name in side]
    schema = pa.schema(fields, metadata={METADATA_KEY: json.dumps(about).encode()})
    try:
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, keys + extra, chunk):
                ids = np.arange(start, min(start + chunk, keys + extra), dtype=np.int64)
                known = ids < keys
                n_known = int(known.sum())
                names = [RESERVED[i - keys] for i in ids[n_known:].tolist()]  # at most 2
                columns = [
                    pa.array(ids, mask=~known),
                    pa.array(ids),
                    pa.concat_arrays(
                        [pa.nulls(n_known, pa.string()), pa.array(names, pa.string())]
                    ),
                ]
                for name, of in side.items():
                    values = np.full(len(ids), _side_unknown(side_sizes, name), dtype=np.int64)
                    values[known] = of(ids[known])
                    columns.append(pa.array(values))
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    except OSError as err:
        raise naming(err, Path(path)) from err
    about.pop("table")
    return {"file": "", **about}


def _side_unknown(sizes: dict[str, int], name: str) -> int:
    if name not in sizes:
        raise DataError(f"vocabulary: no size for side feature {name!r} (its unknown id)")
    return sizes[name]


def references(vocabularies: dict[str, Vocabulary]) -> dict[str, dict[str, Any]]:
    """What a dataset beside ``DIRECTORY`` records of ``vocabularies`` (``dataset.json``'s
    ``vocabularies``: paths relative to the dataset)."""
    return {name: v.about(f"../{DIRECTORY}/{name}.parquet") for name, v in vocabularies.items()}


def write_all(directory: Path, vocabularies: dict[str, Vocabulary]) -> None:
    """Write each vocabulary to ``directory/<table>.parquet`` (an OS error names the file)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, vocab in vocabularies.items():
        path = directory / f"{name}.parquet"
        try:
            vocab.write(path)
        except OSError as err:
            raise naming(err, path) from err


Located = tuple[pafs.FileSystem, str]
"""A file on a pyarrow filesystem: a dataset may lie behind a URI (``s3://``, ``hdfs://``)."""


def files(dataset: str | os.PathLike, meta: DatasetMeta) -> dict[str, Located]:
    """Each vocabulary file ``meta`` (of the dataset ``dataset``: its directory or one of its
    files, a local path or a URI) references, checked to exist."""
    fs, directory = dataset_directory(str(dataset))
    found = {}
    for name, entry in meta.vocabularies.items():
        path = posixpath.normpath(posixpath.join(directory, entry["file"]))
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise DataError(
                f"{posixpath.join(directory, 'dataset.json')}: vocabulary {name!r} is "
                f"{entry['file']}, but {path} does not exist (keep the converter's "
                f"{DIRECTORY}/ beside its splits)"
            )
        found[name] = (fs, path)
    return found


def load(dataset: str | os.PathLike, meta: DatasetMeta) -> dict[str, Vocabulary]:
    """The vocabularies of a dataset, each checked against ``dataset.json``."""
    vocabularies = {}
    for name, (fs, path) in files(dataset, meta).items():
        vocab = Vocabulary.read(path, name, fs)
        if vocab.size != meta.vocabularies[name]["keys"]:
            raise DataError(
                f"{path}: {vocab.size} keys, but the dataset.json of {dataset} records "
                f"{meta.vocabularies[name]['keys']}"
            )
        vocabularies[name] = vocab
    return vocabularies


def carry(dataset: str | os.PathLike, meta: DatasetMeta, stage: str | os.PathLike) -> None:
    """Copy a dataset's vocabularies into a stage's ``vocab/`` with an ``index.json`` (what
    ``dataset.json`` records, with the file names in that directory)."""
    if not meta.vocabularies:
        return
    target = Path(stage) / DIRECTORY
    target.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, (fs, path) in files(dataset, meta).items():
        with fs.open_input_stream(path) as source, open(target / f"{name}.parquet", "wb") as out:
            shutil.copyfileobj(source, out)
        index[name] = {**meta.vocabularies[name], "file": f"{name}.parquet"}
    tmp = target / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target / "index.json")


def from_stage(stage: str | os.PathLike) -> dict[str, Vocabulary]:
    """The vocabularies a stage carries (empty when its data had none)."""
    target = Path(stage) / DIRECTORY
    index_file = target / "index.json"
    if not index_file.is_file():
        return {}
    index = json.loads(index_file.read_text())
    return {name: Vocabulary.read(target / entry["file"], name) for name, entry in index.items()}
