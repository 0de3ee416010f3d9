"""The report of a study: GPSD's Table 3 layout, error bars, overfitting, scaling, wall times.

This module owns reading the finished ``finetune`` stages under an experiment directory (any
depth: ``<size>/[seed-<n>/]<prefix>finetune-<strategy>/stage.json``) and writing:

- ``report.md``: per training and evaluation set, AUC per size × model × strategy as the
  mean ± standard deviation over seeds, each strategy's relative improvement over NT of the
  same model and size (``AUC / AUC_NT − 1``, the paper's "Imp"), the popularity baseline, the
  standard error of one AUC on the evaluation set, the train − valid AUC gap, the scaling law
  fitted per strategy, wall times, and plain statements of where the numbers agree with the
  paper's claims or not; the pretraining table when the experiment holds pretrain stages
  (sampled hit rate beside the full-catalogue HR@K, NDCG@K and MRR of their ``retrieve``
  stages, :mod:`recsys.analysis.pretraining`); then every run;
- ``report.json``: the runs (with every epoch's metrics), the aggregated cells, the fits,
  the pretraining cells;
- ``curves.png`` (train and valid AUC per epoch), ``gap.png`` (train − valid AUC per epoch
  and strategy), ``scaling.png`` (AUC against dense parameters with the fitted laws).

``write(..., out="docs/results.md")`` also writes the report there, figures beside it.
"""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys.analysis import pretraining
from recsys.analysis.stats import (
    EXPONENT_BOUNDS,
    auc_standard_error,
    fit_power_law,
    mean_std,
)
from recsys.errors import UserError, describe_os_error

ORDER = ("NT", "FT", "ST", "FT&SF", "ST&SF", "DLRM", "+LUM", "+LUM match", "+LUM+match")
"""GPSD's strategies, then LUM's step-3 variants (``recsys.pipelines.lum``)."""

FINETUNES = ("finetune-*", "lum_finetune-*")
"""Directory names of the stages a report reads (at any depth under the experiment)."""


class ReportError(UserError, ValueError):
    """No report can be made of what was given; the message names the directory or file."""


def law_caveat(law: dict | None) -> str:
    """What a fitted law ``AUC(N) = A − B·N^−α`` cannot say, as a parenthesis for the report
    ('' when it can be read as it is)."""
    if not law:
        return ""
    low, high = EXPONENT_BOUNDS
    if law["exponent"] >= 0.995 * high:
        return " (α at the search bound: the points follow no power law)"
    if law["exponent"] <= 1.1 * low:
        return (
            " (α at the search bound: AUC grows like log N over these sizes, so no "
            "asymptote can be read from them)"
        )
    if law["asymptote"] > 1.0:
        return (
            " (A above 1, which no AUC can reach: the curve still bends too little over "
            "these sizes for its bound to be read)"
        )
    return ""


def _strategy(record: dict[str, Any]) -> str:
    """A finetune's strategy as the report names it: ``ST&SF``, or ``ST&SF (fp16)`` when its
    frozen tables were stored in another dtype than trained."""
    dtype = record.get("frozen_dtype", "fp32")
    return record["strategy"] + ("" if dtype == "fp32" else f" ({dtype})")


def baseline_of(strategy: str) -> str:
    """The strategy a row's Imp is relative to: NT for GPSD's, the ranker alone for LUM's."""
    return "DLRM" if strategy.startswith("+LUM") else "NT"


MODELS = {"gpsd": "Transformer", "deepfm": "DeepFM", "din": "DIN"}


@functools.cache
def dense_parameters(size: str) -> int:
    """Parameters of the Transformer tower of ``size`` (GPSD's "dense parameters": no
    embedding table), counted on the meta device."""
    import torch

    from recsys.models.tower import Tower, TowerConfig

    with torch.device("meta"):
        tower = Tower(TowerConfig.from_name(size))
    return sum(p.numel() for p in tower.parameters())


def _size_key(size: str) -> tuple[int, ...]:
    """Sizes ordered by dense parameters (then by name)."""
    match = re.match(r"L(\d+)H(\d+)A(\d+)$", size)
    if not match:
        return (0,)
    return (dense_parameters(size), *(int(g) for g in match.groups()))


