"""``recsys data inspect``: what a dataset holds, read from its footers and one column.

This module owns the summary of a dataset: kind, id mode, files, rows and row groups, the
Parquet schema, vocabulary sizes, the protocol that produced it, and the distribution of
sequence lengths (read from the item-list column alone).
"""

from __future__ import annotations

import numpy as np

from recsys.data.files import open_dataset
from recsys.data.schema import list_columns


def summarise(source: str) -> dict:
    """The summary of the dataset at ``source`` (directory, file or URI)."""
    dataset = open_dataset(source)
    meta = dataset.meta
    item_column = next(iter(list_columns(meta)))
    lengths = []
    schema = None
    for part in dataset.parts:
        file = dataset.open_file(part)
        schema = schema or file.schema_arrow
        for group in range(len(part.row_groups)):
            column = file.read_row_group(group, columns=[item_column]).column(0)
            for chunk in column.chunks:
                offsets = np.asarray(chunk.offsets, dtype=np.int64)
                lengths.append(np.diff(offsets))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    top = int(lengths.max()) + 1 if len(lengths) else 1
    edges = [0] + [2**k for k in range(top.bit_length() + 1)]
    bins = [e for e in edges if e < top] + [top]
    counts, _ = np.histogram(lengths, bins=bins)
    return {
        "kind": meta.kind,
        "id_mode": meta.id_mode,
        "files": {p.path: {"rows": p.rows, "row_groups": len(p.row_groups)} for p in dataset.parts},
        "rows": dataset.rows,
        "vocab": meta.vocab,
        "side_features": meta.side_features,
        "schema": {field.name: str(field.type) for field in schema} if schema else {},
        "protocol": meta.protocol,
        "lengths": {
            "column": item_column,
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "percentiles": {
                f"p{q}": int(np.percentile(lengths, q)) if len(lengths) else 0 for q in (50, 90, 99)
            },
            "max": int(lengths.max()) if len(lengths) else 0,
            "histogram": {
                f"{lo}-{hi - 1}" if hi - 1 > lo else f"{lo}": int(c)
                for lo, hi, c in zip(bins[:-1], bins[1:], counts, strict=True)
                if c
            },
        },
    }


def render(summary: dict) -> str:
    """The summary as text."""
    lines = [
        f"kind {summary['kind']}, id mode {summary['id_mode']}, {summary['rows']:,} rows "
        f"in {len(summary['files'])} file(s)"
    ]
    for path, info in summary["files"].items():
        lines.append(f"  {path}: {info['rows']:,} rows, {info['row_groups']} row group(s)")
    lines.append("schema")
    lines += [f"  {name:<24} {kind}" for name, kind in summary["schema"].items()]
    lines.append("vocab sizes")
    lines += [f"  {name:<24} {size:,}" for name, size in summary["vocab"].items()]
    stats = summary["lengths"]
    lines.append(
        f"lengths of {stats['column']}: mean {stats['mean']:.1f}, "
        + ", ".join(f"{k} {v}" for k, v in stats["percentiles"].items())
        + f", max {stats['max']}"
    )
    peak = max(stats["histogram"].values(), default=1)
    for label, count in stats["histogram"].items():
        lines.append(f"  {label:>10} {count:>10,} {'#' * max(1, round(40 * count / peak))}")
    if summary["protocol"]:
        lines.append("protocol")
        lines += [f"  {k}: {v}" for k, v in summary["protocol"].items()]
    return "\n".join(lines)
