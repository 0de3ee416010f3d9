"""LUM's step 2 outputs as features of a ranker (step 3): stored, loaded, joined to batches.

This module owns the directory ``lum_query`` writes and ``lum_finetune`` reads:

- ``users/part-<rank>.parquet``: ``user_id`` int64 and ``outputs`` list<float32> of N·d (the
  user model's outputs at the N query conditions, in query order);
- ``items.parquet``: ``item_id`` and ``embedding`` list<float32> of d: the user model's item
  table, the space its outputs score items in (the target items of interest matching);
- ``features.json``: N, d, the queries, and the counts.

and the two ways LUM (§4.3) feeds them to a discriminative model:

- *direct* incorporation: the N·d outputs of the sample's user, as they are;
- *interest matching*: for each output, its cosine similarity with the candidate item's
  embedding (N numbers).

A user without outputs (not in the queried dataset) gets zeros; :meth:`UserFeatures.missing`
counts such users (``lum_finetune`` records them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.data.schema import DataError

FILE = "features.json"


def write_users(directory: Path, rank: int, users: np.ndarray, outputs: np.ndarray) -> Path:
    """One rank's users and their [n, N·d] outputs."""
    path = directory / "users" / f"part-{rank:05d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    width = int(np.prod(outputs.shape[1:]))
    flat = outputs.reshape(len(users), width).astype(np.float32)
    offsets = np.arange(len(users) + 1, dtype=np.int64) * width
    values = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat.ravel()))
    pq.write_table(pa.table({"user_id": pa.array(users, pa.int64()), "outputs": values}), path)
    return path


def write_items(directory: Path, embeddings: np.ndarray) -> Path:
    path = directory / "items.parquet"
    flat = embeddings.astype(np.float32)
    offsets = np.arange(len(flat) + 1, dtype=np.int64) * flat.shape[1]
    values = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat.ravel()))
    ids = pa.array(np.arange(len(flat), dtype=np.int64))
    pq.write_table(pa.table({"item_id": ids, "embedding": values}), path)
    return path


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    (directory / FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _matrix(table: pa.Table, column: str, width: int, source: Path) -> np.ndarray:
    array = table.column(column).combine_chunks()
    values = array.values.to_numpy(zero_copy_only=False)
    if len(values) != len(array) * width:
        raise DataError(f"{source}: column {column!r} rows are not all of {width} values")
    return values.reshape(len(array), width)


@dataclass
class UserFeatures:
    """A ``lum_query`` directory in memory: outputs by user id, item embeddings."""

    queries: int
    dim: int
    outputs: np.ndarray
    """float32 [users, N, d], row = user id (zeros for users never queried)."""
    known: np.ndarray
    """bool [users]: whether the user has outputs."""
    items: np.ndarray
    """float32 [items, d], L2-normalised."""
    direct: bool = True
    matching: bool = True

    @classmethod
    def load(cls, directory: str | Path, direct: bool = True, matching: bool = True):
        directory = Path(directory)
        try:
            meta = json.loads((directory / FILE).read_text())
        except OSError:
            raise DataError(f"{directory}: no {FILE}; not a lum_query stage's features") from None
        if not (direct or matching):
            raise ValueError("user features need direct incorporation, matching or both")
        n, d = int(meta["queries"]), int(meta["dim"])
        parts = [directory / "users" / f"part-{r:05d}.parquet" for r in range(meta["parts"])]
        absent = [str(p) for p in parts if not p.exists()]
        if absent:
            raise DataError(f"{directory}: features.json names parts that are missing: {absent}")
        users = pa.concat_tables(pq.read_table(p) for p in parts) if parts else None
        ids = users.column("user_id").to_numpy() if users is not None else np.zeros(0, np.int64)
        size = int(meta.get("users", (ids.max() + 1) if len(ids) else 0))
        outputs = np.zeros((size, n, d), dtype=np.float32)
        known = np.zeros(size, dtype=bool)
        if users is not None:
            outputs[ids] = _matrix(users, "outputs", n * d, directory).reshape(-1, n, d)
            known[ids] = True
        items = _matrix(pq.read_table(directory / "items.parquet"), "embedding", d, directory)
        items = items / np.maximum(np.linalg.norm(items, axis=1, keepdims=True), 1e-12)
        return cls(n, d, outputs, known, items.astype(np.float32), direct, matching)

    @property
    def width(self) -> int:
        """Features per sample."""
        return self.direct * self.queries * self.dim + self.matching * self.queries

    def __call__(self, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[B, width] features of samples of ``users`` scoring ``candidates``."""
        u = users.numpy()
        inside = (u >= 0) & (u < len(self.known))
        outputs = np.zeros((len(u), self.queries, self.dim), dtype=np.float32)
        outputs[inside] = self.outputs[u[inside]]
        parts = []
        if self.direct:
            parts.append(outputs.reshape(len(u), -1))
        if self.matching:
            unit = outputs / np.maximum(np.linalg.norm(outputs, axis=2, keepdims=True), 1e-12)
            parts.append(np.einsum("bnd,bd->bn", unit, self.items[candidates.numpy()]))
        return torch.from_numpy(np.concatenate(parts, axis=1))

    def missing(self, users: torch.Tensor) -> int:
        u = users.numpy()
        inside = (u >= 0) & (u < len(self.known))
        return int((~inside).sum() + (~self.known[u[inside]]).sum())


class WithFeatures:
    """A loader whose batches carry ``features(user_ids, candidate items)`` as ``extra``;
    everything else (state, dataset, workers) is the wrapped loader's."""

    def __init__(self, loader, features: UserFeatures) -> None:
        self.loader, self.features = loader, features

    def __iter__(self) -> Iterator:
        # The loader's iterator is made now, not at the first batch: the trainer makes it
        # under its own random state (what an exact resume relies on).
        return self._joined(iter(self.loader))

    def _joined(self, batches: Iterator) -> Iterator:
        for batch in batches:
            candidates = batch.features["candidate_item"].values()
            batch.extra = self.features(batch.user_ids, candidates)
            yield batch

    def __getattr__(self, name: str):
        return getattr(self.loader, name)
