"""Score click probabilities with an artifact of ``recsys export``: torch, pyarrow, numpy only.

This file is copied into every artifact as ``score.py`` and imports nothing of recsys or
torchrec, so it runs wherever torch does::

    python score.py requests.json                        # scores printed as JSON lines
    python score.py ctr_test/part-00000.parquet --out scores.parquet
    python score.py requests.json --artifact serve/demo  # another artifact than its own

Requests (JSON: a list of objects, or one object per line) are raw: ``user_id`` (passed
through), ``history`` (raw item keys, oldest first) and ``candidate`` (a raw item key). Keys
map to ids through the artifact's vocabularies; a key never seen maps to the unknown id
(whose embedding is zero), and an item's side features come from the item vocabulary (an
unknown item's are unknown). A Parquet file is either a ``ctr`` dataset's (``history_item_ids``,
``history_<side>_ids``, ``item_id``, ``<side>_id``: ids already) or raw requests (columns
``history`` and ``candidate``). Histories are cut to their most recent ``max_len`` events, as
training does.

In Python: ``load(artifact).score_requests([...])`` or ``.score_ids(history, candidate)``;
:func:`time_batches` times the model alone on batches of given sizes (benchmarks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

FORMAT = "recsys-export"
VERSION = 1
MANIFEST = "manifest.json"


class Artifact:
    """A loaded artifact: its manifest, exported program and vocabularies."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST).read_text())
        found = (self.manifest.get("format"), self.manifest.get("format_version"))
        if found != (FORMAT, VERSION):
            raise ValueError(f"{self.directory}: artifact format {found}, this scorer reads "
                             f"{(FORMAT, VERSION)}")  # fmt: skip
        self.tables = [t["name"] for t in self.manifest["tables"]]
        self.padding = np.array([t["padding"] for t in self.manifest["tables"]], np.int64)
        self.unknown = np.array([t["unknown"] for t in self.manifest["tables"]], np.int64)
        self.max_len = int(self.manifest["max_len"])
        self.model = torch.export.load(self.directory / "model.pt2").module()
        items = pq.read_table(self.directory / "vocab" / "item.parquet")
        known = self.manifest["tables"][0]["keys"]
        self.item_keys = items["key"].combine_chunks().slice(0, known)
        # Each item id's side ids, the reserved rows' (unknown) included.
        self.sides = np.stack(
            [np.arange(len(items), dtype=np.int64)]
            + [items[t["item_column"]].to_numpy() for t in self.manifest["tables"][1:]],
            axis=1,
        )

    @torch.no_grad()
    def score_ids(self, history: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        """Click probabilities [B] of ``history`` [B, T, L] and ``candidate`` [B, T] ids."""
        if len(candidate) == 0:  # the program takes batches of 1 and more
            return np.zeros(0, np.float32)
        out = self.model(torch.as_tensor(history), torch.as_tensor(candidate))
        return out.numpy()

    def item_ids(self, raw: pa.Array | list) -> np.ndarray:
        """Dense item ids of raw item keys; an unseen (or null) key gets the unknown id."""
        values = raw if isinstance(raw, pa.Array | pa.ChunkedArray) else pa.array(raw)
        if values.type != self.item_keys.type:
            values = values.cast(self.item_keys.type)
        found = pc.index_in(values, value_set=self.item_keys)
        filled = pc.fill_null(found, int(self.unknown[0]))
        return np.asarray(filled.to_numpy(zero_copy_only=False), np.int64)

    def padded(self, lists: list[pa.Array]) -> np.ndarray:
        """Per-table list arrays (aligned) → [B, T, L] ids: each row's last ``max_len``
        values, right-padded with each table's padding id (L ≥ 1)."""
        first = lists[0]
        offsets = first.offsets.to_numpy().astype(np.int64) - int(first.offsets[0].as_py())
        ends = offsets[1:]
        starts = np.maximum(offsets[:-1], ends - self.max_len)
        lengths = ends - starts
        width = max(1, int(lengths.max()) if len(lengths) else 1)
        position = np.arange(width)[None, :]
        source = starts[:, None] + position
        real = position < lengths[:, None]
        out = np.empty((len(lengths), len(lists), width), np.int64)
        for t, values in enumerate(lists):
            flat = np.asarray(values.flatten().to_numpy(zero_copy_only=False), np.int64)
            picked = flat[np.minimum(source, max(len(flat) - 1, 0))] if len(flat) else 0
            out[:, t] = np.where(real, picked, self.padding[t])
        return out

    def encode_raw(self, history: pa.Array, candidate: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Raw item keys (a list array of histories, an array of candidates) → model inputs."""
        history = history.combine_chunks() if isinstance(history, pa.ChunkedArray) else history
        items = self.item_ids(history.flatten())
        lists = [
            pa.ListArray.from_arrays(_offsets(history), pa.array(self.sides[items, t]))
            for t in range(len(self.tables))
        ]
        return self.padded(lists), self.sides[self.item_ids(candidate)]

    def encode_dataset(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """A ``ctr`` dataset's columns (ids) → model inputs."""
        lists = [table[f"history_{n}_ids"].combine_chunks() for n in self.tables]
        scalars = [table[f"{n}_id"].to_numpy() for n in self.tables]
        return self.padded(lists), np.stack(scalars, axis=1).astype(np.int64)

    def score_table(self, table: pa.Table, batch_size: int = 1024) -> np.ndarray:
        """Scores of a ``ctr`` dataset's table or of a table of raw requests."""
        scores = []
        for start in range(0, len(table), batch_size):
            part = table.slice(start, batch_size)
            if "history_item_ids" in part.column_names:
                history, candidate = self.encode_dataset(part)
            else:
                history, candidate = self.encode_raw(
                    part["history"].combine_chunks(), part["candidate"].combine_chunks()
                )
            scores.append(self.score_ids(history, candidate))
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)

    def score_requests(self, requests: list[dict], batch_size: int = 1024) -> np.ndarray:
        """Scores of raw requests ``{user_id, history, candidate}``."""
        table = pa.table(
            {
                "history": pa.array([r["history"] for r in requests], pa.list_(_type(requests))),
                "candidate": pa.array([r["candidate"] for r in requests], _type(requests)),
            }
        )
        return self.score_table(table, batch_size)


def _type(requests: list[dict]) -> pa.DataType:
    """The raw keys' type: strings if any key is one, else integers."""
    keys = [k for r in requests for k in [*r["history"], r["candidate"]] if k is not None]
    return pa.string() if any(isinstance(k, str) for k in keys) else pa.int64()


def _offsets(lists: pa.ListArray) -> pa.Array:
    offsets = lists.offsets.to_numpy().astype(np.int32)
    return pa.array(offsets - offsets[0])


def load(directory: str | Path) -> Artifact:
    """The artifact in ``directory``."""
    return Artifact(directory)


def time_batches(
    directory: str | Path,
    batch_sizes: tuple[int, ...] = (1, 64, 1024),
    length: int | None = None,
    repeats: int = 20,
    seed: int = 0,
) -> dict[int, float]:
    """Median seconds per call of the artifact's model on random known ids, per batch size,
    histories of ``length`` events (default ``max_len``); the load is not timed."""
    artifact = load(directory)
    length = min(length or artifact.max_len, artifact.max_len)
    rng = np.random.default_rng(seed)
    keys = artifact.manifest["tables"][0]["keys"]
    out = {}
    for size in batch_sizes:
        items = rng.integers(0, keys, size=(size, length + 1))
        history = np.ascontiguousarray(artifact.sides[items[:, :-1]].transpose(0, 2, 1))
        candidate = artifact.sides[items[:, -1]]
        artifact.score_ids(history, candidate)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            artifact.score_ids(history, candidate)
            times.append(time.perf_counter() - start)
        out[size] = float(np.median(times))
    return out


def _read_requests(path: Path) -> pa.Table | list[dict]:
    if path.is_dir():  # a dataset's directory: its Parquet parts in order
        return pa.concat_tables(pq.read_table(part) for part in sorted(path.glob("*.parquet")))
    if path.suffix == ".parquet":
        return pq.read_table(path)
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="requests (.json, .jsonl) or a Parquet file or directory")
    p.add_argument("--artifact", default=str(Path(__file__).resolve().parent))
    p.add_argument("--out", help="write user_id, candidate, [label,] score to this Parquet")
    p.add_argument("--batch-size", type=int, default=1024)
    args = p.parse_args(argv)
    artifact = load(args.artifact)
    requests = _read_requests(Path(args.input))
    if isinstance(requests, list):
        scores = artifact.score_requests(requests, args.batch_size)
        columns = {
            "user_id": [r.get("user_id") for r in requests],
            "candidate": [r["candidate"] for r in requests],
        }
    else:
        scores = artifact.score_table(requests, args.batch_size)
        names = requests.column_names
        columns = {
            "user_id": requests["user_id"] if "user_id" in names else [None] * len(scores),
            "candidate": requests["item_id" if "item_id" in names else "candidate"],
        }
        if "label" in names:
            columns["label"] = requests["label"]
    columns["score"] = pa.array(scores, pa.float32())
    if args.out:
        pq.write_table(pa.table(columns), args.out)
        print(f"{len(scores)} scores → {args.out}", file=sys.stderr)
    else:
        for row in pa.table(columns).to_pylist():
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
