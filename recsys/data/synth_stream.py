"""Synthetic logs at catalogue scale, streamed to Parquet with bounded memory.

This module owns ``recsys data synth --stream`` (and ``--hash-ids``): the world of
``recsys.data.synth`` (latent clusters, users walking between them with ``stay``, Zipf
popularity within each cluster, the category side feature with ``merge``) over catalogues of
tens of millions of items, without ever holding the log:

- users are generated in blocks of :data:`BLOCK_USERS`, block ``b`` from its own RNGs
  (``[seed, b, 0]`` for lengths and times, ``[seed, b, 1]`` for clusters, items and
  negatives), so the output depends on the seed only, and the first n users' events do not
  depend on how many users follow them;
- popularity is Zipf within each cluster (rank r of a cluster has weight 1/r^zipf), as in the
  in-memory generator, so each cluster has its head and its long tail and the oracle AUC is
  the same; item positions are an affine bijection of (cluster, rank) modulo the catalogue
  (:class:`Catalogue`), so neither ids nor id blocks reveal clusters or popularity, and no
  O(items) permutation is held;
- the GPSD split (``recsys.data.protocol``'s rules) is computed in passes over regenerated
  blocks: the last-event times (the cheap time stream only) give the test threshold, the
  time at rank ⌊q·n⌋, by a histogram select (coarse bins, then one bin exactly), so memory
  does not grow with users (``valid_users``: the fit/validation boundary likewise, see
  :class:`Users`); then every block is written to ``seq``, ``ctr_train`` and ``ctr_test``
  (and ``ctr_valid``, ``ctr_fit``) with row-group buffering (``writer.PartWriter``), all in one
  ``writer.atomic_directory``.

Ids. ``remap`` mode: the item table holds the whole catalogue, touched or not (what a
table-scale benchmark needs): item ``i``'s dense id is ``i`` and its raw key ``i``;
negatives are uniform over the other items of the catalogue. The item vocabulary (with each
item's ``category_id``) is written chunk by chunk (``vocab.write_range``). ``hash`` mode:
items are raw 64-bit keys (SplitMix64 of the position, a bijection), ``id_mode`` is
``hash`` and ``vocab.item`` is ``table_rows`` (smaller than the catalogue is allowed:
collisions); categories are keys that the reader's hash maps back onto their dense ids
exactly (the inverse of its mixing function), and no vocabularies are written (hash mode has
none).

Memory: O(items / categories) float64 for the popularity CDF of a cluster, plus one block
and one buffered row group per split; none of it grows with users or events.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recsys.data.protocol import EMPTY_HINTS, ProtocolConfig, spans
from recsys.data.schema import DataError, DatasetMeta
from recsys.data.synth import SynthConfig, oracle_auc
from recsys.data.vocab import DIRECTORY, RESERVED, Vocabulary, write_range
from recsys.data.writer import PartWriter, atomic_directory

BLOCK_USERS = 4096
"""Users per generation block: fixed, so the output does not depend on memory settings."""
MAX_START = 10_000_000
"""First events lie in [0, MAX_START); later ones follow by gaps of 1 to MAX_GAP - 1."""
MAX_GAP = 3_600
_FINE_BITS = 12  # the exact select looks at one coarse bin of 2^12 time values

_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's finaliser (batch.hash_ids)


@dataclass(frozen=True)
class StreamSynthConfig:
    """A streamed synthetic log: the world (``synth``) and how ids are written."""

    synth: SynthConfig
    hash_ids: bool = False
    """Write raw 64-bit item keys and ``id_mode: hash`` (no vocabularies)."""
    table_rows: int = 0
    """Hash mode: the item table's rows (``vocab.item``); 0: the catalogue's size."""

    def __post_init__(self) -> None:
        if self.synth.conditions:
            raise ValueError("--stream does not generate conditions: drop --conditions")
        if self.synth.items >= 2**32:
            raise ValueError(f"items must be below 2^32, got {self.synth.items}")
        if self.table_rows < 0 or (self.table_rows and not self.hash_ids):
            raise ValueError("table_rows (>= 1) is for hash mode (--hash-ids) only")

    @property
    def item_rows(self) -> int:
        """The item table's rows (``vocab.item``)."""
        if self.hash_ids:
            return self.table_rows or self.synth.items
        return self.synth.items + len(RESERVED)


