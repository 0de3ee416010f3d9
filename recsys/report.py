"""The report of a study: GPSD's Table 3 layout, overfitting curves, and every number as JSON.

This module owns reading the finished ``finetune`` stages under an experiment directory
(``EXPERIMENT/<size>/finetune-<strategy>/stage.json``) and writing:

- ``report.md``: AUC per size × model × strategy on the evaluation data, with each strategy's
  relative improvement over NT of the same model and size (``AUC / AUC_NT − 1``, the paper's
  "Imp"), the train − valid AUC gap of the last epoch, and gAUC;
- ``report.json``: the same rows plus every epoch's metrics;
- ``curves.png``: train and valid AUC per epoch for each strategy (one panel per size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ORDER = ("NT", "FT", "ST", "FT&SF", "ST&SF")
MODELS = {"gpsd": "Transformer", "deepfm": "DeepFM", "din": "DIN"}


def collect(experiment: str | Path) -> list[dict[str, Any]]:
    """One row per finished finetune stage, ordered by size then strategy."""
    rows = []
    for done in sorted(Path(experiment).glob("*/finetune-*/DONE")):
        record = json.loads((done.parent / "stage.json").read_text())
        results = record.get("results", {})
        rows.append(
            {
                "size": record["config"]["model"]["size"],
                "model": MODELS.get(record["config"]["model"].get("arch", "gpsd"), "?"),
                "strategy": record["strategy"],
                "auc": results.get("valid_auc"),
                "gauc": results.get("valid_gauc"),
                "logloss": results.get("valid_logloss"),
                "train_auc": results.get("train_auc"),
                "gap_auc": results.get("gap_auc"),
                "samples": results.get("valid_samples"),
                "seconds": record.get("seconds"),
                "epochs": record.get("epochs", []),
                "stage": str(done.parent),
            }
        )
    rank = {s: i for i, s in enumerate(ORDER)}
    models = list(MODELS.values())
    rows.sort(
        key=lambda r: (_params(r["size"]), models.index(r["model"]), rank.get(r["strategy"], 99))
    )
    baseline = {(r["size"], r["model"]): r["auc"] for r in rows if r["strategy"] == "NT"}
    for row in rows:
        base = baseline.get((row["size"], row["model"]))
        row["imp"] = row["auc"] / base - 1 if base and row["auc"] is not None else None
    return rows


def _params(size: str) -> tuple[int, ...]:
    import re

    match = re.match(r"L(\d+)H(\d+)A(\d+)", size)
    return tuple(int(g) for g in match.groups()) if match else (0,)


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | model | strategy | AUC | Imp | gAUC | logloss | train AUC | gap | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        imp = "–" if r["strategy"] == "NT" else _fmt(r["imp"] and 100 * r["imp"], "{:+.2f}%")
        lines.append(
            f"| {r['size']} | {r['model']} | {r['strategy']} | {_fmt(r['auc'], '{:.4f}')} | "
            f"{imp} | "
            f"{_fmt(r['gauc'], '{:.4f}')} | {_fmt(r['logloss'], '{:.4f}')} | "
            f"{_fmt(r['train_auc'], '{:.4f}')} | {_fmt(r['gap_auc'], '{:+.4f}')} | "
            f"{_fmt(r['seconds'], '{:.0f}')} |"
        )
    return "\n".join(lines) + "\n"


def curves(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for r in (r for r in rows if r["size"] == size and r["model"] == "Transformer"):
            epochs = [e["epoch"] for e in r["epochs"]]
            (line,) = ax.plot(epochs, [e.get("valid_auc") for e in r["epochs"]], marker="o")
            ax.plot(
                epochs,
                [e.get("train_auc") for e in r["epochs"]],
                linestyle="--",
                color=line.get_color(),
            )
            line.set_label(r["strategy"])
        ax.set_title(f"{size}: valid (solid) vs train (dashed) AUC")
        ax.set_xlabel("epoch")
        ax.set_ylabel("AUC")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(experiment: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """Write the report files into ``experiment``; the markdown table and the rows."""
    experiment = Path(experiment)
    rows = collect(experiment)
    table = markdown(rows)
    (experiment / "report.md").write_text(
        f"# {experiment.name}: AUC on the evaluation data (the stages' data.valid)\n\n"
        f"{table}\n"
        "Imp: relative AUC improvement over NT at the same size. gap: train − valid AUC of the "
        "last epoch (overfitting).\n"
    )
    (experiment / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    if rows:
        curves(rows, experiment / "curves.png")
    return table, rows
