"""Predictions on disk: each finished chunk once, then one part per rank, exactly once.

This module owns the files ``predict`` leaves in its stage directory::

    DIR/pending/FINGERPRINT          the stage fingerprint the chunks below belong to
    DIR/pending/chunk-<c>.parquet    chunk c's predictions (and logits), written atomically
    DIR/predictions/part-<r>.parquet rank r's chunks (c % world size == r), in chunk order

A chunk's file is written to a temporary name and renamed, so it is either whole or absent:
a run killed at any point, restarted on any world size, skips the chunks whose files exist
and every request ends up in exactly one chunk file, then in exactly one part (written the
same way). The counts of a chunk (its statuses, its unknown ids) travel in its file's
metadata. It does not score or read requests (``recsys.data.requests``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from recsys.data.requests import LABEL, OK, STATUSES, Chunk, Encoded, Requests, user_groups
from recsys.errors import UserError
from recsys.train.metrics import CTRMetrics

PENDING, PARTS = "pending", "predictions"
COUNTS_KEY = b"recsys.predict.counts"
LOGIT = "logit"
"""Kept in the chunk files for the metrics, not in the parts."""


class PendingError(UserError, RuntimeError):
    """The stage directory's chunks belong to another run, or one is not what it should be."""


def _atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class Pending:
    """The finished chunks of a stage directory (``DIR/pending``)."""

    def __init__(self, stage: str | Path, fingerprint: str) -> None:
        self.path = Path(stage) / PENDING
        self.parts = Path(stage) / PARTS
        self.fingerprint = fingerprint

    def check(self, resume: bool) -> None:
        """A :class:`PendingError` when resuming over chunks of another fingerprint (other
        inputs or config): they would mix two runs' predictions."""
        mark = self.path / "FINGERPRINT"
        found = mark.read_text().strip() if mark.is_file() else self.fingerprint
        if resume and found != self.fingerprint:
            raise PendingError(
                f"{self.path}: chunks of another run (fingerprint {found}, this run "
                f"{self.fingerprint}: other requests, model or config); run.resume=false "
                "starts over"
            )

    def prepare(self, resume: bool) -> None:
        """On one rank, after :meth:`check` on all: start over unless ``resume``; clear
        half-written files and parts of an earlier, unfinished run (its chunks hold them)."""
        if not resume and self.path.exists():
            shutil.rmtree(self.path)
        shutil.rmtree(self.parts, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(parents=True)
        for leftover in self.path.glob("*.tmp"):
            leftover.unlink()
        (self.path / "FINGERPRINT").write_text(self.fingerprint + "\n")

    def file(self, chunk: Chunk) -> Path:
        return self.path / f"chunk-{chunk.index:06d}.parquet"

    def done(self, chunk: Chunk) -> bool:
        return self.file(chunk).is_file()

    def write(self, chunk: Chunk, table: pa.Table, counts: dict[str, int]) -> None:
        meta = {**(table.schema.metadata or {}), COUNTS_KEY: json.dumps(counts).encode()}
        _atomic(table.replace_schema_metadata(meta), self.file(chunk))

    def read(self, chunk: Chunk) -> tuple[pa.Table, dict[str, int]]:
        table = pq.read_table(self.file(chunk))
        if table.num_rows != chunk.rows:
            raise PendingError(
                f"{self.file(chunk)}: {table.num_rows} rows, but chunk {chunk.index} "
                f"({chunk.file}, row group {chunk.row_group}) has {chunk.rows}; "
                "run.resume=false starts over"
            )
        counts = json.loads((table.schema.metadata or {})[COUNTS_KEY])
        return table, counts

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def chunk_predictions(
    chunk: Chunk, table: pa.Table, encoded: Encoded, logits: torch.Tensor
) -> tuple[pa.Table, dict[str, int]]:
    """A chunk's predictions, one row per request (score and logit null when not scored),
    and its counts: requests per status, unknown ids, non-finite scores."""
    n = table.num_rows
    scored = np.zeros(n, dtype=bool)
    scored[encoded.scorable] = True
    raw = logits.float().numpy()
    full = np.zeros(n, dtype=np.float32)
    full[encoded.scorable] = raw
    finite = np.isfinite(raw)
    score = torch.sigmoid(torch.from_numpy(full)).numpy()
    score[encoded.scorable[~finite]] = np.nan  # a sigmoid would make ±inf a valid probability
    columns = {
        "row": pa.array(chunk.first_row + np.arange(n, dtype=np.int64)),
        "user_id": table["user_id"].combine_chunks(),
        "candidate": table["candidate"].combine_chunks(),
        "score": pa.array(score, mask=~scored),
        "status": pa.array(np.array(STATUSES, dtype=object)[encoded.status], pa.string()),
    }
    if encoded.labels is not None:
        columns[LABEL] = encoded.labels
    columns[LOGIT] = pa.array(full, mask=~scored)
    counts = {name: int((encoded.status == i).sum()) for i, name in enumerate(STATUSES)}
    counts["unknown_candidate"] = encoded.unknown_candidate
    counts["unknown_history_ids"] = encoded.unknown_history_ids
    counts["nonfinite_scores"] = int((~finite).sum())
    return pa.table(columns), counts


def write_part(
    pending: Pending, chunks: Iterable[Chunk], requests: Requests, rank: int
) -> tuple[Counter, CTRMetrics]:
    """Rank ``rank``'s part: its chunks' predictions in chunk order, one chunk in memory at a
    time, written to a temporary file renamed when whole; the chunks' counts summed and the
    labelled scored requests in the metrics."""
    schema = requests.output_schema()
    part = pending.parts / f"part-{rank:05d}.parquet"
    tmp = part.with_name(part.name + ".tmp")
    counts: Counter = Counter()
    metrics = CTRMetrics()
    with pq.ParquetWriter(tmp, schema) as writer:
        for chunk in chunks:
            table, chunk_counts = pending.read(chunk)
            counts.update(chunk_counts)
            if requests.labelled:
                ok = pc.and_(pc.equal(table["status"], OK), pc.is_valid(table[LABEL]))
                kept = table.filter(ok)
                metrics.update(
                    torch.tensor(kept[LOGIT].to_numpy()),
                    torch.tensor(kept[LABEL].to_numpy().astype(np.float32)),
                    torch.tensor(user_groups(kept["user_id"].combine_chunks())),
                )
            writer.write_table(table.select(schema.names).cast(schema))
    os.replace(tmp, part)
    return counts, metrics