class Catalogue:
    """Items: (cluster, popularity rank) ↔ position in [0, items), an affine bijection
    modulo ``items`` drawn from the seed; and the Zipf law of ranks within a cluster."""

    def __init__(self, config: SynthConfig) -> None:
        n = self.items = config.items
        self.per_cluster = n // config.categories
        rng = np.random.default_rng([config.seed, 2**32 - 1])
        a = int(rng.integers(n // 3, 2 * n // 3 + 1)) | 1
        while math.gcd(a, n) != 1:
            a += 2 if n % 2 == 0 else 1
        self.a, self.b, self.a_inv = a, int(rng.integers(0, n)), pow(a, -1, n)
        weights = 1.0 / np.arange(1, self.per_cluster + 1, dtype=np.float64) ** config.zipf
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]

    def draw(self, rng: np.random.Generator, cluster: np.ndarray) -> np.ndarray:
        """An item of each ``cluster``, drawn by popularity: the items' positions."""
        rank = np.searchsorted(self.cdf, rng.random(len(cluster)), side="right")
        index = cluster * self.per_cluster + np.minimum(rank, self.per_cluster - 1)
        return (_mul_mod(index, self.a, self.items) + self.b) % self.items

    def cluster(self, position: np.ndarray) -> np.ndarray:
        """The latent cluster of items at ``position``."""
        index = _mul_mod((position - self.b) % self.items, self.a_inv, self.items)
        return index // self.per_cluster


def _mul_mod(x: np.ndarray, a: int, n: int) -> np.ndarray:
    """``x * a % n`` for int64 ``x`` in [0, n), n < 2^32, without overflow."""
    lo, hi = a & 0xFFFF, a >> 16
    return ((x * hi % n) * 65536 % n + x * lo) % n


def splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of 64-bit values), as int64."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(_M1)
        x ^= x >> np.uint64(27)
        x *= np.uint64(_M2)
        x ^= x >> np.uint64(31)
    return x.view(np.int64)


def unsplitmix(y: np.ndarray) -> np.ndarray:
    """The inverse of :func:`splitmix`: ``splitmix(unsplitmix(y)) == y``."""
    x = y.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x = _unshift(x, 31)
        x *= np.uint64(pow(_M2, -1, 2**64))
        x = _unshift(x, 27)
        x *= np.uint64(pow(_M1, -1, 2**64))
        x = _unshift(x, 30)
    return x.view(np.int64)


