"""Amazon reviews → recsys datasets with the GPSD protocol; item categories as side feature.

Reads a reviews file (JSON lines, optionally ``.gz``: ``reviewerID``, ``asin``,
``unixReviewTime``; the 2014 and 2018 releases) and its metadata file (one item per line:
``asin`` and either ``categories``, a list of category paths, as in 2014, or ``category``,
one path, as in 2018; 2014 lines are Python literals rather than JSON, and both are read).
Every review counts as a click. An item's category is the most specific (last) entry of its
first category path; items without metadata get ``unknown``. At least 4 events per user
(GPSD §4.1).
"""

from __future__ import annotations

import ast
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from recsys.data.convert.sources import Source
from recsys.data.protocol import Events, ProtocolConfig, Split, split
from recsys.data.schema import DataError

UNKNOWN = "unknown"


def _records(source: Source, name: str):
    for n, line in enumerate(source.read_text(name).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            try:
                yield n, ast.literal_eval(line)  # the 2014 metadata is Python literals
            except (ValueError, SyntaxError):
                raise DataError(
                    f"{source.label(name)}, line {n}: neither JSON nor a Python "
                    f"literal: {line[:80]!r}"
                ) from None


def _category(record: dict) -> str:
    paths = record.get("categories")
    if paths and isinstance(paths, list) and paths[0]:
        path = paths[0] if isinstance(paths[0], list) else paths
    else:
        path = record.get("category") or []
    return str(path[-1]).strip() if path and str(path[-1]).strip() else UNKNOWN


REVIEW_FIELDS = pa.schema(
    [("reviewerID", pa.string()), ("asin", pa.string()), ("unixReviewTime", pa.int64())]
)


def _read_reviews(source: Source, name: str) -> pa.Table:
    """The three fields of every review, parsed by pyarrow (other fields are ignored)."""
    options = pajson.ParseOptions(explicit_schema=REVIEW_FIELDS, unexpected_field_behavior="ignore")
    try:
        table = pajson.read_json(io.BytesIO(source.read_bytes(name)), parse_options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(
            f"{source.label(name)}: cannot parse the reviews (JSON lines with "
            f"reviewerID, asin and an integer unixReviewTime): {err}"
        ) from None
    if table.num_rows == 0:
        raise DataError(f"{source.label(name)}: no reviews")
    for field in REVIEW_FIELDS.names:
        column = table.column(field)
        if column.null_count:
            row = int(np.argmax(np.asarray(column.is_null())))
            raise DataError(
                f"{source.label(name)}, line {row + 1}: a review needs reviewerID, "
                f"asin and an integer unixReviewTime; {field!r} is missing"
            )
    return table


def read(reviews: str, meta: str | None) -> tuple[Events, list[str]]:
    """The review events and the files read."""
    source = Source(reviews)
    name = source.require(
        source.find("*.json", "*.json.gz", "*.jsonl", "*.jsonl.gz"),
        "reviews file (*.json or *.json.gz)",
    )
    reviews_table = _read_reviews(source, name)
    users = np.asarray(reviews_table.column("reviewerID"))
    items = np.asarray(reviews_table.column("asin"))
    times = np.asarray(reviews_table.column("unixReviewTime"))
    categories: dict[str, str] = {}
    files = [source.label(name)]
    if meta is not None:
        meta_source = Source(meta)
        meta_name = meta_source.require(
            meta_source.find("*.json", "*.json.gz", "*.jsonl", "*.jsonl.gz"), "metadata file"
        )
        for n, record in _records(meta_source, meta_name):
            if "asin" not in record:
                raise DataError(f"{meta_source.label(meta_name)}, line {n}: no 'asin'")
            categories[str(record["asin"])] = _category(record)
        files.append(meta_source.label(meta_name))
    item = np.array(items)
    events = Events(
        np.array(users),
        item,
        np.array([categories.get(i, UNKNOWN) for i in items]),
        np.array(times, dtype=np.int64),
    )
    return events, files


def convert(
    reviews: str, meta: str | None, config: ProtocolConfig | None = None
) -> tuple[Split, dict]:
    """Read Amazon reviews (+ metadata) and apply the protocol; return the split and source."""
    events, files = read(reviews, meta)
    result = split(events, config or ProtocolConfig(min_events=4))
    return result, {"converter": "amazon", "inputs": files}