def _seconds(stage: Path) -> float:
    try:
        return float(json.loads((stage / "stage.json").read_text()).get("seconds") or 0.0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0.0


def _record(stage: Path) -> dict[str, Any]:
    """The ``stage.json`` of a finished finetune stage, with the keys a report reads."""
    path = stage / "stage.json"
    try:
        record = json.loads(path.read_text())
    except OSError as err:
        raise ReportError(
            f"cannot read a finished stage's record: {describe_os_error(err)}"
        ) from None
    except ValueError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ReportError(f"{path}: expected a JSON object, the record of a finetune stage")
    config = record.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or "size" not in model or "strategy" not in record:
        raise ReportError(
            f"{path}: not the record of a finished finetune stage (no config.model.size or "
            "strategy)"
        )
    for key in ("results", "inputs"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise ReportError(f"{path}: {key} must be an object, got {json.dumps(record[key])}")
    for key, value in (record.get("results") or {}).items():
        if key in RESULT_KEYS and not _number_or_null(value):
            raise ReportError(
                f"{path}: results.{key} must be a number (or null), got {_shown(value)}"
            )
    for key, value in (record.get("inputs") or {}).items():
        if key in INPUT_KEYS and value is not None and not isinstance(value, str):
            raise ReportError(f"{path}: inputs.{key} must be a path (or null), got {_shown(value)}")
    if not _number_or_null(record.get("seconds")):
        raise ReportError(
            f"{path}: seconds must be a number (or null), got {_shown(record['seconds'])}"
        )
    return record


RESULT_KEYS = (
    "valid_auc",
    "valid_gauc",
    "valid_logloss",
    "valid_ne",
    "valid_calibration",
    "train_auc",
    "gap_auc",
    "valid_samples",
)
"""The results a report reads from a stage's record: numbers, or null."""

INPUT_KEYS = ("train", "valid", "init", "features", "pretrained")
"""The inputs a report reads from a stage's record: paths, or null."""


def _number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def finished(experiment: str | Path) -> list[Path]:
    """The finished finetune stages under ``experiment``; a ReportError naming the directory
    when it is missing or holds none."""
    root = Path(experiment)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "no such directory"
        raise ReportError(f"{root}: {problem}; give an experiment directory or file")
    stages = sorted(s for pattern in FINETUNES for s in root.glob(f"**/{pattern}") if s.is_dir())
    done = [s for s in stages if (s / "DONE").is_file()]
    if not done:
        what = {0: "no finetune stage", 1: "1 finetune stage, not finished"}.get(
            len(stages), f"{len(stages)} finetune stages, none finished"
        )
        raise ReportError(
            f"{root}: {what} (a stage is finished when its DONE file is written); "
            "run `recsys pipeline run` first"
        )
    return done


def _chain(stage: Path, inputs: dict[str, Any]) -> list[Path]:
    """The stages of a finetune stage's chain: its init (freeze or transfer), a freeze's
    transfer, a transfer's pretraining (as far as their records can be read)."""
    chain = [stage]
    init = inputs.get("init") or inputs.get("features")
    while isinstance(init, str) and init and Path(init) not in chain:
        chain.append(Path(init))
        try:
            before = json.loads((Path(init) / "stage.json").read_text())["inputs"]
            init = before.get("init") or before.get("pretrained")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            init = None
    return chain


def collect(experiment: str | Path) -> list[dict[str, Any]]:
    """One row per finished finetune stage, ordered by sets, size, model, strategy, seed."""
    rows = []
    for stage in finished(experiment):
        record = _record(stage)
        results, config = record.get("results") or {}, record["config"]
        inputs = record.get("inputs") or {}
        chain = _chain(stage, inputs)
        rows.append(
            {
                "size": config["model"]["size"],
                "model": MODELS.get(config["model"].get("arch", "gpsd"), "?"),
                "strategy": _strategy(record),
                "seed": config.get("run", {}).get("seed", 0),
                "train": Path(inputs.get("train") or "?").name,
                "eval": Path(inputs.get("valid") or "?").name,
                "eval_path": inputs.get("valid"),
                "auc": results.get("valid_auc"),
                "gauc": results.get("valid_gauc"),
                "logloss": results.get("valid_logloss"),
                "ne": results.get("valid_ne"),
                "calibration": results.get("valid_calibration"),
                "train_auc": results.get("train_auc"),
                "gap_auc": results.get("gap_auc"),
                "samples": results.get("valid_samples"),
                "seconds": record.get("seconds"),
                "chain_seconds": sum(_seconds(s) for s in chain),
                "epochs": record.get("epochs", []),
                "stage": str(stage),
            }
        )
    rank = {s: i for i, s in enumerate(ORDER)}
    models = list(MODELS.values())
    rows.sort(
        key=lambda r: (
            r["train"],
            r["eval"],
            _size_key(r["size"]),
            models.index(r["model"]) if r["model"] in models else 99,
            rank.get(r["strategy"], 99),
            r["seed"],
        )
    )
    bases = {
        (r["train"], r["eval"], r["size"], r["model"], r["seed"], r["strategy"]): r["auc"]
        for r in rows
        if r["strategy"] in ("NT", "DLRM")
    }
    for row in rows:
        key = (row["train"], row["eval"], row["size"], row["model"], row["seed"])
        base = bases.get((*key, baseline_of(row["strategy"])))
        row["imp"] = row["auc"] / base - 1 if base and row["auc"] is not None else None
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (train set, eval set, size, model, strategy): mean ± std over seeds of
    AUC, gap and seconds; Imp from the means."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["auc"] is not None:
            groups[(r["train"], r["eval"], r["size"], r["model"], r["strategy"])].append(r)
    cells = []
    for (train, evaluation, size, model, strategy), runs in groups.items():
        auc, auc_std = mean_std([r["auc"] for r in runs])
        gaps = [r["gap_auc"] for r in runs if r["gap_auc"] is not None]
        cells.append(
            {
                "train": train,
                "eval": evaluation,
                "size": size,
                "model": model,
                "strategy": strategy,
                "seeds": sorted(r["seed"] for r in runs),
                "auc": auc,
                "auc_std": auc_std,
                "gap_auc": mean_std(gaps)[0] if gaps else None,
                "seconds": mean_std([r["seconds"] or 0.0 for r in runs])[0],
                "chain_seconds": mean_std([r["chain_seconds"] for r in runs])[0],
                "epochs": _mean_epochs(runs),
            }
        )
    base = {
        (c["train"], c["eval"], c["size"], c["model"], c["strategy"]): c["auc"]
        for c in cells
        if c["strategy"] in ("NT", "DLRM")
    }
    for c in cells:
        key = (c["train"], c["eval"], c["size"], c["model"], baseline_of(c["strategy"]))
        reference = base.get(key)
        c["imp"] = c["auc"] / reference - 1 if reference else None
    return cells


def _mean_epochs(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Train and valid AUC per epoch, averaged over the runs that reached that epoch."""
    by_epoch: dict[int, list[dict]] = defaultdict(list)
    for r in runs:
        for e in r["epochs"]:
            by_epoch[e["epoch"]].append(e)
    out = []
    for epoch in sorted(by_epoch):
        values = {"epoch": epoch}
        for key in ("train_auc", "valid_auc"):
            got = [e[key] for e in by_epoch[epoch] if e.get(key) is not None]
            if got:
                values[key] = sum(got) / len(got)
        out.append(values)
    return out


def popularity(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The popularity baseline's AUC per evaluation set (the ``seq`` dataset beside it gives
    the training events), with the test set's positives and negatives."""
    from recsys.analysis.popularity import popularity_auc

    out = {}
    for r in rows:
        path = r.get("eval_path")
        if r["eval"] in out or not path:
            continue
        seq = Path(path).parent / "seq"
        if (seq / "dataset.json").exists() and (Path(path) / "dataset.json").exists():
            out[r["eval"]] = popularity_auc(seq, path)
    return out


def _fmt(value: float | None, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def _cell(c: dict[str, Any] | None, spread: bool = True) -> str:
    if c is None:
        return "–"
    text = f"{c['auc']:.4f}"
    if spread and len(c["seeds"]) > 1:
        text += f" ± {c['auc_std']:.4f}"
    if c["strategy"] not in ("NT", "DLRM") and c["imp"] is not None:
        text += f" ({100 * c['imp']:+.1f}%)"
    return text


def table3(cells: list[dict[str, Any]], pop: dict[str, Any] | None, spread: bool = True) -> str:
    """GPSD's Table 3 layout for one training/eval set: a row per size and model, a column
    per strategy (``spread``: with the standard deviation over seeds)."""
    named = {c["strategy"] for c in cells}
    # GPSD's order, then variants such as ``ST&SF (fp16)`` beside it.
    strategies = [s for s in ORDER if s in named] + sorted(named - set(ORDER))
    lines = [
        "| size | model | seeds | " + " | ".join(strategies) + " |",
        "|---|---|---|" + "---|" * len(strategies),
    ]
    keys = list(dict.fromkeys((c["size"], c["model"]) for c in cells))
    for size, model in keys:
        row = {c["strategy"]: c for c in cells if (c["size"], c["model"]) == (size, model)}
        seeds = max(len(c["seeds"]) for c in row.values())
        lines.append(
            f"| {size}{_params_text(size)} | {model} | {seeds} | "
            + " | ".join(_cell(row.get(s), spread) for s in strategies)
            + " |"
        )
    if pop:
        se = auc_standard_error(pop["auc"], pop["positives"], pop["negatives"])
        lines.append(
            f"| – | popularity | – | {pop['auc']:.4f} ± {se:.4f} (SE) |"
            + " |" * (len(strategies) - 1)
        )
    return "\n".join(lines) + "\n"


def _params_text(size: str) -> str:
    """`` (214K)``: the tower's dense parameters, for sizes named L<l>H<h>A<a>."""
    if not re.match(r"L\d+H\d+A\d+$", size):
        return ""
    n = dense_parameters(size)
    return f" ({n / 1e6:.1f}M)" if n >= 1e6 else f" ({n / 1e3:.0f}K)"


def runs_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| train | eval | size | model | strategy | seed | AUC | Imp | gAUC | logloss | NE | "
        "calibration | train AUC | gap | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        imp = (
            "–"
            if r["strategy"] in ("NT", "DLRM")
            else _fmt(r["imp"] and 100 * r["imp"], "{:+.2f}%")
        )
        lines.append(
            f"| {r['train']} | {r['eval']} | {r['size']} | {r['model']} | {r['strategy']} | "
            f"{r['seed']} | {_fmt(r['auc'], '{:.4f}')} | {imp} | {_fmt(r['gauc'], '{:.4f}')} | "
            f"{_fmt(r['logloss'], '{:.4f}')} | {_fmt(r['ne'], '{:.4f}')} | "
            f"{_fmt(r['calibration'], '{:.3f}')} | {_fmt(r['train_auc'], '{:.4f}')} | "
            f"{_fmt(r['gap_auc'], '{:+.4f}')} | {_fmt(r['seconds'], '{:.0f}')} |"
        )
    return "\n".join(lines) + "\n"


def fits(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The power law of AUC over dense parameters per (sets, strategy) of the Transformer,
    where at least 3 sizes ran."""
    out = {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        if c["model"] == "Transformer":
            groups[(c["train"], c["eval"], c["strategy"])].append(c)
    for (train, evaluation, strategy), group in groups.items():
        params = [dense_parameters(c["size"]) for c in group]
        law = fit_power_law(params, [c["auc"] for c in group])
        key = f"{train}/{evaluation}/{strategy}"
        if len({c["size"] for c in group}) >= 3:
            out[key] = {
                "train": train,
                "eval": evaluation,
                "strategy": strategy,
                "points": sorted(zip(params, [c["auc"] for c in group], strict=True)),
                "law": None if law is None else vars(law),
            }
    return out


def claims(cells: list[dict[str, Any]], pop: dict[str, Any] | None, se: float | None) -> list[str]:
    """Plain statements of where these cells agree with GPSD's claims, one per claim."""
    out = []
    gpsd = [c for c in cells if c["model"] == "Transformer" and c["strategy"] in ORDER[:5]]
    sizes = sorted({c["size"] for c in gpsd}, key=_size_key)
    best = {}
    for size in sizes:
        here = [c for c in gpsd if c["size"] == size]
        if here:
            best[size] = max(here, key=lambda c: c["auc"])
    if best and any(c["strategy"] == "ST&SF" for c in gpsd):
        wins = [s for s, c in best.items() if c["strategy"] == "ST&SF"]
        stsf_at = {c["size"]: c["auc"] for c in gpsd if c["strategy"] == "ST&SF"}
        others = "; ".join(
            f"{s}: {c['strategy']}, ahead of ST&SF by {c['auc'] - stsf_at.get(s, c['auc']):.4f}"
            for s, c in best.items()
            if s not in wins
        )
        out.append(
            f"ST&SF is the best strategy at {len(wins)} of {len(best)} sizes"
            + (f" (elsewhere {others})." if others else ".")
            + " The paper: ST&SF best."
        )
    nt = {c["size"]: c["auc"] for c in gpsd if c["strategy"] == "NT"}
    stsf = {c["size"]: c["auc"] for c in gpsd if c["strategy"] == "ST&SF"}
    if len(nt) >= 2:  # smallest and largest by dense parameters
        small, large = min(nt, key=dense_parameters), max(nt, key=dense_parameters)
        change = nt[large] - nt[small]
        se_text = f" (one AUC's standard error: {se:.3f})" if se else ""
        out.append(
            f"NT from {small} to {large}: {nt[small]:.4f} → {nt[large]:.4f} ({change:+.4f})"
            f"{se_text}; the paper: NT gets worse or no better with size."
        )
    if len(stsf) >= 2:
        small, large = min(stsf, key=dense_parameters), max(stsf, key=dense_parameters)
        out.append(
            f"ST&SF from {small} to {large}: {stsf[small]:.4f} → {stsf[large]:.4f} "
            f"({stsf[large] - stsf[small]:+.4f}); the paper: ST&SF improves with size."
        )
    for plain, frozen in (("FT", "FT&SF"), ("ST", "ST&SF")):
        pairs = [
            (a, b)
            for a in gpsd
            for b in gpsd
            if a["strategy"] == plain
            and b["strategy"] == frozen
            and a["size"] == b["size"]
            and a["gap_auc"] is not None
            and b["gap_auc"] is not None
        ]
        if pairs:
            shrinks = sum(b["gap_auc"] < a["gap_auc"] for a, b in pairs)
            mean_a = sum(a["gap_auc"] for a, _ in pairs) / len(pairs)
            mean_b = sum(b["gap_auc"] for _, b in pairs) / len(pairs)
            out.append(
                f"Sparse freezing shrinks the train − valid AUC gap ({plain} → {frozen}) at "
                f"{shrinks} of {len(pairs)} sizes (mean gap {mean_a:+.3f} → {mean_b:+.3f}); "
                "the paper: SF shrinks the gap."
            )
    lum = [c for c in cells if c["strategy"].startswith("+LUM")]
    for c in lum:
        alone = next(
            (
                d
                for d in cells
                if d["strategy"] == "DLRM" and (d["size"], d["model"]) == (c["size"], c["model"])
            ),
            None,
        )
        if alone is not None:
            out.append(
                f"{c['model']} {c['strategy']} at {c['size']}: {c['auc']:.4f} against the "
                f"ranker alone {alone['auc']:.4f} ({c['auc'] - alone['auc']:+.4f}); LUM's "
                "paper: DIN 0.7455 → 0.7472 with LUM on ML-1M."
            )
    if lum and stsf:
        best = max(lum, key=lambda c: c["auc"])
        top = max(stsf.values())
        out.append(
            f"Best LUM ranker ({best['model']} {best['strategy']}, {best['auc']:.4f}) against "
            f"GPSD's best ST&SF ({top:.4f}): {best['auc'] - top:+.4f}."
        )
    if pop and stsf and se:
        top = max(stsf.values())
        out.append(
            f"Best ST&SF {top:.4f} against popularity {pop['auc']:.4f}: "
            f"{top - pop['auc']:+.4f}, {(top - pop['auc']) / se:+.1f} standard errors of one "
            "AUC on this evaluation set."
        )
    return out


def _figures(
    cells: list[dict[str, Any]], fitted: dict[str, Any], directory: Path
) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = {}
    gpsd = [c for c in cells if c["model"] == "Transformer"]
    keys = list(dict.fromkeys((c["train"], c["eval"], c["size"]) for c in gpsd))
    if keys:
        for name, plot in (("curves", "auc"), ("gap", "gap")):
            columns = min(3, len(keys))
            rows = -(-len(keys) // columns)
            fig, axes = plt.subplots(
                rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False, sharey=True
            )
            for ax in axes.flat[len(keys) :]:
                ax.set_visible(False)
            for ax, key in zip(axes.flat, keys, strict=False):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                for c in (c for c in gpsd if (c["train"], c["eval"], c["size"]) == key):
                    epochs = [e["epoch"] for e in c["epochs"]]
                    train = [e.get("train_auc") for e in c["epochs"]]
                    valid = [e.get("valid_auc") for e in c["epochs"]]
                    if plot == "auc":
                        (line,) = ax.plot(epochs, valid, marker="o", label=c["strategy"])
                        ax.plot(epochs, train, linestyle="--", color=line.get_color())
                    else:
                        gap = [
                            t - v if t is not None and v is not None else None
                            for t, v in zip(train, valid, strict=True)
                        ]
                        ax.plot(epochs, gap, marker="o", label=c["strategy"])
                title = (
                    "valid (solid), train (dashed) AUC" if plot == "auc" else "train − valid AUC"
                )
                ax.set_title(f"{key[2]} ({key[0]}): {title}", fontsize=9)
                ax.set_xlabel("epoch")
                ax.legend(fontsize=8)
            fig.tight_layout()
            path = directory / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written[name] = path
    if fitted:
        import numpy as np

        fig, ax = plt.subplots(figsize=(6, 4))
        for fit in fitted.values():
            n, auc = zip(*fit["points"], strict=True)
            (dots,) = ax.plot(n, auc, "o", label=f"{fit['strategy']} ({fit['train']})")
            if fit["law"]:
                law = fit["law"]
                grid = np.geomspace(min(n), max(n) * 4, 100)
                ax.plot(
                    grid,
                    law["asymptote"] - law["scale"] * grid ** (-law["exponent"]),
                    "--",
                    color=dots.get_color(),
                )
                if 0.0 < law["asymptote"] <= 1.0:  # a bound an AUC can have
                    ax.axhline(law["asymptote"], color=dots.get_color(), linewidth=0.5)
        ax.set_xscale("log")
        measured = [auc for fit in fitted.values() for _, auc in fit["points"]]
        ax.set_ylim(min(measured) - 0.02, min(1.0, max(measured) + 0.05))
        ax.set_xlabel("dense parameters")
        ax.set_ylabel("AUC")
        ax.set_title("AUC against dense parameters; dashed: fitted power law", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / "scaling.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written["scaling"] = path
    return written


def render(
    rows: list[dict[str, Any]],
    cells: list[dict[str, Any]],
    pops: dict[str, Any],
    fitted: dict[str, Any],
    figures: dict[str, str],
    title: str,
    notes: str = "",
    pretrained: str = "",
) -> str:
    """The whole report as markdown (``figures``: image links by name; ``pretrained``: the
    pretraining section, :func:`recsys.analysis.pretraining.table`)."""
    out = [f"# {title}\n"]
    if notes:
        out.append(notes.strip() + "\n")
    sets = list(dict.fromkeys((c["train"], c["eval"]) for c in cells))
    for train, evaluation in sets:
        here = [c for c in cells if (c["train"], c["eval"]) == (train, evaluation)]
        pop = pops.get(evaluation)
        se = auc_standard_error(pop["auc"], pop["positives"], pop["negatives"]) if pop else None
        out.append(f"## Trained on `{train}`, evaluated on `{evaluation}`\n")
        out.append(
            "AUC of the final epoch, mean ± standard deviation over seeds; in brackets the "
            "relative improvement over NT of the same model and size (the paper's Imp)."
            + (
                f" One AUC on this evaluation set ({pop['positives']} positives, "
                f"{pop['negatives']} negatives) has a standard error of about {se:.3f} "
                "(Hanley & McNeil)."
                if se
                else ""
            )
            + "\n"
        )
        out.append(table3(here, pop))
        gaps = [c for c in here if c["gap_auc"] is not None]
        if gaps:
            out.append("Train − valid AUC gap of the final epoch (overfitting), mean over seeds:\n")
            out.append(
                table3([{**c, "auc": c["gap_auc"], "imp": None} for c in gaps], None, spread=False)
            )
        statements = claims(here, pop, se)
        if statements:
            out.append("What agrees with the paper and what does not:\n")
            out.extend(f"- {s}" for s in statements)
            out.append("")
    if pretrained:
        out.append(pretrained)
    if fitted:
        out.append("## Scaling\n")
        out.append("| train | eval | strategy | points | AUC(N) = A − B·N^−α | fit RMSE |")
        out.append("|---|---|---|---|---|---|")
        for fit in fitted.values():
            law = fit["law"]
            formula = (
                f"A = {law['asymptote']:.4f}, B = {law['scale']:.3g}, α = {law['exponent']:.3f}"
                if law
                else "no rising power law fits"
            )
            formula += law_caveat(law)
            out.append(
                f"| {fit['train']} | {fit['eval']} | {fit['strategy']} | {len(fit['points'])} | "
                f"{formula} | {_fmt(law and law['rmse'], '{:.4f}')} |"
            )
        out.append("")
    if cells:
        out.append("## Wall times\n")
        out.append(
            "Seconds inside each stage (start-up of the job excluded), mean over seeds: the "
            "finetune stage alone, and its whole chain (pretraining, transfer, freeze, "
            "finetune).\n"
        )
        out.append("| train | size | model | strategy | finetune s | chain s |")
        out.append("|---|---|---|---|---|---|")
        for c in cells:
            out.append(
                f"| {c['train']} | {c['size']} | {c['model']} | {c['strategy']} | "
                f"{c['seconds']:.0f} | {c['chain_seconds']:.0f} |"
            )
        out.append("")
    for name, link in figures.items():
        out.append(f"![{name}]({link})\n")
    out.append("## Every run\n")
    out.append(runs_table(rows))
    return "\n".join(out) + "\n"


def write(
    experiment: str | Path,
    title: str | None = None,
    out: str | Path | None = None,
    notes: str = "",
) -> tuple[str, list[dict[str, Any]]]:
    """Write the report into ``experiment`` (and to ``out`` with its figures beside it);
    the main tables' markdown and the runs. ``notes``: markdown put under the title, or the
    path of a ``.md`` file holding it."""
    experiment = Path(experiment)
    out = None if out is None else check_out(Path(out))
    notes = read_notes(notes)
    rows = collect(experiment)
    cells = aggregate(rows)
    pops = popularity(rows)
    fitted = fits(cells)
    pretraining_cells = pretraining.aggregate(pretraining.collect(experiment))
    pretrained = pretraining.table(pretraining_cells)
    title = title or f"{experiment.name}: AUC on the evaluation data"
    figures = _figures(cells, fitted, experiment) if cells else {}
    links = {k: p.name for k, p in figures.items()}
    text = render(rows, cells, pops, fitted, links, title, notes, pretrained)
    (experiment / "report.md").write_text(text)
    payload = {
        "runs": rows,
        "cells": cells,
        "popularity": pops,
        "fits": fitted,
        "pretraining": pretraining_cells,
    }
    (experiment / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    if out is not None:

        def text(links: dict[str, str]) -> str:
            return render(rows, cells, pops, fitted, links, title, notes, pretrained)

        try:
            _copy(out, figures, text)
        except OSError as err:
            raise ReportError(
                f"report file {out}: cannot be written: {describe_os_error(err)}"
            ) from None
    summary = "".join(
        table3([c for c in cells if (c["train"], c["eval"]) == key], pops.get(key[1]))
        for key in dict.fromkeys((c["train"], c["eval"]) for c in cells)
    )
    return summary, rows


def check_out(out: Path) -> Path:
    """``out``, checked to be a file name a report and its figures' folder can take."""
    if out.is_dir():
        raise ReportError(
            f"report file {out}: is a directory; give a markdown file, e.g. {out / 'results.md'}"
        )
    if not out.suffix:
        raise ReportError(
            f"report file {out}: give a name with a suffix, e.g. {out}.md (the figures go "
            f"into the folder {out.name}/ beside it)"
        )
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ReportError(f"report file {out}: lies under {above}, a file")
    assets = out.parent / out.stem
    if assets.exists() and not assets.is_dir():
        raise ReportError(f"report file {out}: its figures' folder {assets} is a file")
    return out


def read_notes(notes: str) -> str:
    """The markdown of ``notes``: itself, or the file it names (one line ending in ``.md``)."""
    name = notes.strip()
    if not name.endswith(".md") or "\n" in name:
        return notes
    try:
        return Path(name).read_text()
    except OSError as err:
        raise ReportError(f"report notes: {describe_os_error(err)}") from None


def _copy(out: Path, figures: dict[str, Path], text: Callable[[dict[str, str]], str]) -> None:
    """The report ``text`` (given the figures' links) to ``out``, its figures into the folder
    of ``out``'s name beside it; the file is written whole or not at all."""
    assets = out.parent / out.stem
    assets.mkdir(parents=True, exist_ok=True)
    links = {}
    for name, path in figures.items():
        (assets / path.name).write_bytes(path.read_bytes())
        links[name] = f"{assets.name}/{path.name}"
    partial = out.with_name(f".{out.name}.partial")
    try:
        partial.write_text(text(links))
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