def _unshift(y: np.ndarray, shift: int) -> np.ndarray:
    """The inverse of ``x ^= x >> shift``."""
    x = y.copy()
    for _ in range(64 // shift):
        x = y ^ (x >> np.uint64(shift))
    return x


@dataclass
class Block:
    """The events of one block of users, in user then time order."""

    first_user: int
    lengths: np.ndarray
    starts: np.ndarray
    """Index of each user's first event."""
    timestamp: np.ndarray
    item: np.ndarray | None = None
    """Item positions in the catalogue (``None``: times only)."""
    cluster: np.ndarray | None = None
    negative: np.ndarray | None = None
    """Each user's negative candidate: uniform over the other items."""

    @property
    def last(self) -> np.ndarray:
        return self.starts + self.lengths - 1

    @property
    def last_time(self) -> np.ndarray:
        return self.timestamp[self.last]


def blocks(config: SynthConfig) -> int:
    return -(-config.users // BLOCK_USERS)


def block(config: SynthConfig, index: int, catalogue: Catalogue | None = None) -> Block:
    """Block ``index``'s events (times only without ``catalogue``). A block is always drawn
    whole (:data:`BLOCK_USERS` users) and the last one cut to the users asked for, so that
    no draw depends on how many users there are."""
    first_user = index * BLOCK_USERS
    n = min(BLOCK_USERS, config.users - first_user)
    rng = np.random.default_rng([config.seed, index, 0])
    lengths = rng.integers(config.min_events, config.max_events + 1, size=BLOCK_USERS)
    start = rng.integers(0, MAX_START, size=BLOCK_USERS)
    starts = np.zeros(BLOCK_USERS, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    total = int(lengths.sum())
    gaps = rng.integers(1, MAX_GAP, size=total)
    gaps[starts] = 0
    elapsed = np.cumsum(gaps)
    timestamp = np.repeat(start - elapsed[starts], lengths) + elapsed  # per-user cumsum
    kept = int(lengths[:n].sum())
    out = Block(first_user, lengths[:n], starts[:n], timestamp[:kept].astype(np.int64))
    if catalogue is None:
        return out
    rng = np.random.default_rng([config.seed, index, 1])
    first = np.zeros(total, dtype=bool)
    first[starts] = True
    new_segment = first | (rng.random(total) >= config.stay)
    segment = np.cumsum(new_segment) - 1
    cluster = rng.integers(0, config.categories, size=int(new_segment.sum()))[segment]
    item = catalogue.draw(rng, cluster)
    negative = rng.integers(0, config.items - 1, size=BLOCK_USERS)[:n]
    out.cluster, out.item = cluster[:kept], item[:kept]
    out.negative = negative + (negative >= out.item[out.last])
    return out


def _select(config: SynthConfig, rank: int) -> tuple[int, int, int]:
    """The last-event time of the user at ``rank`` in time order (0-based), how many users'
    last events are earlier and how many are not later, by two passes over the time streams:
    a histogram of coarse bins, then one bin's exact values."""
    top = MAX_START + MAX_GAP * config.max_events
    coarse = np.zeros((top >> _FINE_BITS) + 1, dtype=np.int64)
    for index in range(blocks(config)):
        coarse += np.bincount(block(config, index).last_time >> _FINE_BITS, minlength=len(coarse))
    cumulative = np.cumsum(coarse)
    bin_ = int(np.searchsorted(cumulative, rank, side="right"))
    below = int(cumulative[bin_ - 1]) if bin_ else 0
    fine = np.zeros(1 << _FINE_BITS, dtype=np.int64)
    for index in range(blocks(config)):
        times = block(config, index).last_time
        inside = times[(times >> _FINE_BITS) == bin_] & ((1 << _FINE_BITS) - 1)
        fine += np.bincount(inside, minlength=len(fine))
    within = np.cumsum(fine)
    offset = int(np.searchsorted(within, rank - below, side="right"))
    earlier = below + (int(within[offset - 1]) if offset else 0)
    return (bin_ << _FINE_BITS) | offset, earlier, below + int(within[offset])


@dataclass(frozen=True)
class Users:
    """Which split each user goes to, from the last-event times alone (the protocol's
    rules): test users are later than ``threshold``; with validation users, training users
    earlier than ``valid_time`` are fit users, later ones validation users, and of those at
    ``valid_time`` the first ``fit_at_valid_time`` (in user order) are fit users."""

    threshold: int
    train: int
    valid: int = 0
    valid_time: int = 0
    fit_at_valid_time: int = 0

    @classmethod
    def of(cls, config: SynthConfig, protocol: ProtocolConfig) -> Users:
        rank = min(int(protocol.test_quantile * config.users), config.users - 1)
        threshold, _, train = _select(config, rank)
        for name, empty in (("ctr_train", not train), ("ctr_test", train == config.users)):
            if empty:
                raise DataError(
                    f"split {name} would have 0 rows (users {config.users:,}, training users "
                    f"{train:,}); " + EMPTY_HINTS[name].replace("give more users", "raise --users")
                )
        if not protocol.valid_users:
            return cls(threshold, train)
        valid = max(1, round(protocol.valid_users * train))
        if valid >= train:
            raise DataError(
                f"valid_users {protocol.valid_users} leaves no training user to fit on "
                f"({train} training users)"
            )
        valid_time, earlier, _ = _select(config, train - valid)  # the first validation user
        return cls(threshold, train, valid, valid_time, train - valid - earlier)

    def fit(self, last_time: np.ndarray, seen_at_valid_time: int) -> np.ndarray:
        """Which of a block's users (last-event times ``last_time``) are fit users, given
        how many users at ``valid_time`` came before the block."""
        at = last_time == self.valid_time
        order = seen_at_valid_time + np.cumsum(at) - 1
        return (last_time < self.valid_time) | (at & (order < self.fit_at_valid_time))


class _Ids:
    """The values written for items and categories (remap: dense ids; hash: raw keys)."""

    def __init__(self, config: StreamSynthConfig) -> None:
        self.hash, self.merge = config.hash_ids, config.synth.merge

    def item(self, position: np.ndarray) -> np.ndarray:
        return splitmix(position) if self.hash else position

    def category(self, cluster: np.ndarray) -> np.ndarray:
        dense = cluster // self.merge
        return unsplitmix(dense) if self.hash else dense


def _seq(b: Block, ids: _Ids) -> pa.Table:
    users = np.arange(len(b.lengths))
    return pa.table(
        {
            "user_id": pa.array(b.first_user + users),
            "item_ids": spans(b.starts, b.last, ids.item(b.item)),
            "category_ids": spans(b.starts, b.last, ids.category(b.cluster)),
            "timestamps": spans(b.starts, b.last, b.timestamp),
        }
    )


def _ctr(
    b: Block, users: np.ndarray, catalogue: Catalogue, ids: _Ids, max_history: int
) -> pa.Table:
    """The positive (last event) and negative sample of each of ``users`` (block indices)."""
    pair = np.repeat(users, 2)
    is_pos = np.tile([True, False], len(users))
    at = b.last[pair]
    hist_start = np.maximum(b.starts[pair], at - max_history)
    candidate = np.where(is_pos, b.item[at], b.negative[pair])
    return pa.table(
        {
            "user_id": pa.array(b.first_user + pair),
            "history_item_ids": spans(hist_start, at, ids.item(b.item)),
            "history_category_ids": spans(hist_start, at, ids.category(b.cluster)),
            "item_id": pa.array(ids.item(candidate)),
            "category_id": pa.array(ids.category(catalogue.cluster(candidate))),
            "label": pa.array(is_pos.astype(np.int64)),
            "timestamp": pa.array(b.timestamp[at]),
        }
    )


def write(
    out: str | Path,
    config: StreamSynthConfig,
    protocol: ProtocolConfig | None = None,
    *,
    overwrite: bool = False,
    row_group_rows: int = 65_536,
    rows_per_file: int = 1_000_000,
) -> tuple[dict[str, DatasetMeta], dict[str, Any]]:
    """Generate and write ``out/seq``, ``out/ctr_train``, ``out/ctr_test`` (``ctr_valid`` and
    ``ctr_fit`` with ``protocol.valid_users``; ``out/vocab`` in remap mode), all or nothing;
    return the metadata written and the counts."""
    world = config.synth
    protocol = protocol or ProtocolConfig(min_events=min(4, world.min_events), seed=world.seed)
    if protocol.dense_train:
        raise ValueError("--stream does not write ctr_train_dense: drop --dense-train")
    if world.min_events < protocol.min_events:
        raise ValueError(
            f"--stream keeps every user: --min-len ({world.min_events}) must be at least "
            f"--min-events ({protocol.min_events})"
        )
    split = Users.of(world, protocol)
    names = ["seq", "ctr_train", "ctr_test"] + (["ctr_valid", "ctr_fit"] if split.valid else [])
    catalogue, ids = Catalogue(world), _Ids(config)
    categories = world.categories // world.merge
    vocab = {"item": config.item_rows, "category": categories + len(RESERVED), "user": world.users}
    references: dict[str, dict[str, Any]] = {}
    if not config.hash_ids:
        references = {
            name: {"file": f"../{DIRECTORY}/{name}.parquet", "keys": keys}
            | ({"unknown": keys, "padding": keys + 1} if name != "user" else {})
            for name, keys in (
                ("item", world.items),
                ("category", categories),
                ("user", world.users),
            )
        }
    counts = {
        "events": 0,
        "users": world.users,
        "items": world.items,
        "categories": categories,
        "train_users": 0,
        "test_users": 0,
    }
    oracle = np.zeros((2, 2), dtype=np.int64)  # [label, score] counts on the test split
    with atomic_directory(out, overwrite) as tmp:
        writers = {
            name: PartWriter(
                tmp / name,
                DatasetMeta(
                    kind=kind,
                    vocab=dict(vocab),
                    side_features=["category"],
                    id_mode="hash" if config.hash_ids else "remap",
                    has_timestamps=kind == "seq",
                    vocabularies=references,
                ),
                rows_per_file=rows_per_file,
                row_group_rows=row_group_rows,
                buffer=True,
                where=Path(out) / name,
            )
            for name, kind in ((name, "seq" if name == "seq" else "ctr") for name in names)
        }
        for writer in writers.values():
            writer.directory.mkdir()
        seen_at_valid_time = 0
        for index in range(blocks(world)):
            b = block(world, index, catalogue)
            test = b.last_time > split.threshold
            counts["events"] += len(b.item)
            counts["train_users"] += int((~test).sum())
            counts["test_users"] += int(test.sum())
            writers["seq"].write(_seq(b, ids))
            groups = {"ctr_train": ~test, "ctr_test": test}
            if split.valid:
                fit = ~test & split.fit(b.last_time, seen_at_valid_time)
                seen_at_valid_time += int((b.last_time == split.valid_time).sum())
                groups.update({"ctr_valid": ~test & ~fit, "ctr_fit": fit})
            for name, chosen in groups.items():
                users = np.flatnonzero(chosen)
                writers[name].write(_ctr(b, users, catalogue, ids, protocol.max_history))
            _oracle(oracle, b, np.flatnonzero(test), catalogue, world.merge)
        counts.update(
            {
                "sequences": world.users,
                "train_samples": 2 * counts["train_users"],
                "test_samples": 2 * counts["test_users"],
            }
        )
        if split.valid:
            counts["valid_users"] = split.valid
            for name in ("ctr_valid", "ctr_fit"):
                counts[f"{name}_samples"] = writers[name].rows
        p_pos, p_neg = oracle[1, 1] / oracle[1].sum(), oracle[0, 1] / oracle[0].sum()
        source = {
            "converter": "synth-stream",
            "synth": asdict(world),
            "hash_ids": config.hash_ids,
            "block_users": BLOCK_USERS,
            "oracle_auc_expected": round(oracle_auc(world.stay, world.categories), 4),
            "oracle_auc_test": round(
                float(p_pos * (1 - p_neg) + 0.5 * (p_pos * p_neg + (1 - p_pos) * (1 - p_neg))), 4
            ),
        }
        about = {
            "name": "gpsd-public",
            "min_events": protocol.min_events,
            "test_quantile": protocol.test_quantile,
            "max_history": protocol.max_history,
            "seed": protocol.seed,
            "valid_users": protocol.valid_users,
            "dense_train": False,
            "counts": counts,
            **source,
        }
        written = {name: writer.close({**about, "split": name}) for name, writer in writers.items()}
        if not config.hash_ids:
            _vocabularies(tmp / DIRECTORY, world, catalogue, categories)
    return written, {"counts": counts, **source}


def _oracle(
    counts: np.ndarray, b: Block, users: np.ndarray, catalogue: Catalogue, merge: int
) -> None:
    """Add the test samples of ``users`` to ``counts[label, score]``, the oracle's score
    being "the candidate's category is the last history event's"."""
    previous = b.cluster[b.last[users] - 1] // merge
    for label, cluster in (
        (1, b.cluster[b.last[users]]),
        (0, catalogue.cluster(b.negative[users])),
    ):
        score = (cluster // merge == previous).astype(np.int64)
        counts[label] += np.bincount(score, minlength=2)


def _vocabularies(
    directory: Path, world: SynthConfig, catalogue: Catalogue, categories: int
) -> None:
    """Remap mode's vocabularies: the catalogue's items (key i is id i, with its category),
    the categories and the users, written chunk by chunk."""
    directory.mkdir()

    def category_of(position: np.ndarray) -> np.ndarray:
        return catalogue.cluster(position) // world.merge

    write_range(
        directory / "item.parquet",
        "item",
        world.items,
        side={"category": category_of},
        side_sizes={"category": categories},
    )
    Vocabulary("category", pa.array(np.arange(categories, dtype=np.int64))).write(
        directory / "category.parquet"
    )
    write_range(directory / "user.parquet", "user", world.users)


def events(config: SynthConfig) -> Iterator[Block]:
    """Every block's events (for checks on small logs)."""
    catalogue = Catalogue(config)
    for index in range(blocks(config)):
        yield block(config, index, catalogue)
