"""Showing plan documents: per-table and per-rank tables, and the differences of two plans.

This module owns the human-readable views of ``recsys plan``: ``table`` (aligned text),
``markdown`` and ``json`` (the document itself), and ``--compare``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from recsys.plan.hosts import GB

FORMATS = ("table", "markdown", "json")


def gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def ranks_text(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``0–2,5``."""
    out, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}–{ranks[j]}")
        i = j + 1
    return ",".join(out)


def shards_text(shards: list[dict[str, Any]]) -> str:
    """Shard shapes grouped: ``64 × 62,500,000×64``."""
    counts = Counter(tuple(s["sizes"]) for s in shards)
    return ", ".join(
        f"{n} × {'×'.join(f'{x:,}' for x in size)}" for size, n in sorted(counts.items())
    )


def _grid(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    right = [i > 0 for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            (c.rjust(w) if r else c.ljust(w)) for c, w, r in zip(cells, widths, right, strict=True)
        ).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def headline(doc: dict[str, Any]) -> str:
    c, m = doc["cluster"], doc["model"]
    hosts = c["world_size"] // c["local_world_size"]
    memory = f"{gb(c['hbm_bytes_per_rank'])} HBM, " if c["device"] == "cuda" else ""
    return (
        f"{m['stage']} model {m['size']} ({m['arch']}), batch {m['batch_size']} per rank, "
        f"sparse optimizer {m['sparse_optimizer']}, on {c['world_size']} {c['device']} ranks "
        f"= {hosts} × {c['local_world_size']} {c['host']} "
        f"({memory}{gb(c['ddr_bytes_per_rank'])} DDR per rank)"
    )


def _checkpoint_line(doc: dict[str, Any]) -> str:
    """What a checkpoint's save or load adds to a rank's host memory (DCP copies a shard at
    a time into it), and whether the host holds it."""
    copy = max(doc["ranks"], key=lambda r: r["checkpoint_ddr_bytes"])
    line = (
        "A checkpoint's save or load copies a rank's shards one at a time (DCP) into host "
        f"memory: up to {gb(copy['checkpoint_bytes'])} more, "
        f"{gb(copy['checkpoint_ddr_bytes'])} of host memory on rank {copy['rank']} then"
    )
    ddr = doc["cluster"]["ddr_bytes_per_rank"]
    if copy["checkpoint_ddr_bytes"] > ddr:
        line += (
            f", MORE than the {gb(ddr)} of DDR a rank has: saving or resuming would run out "
            "of host memory; give more ranks (fewer rows per shard) or more host memory"
        )
    return line


def render(doc: dict[str, Any], fmt: str = "table") -> str:
    """``doc`` as ``table``, ``markdown`` or ``json``."""
    if fmt == "json":
        return json.dumps(doc, indent=1)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    md = fmt == "markdown"
    device = doc["cluster"]["device"]
    main = "hbm_bytes" if device == "cuda" else "ddr_bytes"
    cap = doc["cluster"]["hbm_bytes_per_rank" if device == "cuda" else "ddr_bytes_per_rank"]
    out = [("**Plan**: " if md else "Plan: ") + headline(doc), ""]
    table_rows = []
    for t in doc["tables"]:
        weights = sum(s["weight_bytes"] for s in t["shards"])
        state = sum(s["optimizer_bytes"] for s in t["shards"])
        table_rows.append(
            [
                t["name"],
                f"{t['rows']:,} × {t['dim']}",
                ("yes, " + t["dtype"]) if t["frozen"] else "no",
                t["sharding_type"],
                t["compute_kernel"],
                f"{ranks_text(t['ranks'])} ({len(t['ranks'])})",
                shards_text(t["shards"]),
                gb(weights),
                gb(state) if not t["frozen"] else "0 (frozen)",
            ]
        )
    out += _grid(
        [
            "table",
            "rows × dim",
            "frozen",
            "sharding",
            "kernel",
            "ranks",
            "shards",
            "weights",
            "optimizer",
        ],
        table_rows,
        md,
    )
    out.append("")
    rank_rows = []
    for r in doc["ranks"]:
        rank_rows.append(
            [
                str(r["rank"]),
                gb(r["hbm_bytes"]),
                gb(r["ddr_bytes"]),
                gb(r["weight_bytes"]),
                gb(r["optimizer_bytes"]),
                gb(r["other_bytes"]),
                f"{r[main] / cap:.1%}" if cap else "–",
            ]
        )
    totals = {
        k: sum(r[k] for r in doc["ranks"])
        for k in ("hbm_bytes", "ddr_bytes", "weight_bytes", "optimizer_bytes", "other_bytes")
    }
    rank_rows.append(
        ["total"]
        + [gb(totals[k]) for k in ("hbm_bytes", "ddr_bytes", "weight_bytes")]
        + [gb(totals["optimizer_bytes"]), gb(totals["other_bytes"])]
        + [f"{totals[main] / (cap * len(doc['ranks'])):.1%}" if cap else "–"]
    )
    label = "HBM" if device == "cuda" else "DDR"
    out += _grid(
        ["rank", "HBM", "DDR", "weights", "optimizer", "other", f"of {label}"], rank_rows, md
    )
    used = [r[main] for r in doc["ranks"]]
    mean = sum(used) / len(used)
    hi, lo = (
        max(range(len(used)), key=used.__getitem__),
        min(range(len(used)), key=used.__getitem__),
    )
    out += [
        "",
        f"{label} imbalance: max/mean {used[hi] / mean if mean else 1:.3f} "
        f"(max {gb(used[hi])} on rank {hi}, min {gb(used[lo])} on rank {lo})",
    ]
    process = doc.get("process")
    if process:
        hbm, ddr = (max(r[k] for r in doc["ranks"]) for k in ("total_hbm_bytes", "total_ddr_bytes"))
        needs = f"{gb(hbm)} of HBM and {gb(ddr)} of DDR" if device == "cuda" else gb(ddr)
        where = " (on GPUs: dense state and activations in HBM)" if device == "cuda" else ""
        out.append(
            f"Besides its tables each rank holds about {gb(process['process_bytes'])}: runtime "
            f"{gb(process['runtime_bytes'])}, dense weights, gradients and AdamW state "
            f"{gb(process['dense_bytes'])}, activations {gb(process['activation_bytes'])} "
            f"(fp32; recsys.plan.process){where}; with it the fullest rank needs {needs}"
        )
        out.append(_checkpoint_line(doc))
    saved = [(t["name"], t["optimizer_bytes_saved"]) for t in doc["tables"] if t["frozen"]]
    if saved:
        out.append(
            "Frozen tables hold no optimizer state: "
            + ", ".join(f"{n} saves {gb(b)}" for n, b in saved)
            + f" ({doc['model']['sparse_optimizer']})"
        )
    out.append(
        f"Planned in {doc['planner']['seconds']:.2f} s (torchrec {doc['planner']['torchrec']})"
    )
    return "\n".join(out)


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("a", "b")) -> list[str]:
    """The differences between plans ``a`` and ``b``, one line each (none: same placement
    and memory)."""
    na, nb = names
    lines = []
    for section in ("cluster", "model"):
        for key in sorted(set(a[section]) | set(b[section])):
            va, vb = a[section].get(key), b[section].get(key)
            if va != vb:
                lines.append(f"{section}.{key}: {va} ({na}) → {vb} ({nb})")
    ta = {t["name"]: t for t in a["tables"]}
    tb = {t["name"]: t for t in b["tables"]}
    for name in sorted(set(ta) - set(tb)):
        lines.append(f"table {name}: only in {na}")
    for name in sorted(set(tb) - set(ta)):
        lines.append(f"table {name}: only in {nb}")
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        for key in ("rows", "dim", "dtype", "frozen", "sharding_type", "compute_kernel"):
            if x[key] != y[key]:
                lines.append(f"table {name} {key}: {x[key]} ({na}) → {y[key]} ({nb})")
        if x["ranks"] != y["ranks"]:
            lines.append(
                f"table {name} ranks: {ranks_text(x['ranks'])} ({na}) → "
                f"{ranks_text(y['ranks'])} ({nb})"
            )
        sx, sy = shards_text(x["shards"]), shards_text(y["shards"])
        if sx != sy:
            lines.append(f"table {name} shards: {sx} ({na}) → {sy} ({nb})")
        else:  # same shapes: are the same blocks on the same ranks?
            px = sorted((s["rank"], tuple(s["offsets"])) for s in x["shards"])
            py = sorted((s["rank"], tuple(s["offsets"])) for s in y["shards"])
            moved = len(set(px) ^ set(py)) // 2
            if moved:
                lines.append(f"table {name}: {moved} shards placed on other ranks ({na} → {nb})")
    for key, label in (("hbm_bytes", "HBM"), ("ddr_bytes", "DDR")):
        ma = max((r[key] for r in a["ranks"]), default=0)
        mb = max((r[key] for r in b["ranks"]), default=0)
        if ma != mb:
            lines.append(f"largest {label} per rank: {gb(ma)} ({na}) → {gb(mb)} ({nb})")
        sa, sb = sum(r[key] for r in a["ranks"]), sum(r[key] for r in b["ranks"])
        if sa != sb:
            lines.append(f"total {label}: {gb(sa)} ({na}) → {gb(sb)} ({nb})")
    return lines
