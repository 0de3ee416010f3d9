"""The pretraining table of a study's report: sampled hit rate beside full-catalogue metrics.

This module owns reading the finished ``pretrain`` stages under an experiment directory and
the ``retrieve`` stages that scored them (``inputs.model`` names the pretraining), and the
table they make: per size and evaluation set, over seeds, the hit rate pretraining records
(its target beats the K sampled negatives: ``train_hit_rate``, and ``valid_hit_rate`` when it
validated) and the full-catalogue HR@K, NDCG@K and MRR of ``retrieve`` on held-out items. The
two are far apart by design: beating a few thousand uniform negatives is much easier than
ranking first among every item. Records that cannot be read are left out, not guessed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from recsys.analysis.stats import mean_std

PRETRAIN, RETRIEVE = "pretrain", "retrieve*"
"""Directory names (at any depth under the experiment)."""


def _record(stage: Path) -> dict[str, Any] | None:
    if not (stage / "DONE").is_file():
        return None
    try:
        record = json.loads((stage / "stage.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def collect(experiment: str | Path) -> list[dict[str, Any]]:
    """One row per finished pretraining and evaluation set (one with none when no retrieve
    stage scored it): size, seed, sampled hit rates, and the retrieve stage's metrics."""
    root = Path(experiment)
    # By the fingerprint of the pretraining a retrieve stage scored (a recorded path may be
    # relative to where the pipeline ran, not to where the report runs).
    scored: dict[str, list[dict[str, Any]]] = {}
    for stage in sorted(root.glob(f"**/{RETRIEVE}")):
        record = _record(stage)
        model = (record or {}).get("model_fingerprint")
        if record and record.get("stage") == "retrieve" and isinstance(model, str):
            scored.setdefault(model, []).append(record)
    rows = []
    for stage in sorted(root.glob(f"**/{PRETRAIN}")):
        record = _record(stage)
        if not record or record.get("stage") != "pretrain":
            continue
        config, results = record.get("config") or {}, record.get("results") or {}
        base = {
            "size": (config.get("model") or {}).get("size", "?"),
            "seed": (config.get("run") or {}).get("seed", 0),
            "train_hit_rate": _number(results.get("train_hit_rate")),
            "valid_hit_rate": _number(results.get("valid_hit_rate")),
            "stage": str(stage),
        }
        retrievals = scored.get(record.get("fingerprint", "")) or [{}]
        for retrieval in retrievals:
            got = retrieval.get("results") or {}
            k = got.get("k")
            rows.append(
                {
                    **base,
                    "eval": Path((retrieval.get("inputs") or {}).get("data") or "–").name,
                    "k": k,
                    "hr": _number(got.get(f"hr@{k}")),
                    "ndcg": _number(got.get(f"ndcg@{k}")),
                    "mrr": _number(got.get("mrr")),
                    "users": got.get("users"),
                }
            )
    return rows


METRICS = ("train_hit_rate", "valid_hit_rate", "hr", "ndcg", "mrr")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (size, evaluation set, K): mean and standard deviation over seeds of
    each metric that every seed has."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["size"], row["eval"], row["k"]), []).append(row)
    cells = []
    for (size, evaluation, k), runs in groups.items():
        cell: dict[str, Any] = {"size": size, "eval": evaluation, "k": k}
        cell["seeds"] = sorted(r["seed"] for r in runs)
        cell["users"] = runs[0]["users"]
        for name in METRICS:
            values = [r[name] for r in runs]
            known = None not in values
            cell[name], cell[f"{name}_std"] = mean_std(values) if known else (None, None)
        cells.append(cell)
    return sorted(cells, key=lambda c: (_size_key(c["size"]), c["eval"], c["k"] or 0))


def _size_key(size: str) -> tuple[int, ...]:
    """``L4H64A4`` → (64, 4, 4): by width, then depth (unknown names last)."""
    found = re.fullmatch(r"L(\d+)H(\d+)A(\d+)", size)
    return (int(found[2]), int(found[1]), int(found[3])) if found else (1 << 30,)


def _shown(cell: dict[str, Any], name: str) -> str:
    if cell[name] is None:
        return "–"
    text = f"{cell[name]:.4f}"
    return text + (f" ± {cell[f'{name}_std']:.4f}" if len(cell["seeds"]) > 1 else "")


def table(cells: list[dict[str, Any]]) -> str:
    """The markdown section (empty without a pretraining)."""
    if not cells:
        return ""
    ks = sorted({c["k"] for c in cells if c["k"]})
    k = "K" if len(ks) != 1 else str(ks[0])
    out = [
        "## Pretraining\n",
        "Next-item prediction, mean ± standard deviation over seeds. *Sampled*: the target "
        "scores above every sampled uniform negative (the pretraining stage's own hit rate). "
        f"*Full catalogue*: the `retrieve` stage ranks each user's held-out item among all "
        f"known items, seen items excluded (HR@{k}, NDCG@{k}, MRR; docs/stages.md).\n",
        f"| size | seeds | sampled HR (train) | sampled HR (valid) | eval | users | HR@{k} "
        f"| NDCG@{k} | MRR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        out.append(
            f"| {c['size']} | {len(c['seeds'])} | {_shown(c, 'train_hit_rate')} | "
            f"{_shown(c, 'valid_hit_rate')} | {c['eval']} | {c['users'] or '–'} | "
            f"{_shown(c, 'hr')} | {_shown(c, 'ndcg')} | {_shown(c, 'mrr')} |"
        )
    return "\n".join(out) + "\n"
