"""A ``ctr`` dataset given back in raw keys: the requests ``predict`` and an exported model
score.

This module owns the inverse of a converter for CTR samples: each sample's user, history and
candidate mapped back to their raw keys through the dataset's vocabularies, with the label
(or without it: unlabelled requests, as a serving system would send them). It is how a
converted test set is scored by ``predict`` or an exported model and compared with
``evaluate``, and how the demo makes a few requests. It reads batches of rows, never the
whole dataset at once.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data import vocab
from recsys.data.files import open_dataset
from recsys.data.schema import DataError
from recsys.data.writer import naming

READ_ROWS = 65_536
"""Rows converted at a time."""


def _batches(path: str, limit: int | None) -> Iterator[pa.RecordBatch]:
    left = limit
    for part in sorted(Path(path).glob("*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=READ_ROWS):
            if left is not None:
                if left <= 0:
                    return
                batch = batch.slice(0, left)
                left -= batch.num_rows
            yield batch


def as_requests(
    batch: pa.RecordBatch | pa.Table, vocabularies: dict[str, vocab.Vocabulary], labels: bool
) -> pa.Table:
    """``batch`` (rows of a ``ctr`` dataset) as requests: ``user_id``, ``history`` (raw item
    keys, oldest first), ``candidate`` and, with ``labels``, ``label``."""
    items, users = vocabularies["item"], vocabularies[vocab.USER]
    history = pa.chunked_array([batch.column("history_item_ids")]).combine_chunks()
    raw_history = pa.ListArray.from_arrays(
        history.offsets, items.raw(history.values.to_numpy(zero_copy_only=False))
    )
    columns = {
        "user_id": users.raw(batch.column("user_id").to_numpy(zero_copy_only=False)),
        "history": raw_history,
        "candidate": items.raw(batch.column("item_id").to_numpy(zero_copy_only=False)),
    }
    if labels:
        columns["label"] = batch.column("label")
    return pa.table(columns)


def write(
    dataset: str,
    out: str | Path,
    *,
    limit: int | None = None,
    labels: bool = True,
    overwrite: bool = False,
) -> int:
    """Write the first ``limit`` samples (all: None) of the ``ctr`` dataset ``dataset`` as
    raw-key requests to the Parquet file ``out`` (atomically; an existing file is replaced
    only with ``overwrite``); the number written."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory; give a file name", str(out))
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    opened = open_dataset(dataset)
    if opened.meta.kind != "ctr":
        raise DataError(f"{dataset}: a {opened.meta.kind!r} dataset; requests come from 'ctr'")
    missing = [t for t in ("item", vocab.USER) if t not in opened.meta.vocabularies]
    if missing:
        raise DataError(
            f"{dataset}: dataset.json records no vocabulary of {missing}: its ids have no raw "
            "keys to give back (convert the logs again with this recsys)"
        )
    vocabularies = vocab.load(dataset, opened.meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    rows, writer = 0, None
    try:
        for batch in _batches(dataset, limit):
            table = as_requests(batch, vocabularies, labels)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:
            raise DataError(f"{dataset}: no sample to write")
        writer.close()
        tmp.replace(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise naming(err, out) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows
