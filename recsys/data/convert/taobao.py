"""Taobao UserBehavior → recsys datasets with the GPSD protocol; item categories as side feature.

Reads ``UserBehavior.csv`` (no header: ``user_id,item_id,category_id,behavior_type,timestamp``;
``behavior_type`` one of ``pv``, ``buy``, ``cart``, ``fav``), keeps the chosen behaviours
(clicks, ``pv``, by default), and applies the protocol with at least 10 events per user
(GPSD §4.1).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.convert.sources import Source
from recsys.data.protocol import Events, ProtocolConfig, Split, split
from recsys.data.schema import DataError

BEHAVIOURS = ("pv", "buy", "cart", "fav")
COLUMNS = ["user", "item", "category", "behaviour", "time"]


def read(path: str, behaviours: tuple[str, ...] = ("pv",)) -> tuple[Events, str, bool]:
    """The events of the chosen behaviours, the file they came from, and whether the file's
    counts were checked against the published release."""
    unknown = sorted(set(behaviours) - set(BEHAVIOURS))
    if unknown:
        raise DataError(f"unknown behaviours {unknown}; Taobao has {list(BEHAVIOURS)}")
    source = Source(path)
    name = source.require(source.find("UserBehavior.csv*", "*.csv", "*.csv.gz"), "UserBehavior.csv")
    i64 = pa.int64()
    table = source.read_csv(
        name,
        delimiter=",",
        names=COLUMNS,
        types={"user": i64, "item": i64, "category": i64, "behaviour": pa.string(), "time": i64},
    )
    for column in COLUMNS:
        if table.column(column).null_count:
            raise DataError(f"{source.label(name)}: column {column!r} has empty values")
    events_all = Events(
        *(np.asarray(table.column(c)) for c in ("user", "item", "category", "time"))
    )
    checked = check_counts(table.num_rows, events_all)
    table = table.filter(pc.is_in(table.column("behaviour"), pa.array(list(behaviours))))
    if table.num_rows == 0:
        raise DataError(f"{source.label(name)}: no events of behaviours {list(behaviours)}")
    events = Events(*(np.asarray(table.column(c)) for c in ("user", "item", "category", "time")))
    return events, source.label(name), checked


# The published size of UserBehavior.csv (Tianchi dataset 649): behaviours of all types.
PUBLISHED = {"rows": 100_150_807, "users": 987_994, "items": 4_162_024, "categories": 9_439}


def check_counts(rows: int, events: Events) -> bool:
    """Compare the full file with its published size, when the row count says it is the full
    release (every behaviour type counted); raise on a mismatch. True when checked."""
    if rows != PUBLISHED["rows"]:
        return False
    found = {
        "users": len(np.unique(events.user)),
        "items": len(np.unique(events.item)),
        "categories": len(np.unique(events.category)),
    }
    wrong = {k: (PUBLISHED[k], v) for k, v in found.items() if v != PUBLISHED[k]}
    if wrong:
        raise DataError(
            f"UserBehavior.csv has the published row count but other counts "
            f"(expected, found): {wrong}"
        )
    return True


def convert(
    path: str, config: ProtocolConfig | None = None, behaviours: tuple[str, ...] = ("pv",)
) -> tuple[Split, dict]:
    """Read Taobao under ``path`` and apply the protocol; return the split and its source."""
    events, label, checked = read(path, behaviours)
    result = split(events, config or ProtocolConfig(min_events=10))
    return result, {
        "converter": "taobao",
        "inputs": [label],
        "behaviours": list(behaviours),
        "checked_against": "UserBehavior (published counts)" if checked else None,
    }
