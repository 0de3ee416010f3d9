"""``recsys export``: a finished finetune stage as an artifact that plain PyTorch serves.

    recsys export --model runs/demo/finetune-st_sf --out serve/demo --dtype int8

This module owns making the artifact directory (docs/serving.md, "Export")::

    OUT/model.pt2       torch.export program: (history [B, T, L], candidate [B, T]) → score [B]
    OUT/vocab/          the stage's vocabularies (raw keys ↔ ids, each item's side ids)
    OUT/manifest.json   format, source stage and fingerprint, tables, inputs, output, sizes
    OUT/score.py        a scorer needing only torch, pyarrow and numpy (recsys.serve.score)

It rebuilds the stage's model as ``evaluate`` does (its recorded ``model`` section and frozen
tables, tables sized by the stage's vocabularies), loads every weight unsharded through DCP,
zeroes each table's reserved rows (unknown and padding: an unseen key scores as an empty
embedding), stores the tables as ``--dtype`` and traces :class:`ServedCTR` with a dynamic
batch and history length (1 .. ``model.max_len``). The directory is written under a temporary
name and renamed when complete; an existing OUT is replaced only with ``--force``. It does not
score (``score.py``) nor define the served computation (:mod:`recsys.serve.inference`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from recsys.checkpoint.weights import load_weights, named_weights, saved_shapes
from recsys.data import vocab
from recsys.data.schema import DatasetMeta
from recsys.data.writer import atomic_directory
from recsys.distributed.rowwise_int8 import dequantize, int8_tables
from recsys.errors import UserError
from recsys.models import build as models
from recsys.serve import score
from recsys.serve.inference import ServedCTR
from recsys.serve.quantize import DTYPES
from recsys.stages.common import read_stage
from recsys.stages.config import ModelSection

MODEL_FILE = "model.pt2"
SCORER_FILE = "score.py"


class ExportError(UserError, ValueError):
    """A stage cannot be exported, or OUT cannot be written; the message says why."""


def export(stage: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False) -> dict:
    """Write the artifact of the finished finetune ``stage`` to ``out`` (see the module doc);
    its manifest."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    stage, out = Path(stage), Path(out)
    record = read_stage(stage, "--model")
    if record["stage"] != "finetune":
        raise ExportError(
            f"--model {stage} is a {record['stage']} stage; export takes a finished finetune stage"
        )
    _check_out(stage, out, force)
    section = ModelSection(**record["config"]["model"])
    if section.arch != "gpsd":
        raise ExportError(
            f"--model {stage} trained model.arch={section.arch}; export serves the gpsd ranker"
        )
    vocabularies = vocab.from_stage(stage)
    model, tables = _trained(stage, section, record, vocabularies)
    padding = {name: vocabularies[name].padding for name in tables}
    served = ServedCTR.from_model(model, tables, padding, dtype)
    program = _traced(served, section.max_len)
    manifest = _manifest(stage, record, section, dtype, served, vocabularies)
    _write(out, force, program, stage / vocab.DIRECTORY, manifest)
    return manifest


def _check_out(stage: Path, out: Path, force: bool) -> None:
    target, source = out.resolve(), stage.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ExportError(f"--out {out}: overlaps the stage {stage}; give a directory outside it")
    if out.exists() and not force:
        raise ExportError(f"--out {out}: exists already; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file, not an artifact directory")


def _trained(
    stage: Path, section: ModelSection, record: dict, vocabularies: dict
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The stage's CTR model on CPU with its weights, and its full tables (``item`` first,
    fp32 whatever a frozen table was stored as) with their reserved rows zeroed."""
    shapes = saved_shapes(stage / "weights")
    names = [  # an int8 table's scale and bias are part of it (``table/<name>/scale_bias``)
        key.removeprefix("table/")
        for key in shapes
        if key.startswith("table/") and key.count("/") == 1
    ]
    item = vocabularies.get("item")
    if item is None:
        raise ExportError(
            f"--model {stage}: has no vocabularies ({stage / vocab.DIRECTORY}/index.json); "
            "its data predates them: convert the data again and retrain to export"
        )
    # The side features in the order the item vocabulary lists them (the data's order).
    sides = [name for name in item.side if name in names]
    missing = sorted(set(names) - {"item", *sides})
    if missing:
        raise ExportError(f"--model {stage}: tables {missing} have no item vocabulary column")
    rows = {name: shapes[f"table/{name}"][0] for name in ["item", *sides]}
    for name, count in rows.items():
        if name not in vocabularies or vocabularies[name].rows != count:
            have = vocabularies[name].rows if name in vocabularies else "no vocabulary"
            raise ExportError(
                f"--model {stage}: table {name!r} has {count} rows, its vocabulary {have}"
            )
    meta = DatasetMeta(kind="ctr", vocab=rows, side_features=sides)
    model = models.recorded_ctr_model(section, meta, record)
    model.sparse.to_empty(device="cpu")  # built on meta: filled by the weights below
    with warnings.catch_warnings():  # DCP warns that it loads in a single process: we mean to
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load_weights(model, stage / "weights", named_weights(model))
    weights, quantized = named_weights(model), int8_tables(model)
    tables = {}
    for name in rows:
        if name in quantized:  # one process: the int8 table holds every row
            int8 = quantized[name]
            table = dequantize(int8.codes, int8.scale_bias)
        else:
            table = weights[f"table/{name}"].detach().float().clone()
        table[vocabularies[name].unknown :] = 0  # unknown and padding: see recsys.data.vocab
        tables[name] = table
    return model.eval(), tables


def _traced(served: ServedCTR, max_len: int) -> torch.export.ExportedProgram:
    """``served`` through torch.export with a dynamic batch and history length."""
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=1, max=max_len)
    # Example rows of different lengths (padding after the shorter), not of size 1: torch
    # specializes dimensions that are 0 or 1 in the example.
    t, n = len(served.tables), max(2, max_len)
    padding = torch.tensor([served.padding[name] for name in served.tables])
    history = padding[None, :, None].repeat(3, 1, n)
    history[0, :, :] = 0
    history[1, :, : n // 2] = 0
    candidate = torch.zeros(3, t, dtype=torch.int64)
    with torch.no_grad():
        return torch.export.export(
            served,
            (history, candidate),
            dynamic_shapes={"history": {0: batch, 2: length}, "candidate": {0: batch}},
        )


def _manifest(
    stage: Path,
    record: dict[str, Any],
    section: ModelSection,
    dtype: str,
    served: ServedCTR,
    vocabularies: dict,
) -> dict[str, Any]:
    tables = []
    for name in served.tables:
        table, words = served.lookups[name], vocabularies[name]
        tables.append(
            {
                "name": name,
                "rows": table.rows,
                "dim": table.dim,
                "keys": words.size,
                "unknown": words.unknown,
                "padding": words.padding,
                "bytes": table.nbytes(),
                "item_column": None if name == "item" else f"{name}_id",
            }
        )
    return {
        "format": score.FORMAT,
        "format_version": score.VERSION,
        "source": {
            "stage": str(stage.resolve()),
            "fingerprint": record["fingerprint"],
            "strategy": record.get("strategy"),
            "model": record["config"]["model"],
        },
        "dtype": dtype,
        "max_len": section.max_len,
        "tables": tables,
        "inputs": [
            {
                "name": "history",
                "dtype": "int64",
                "shape": ["batch", "tables", "length"],
                "about": "each table's ids of the history, oldest first, the most recent "
                "max_len events, right-padded with the table's padding id",
            },
            {
                "name": "candidate",
                "dtype": "int64",
                "shape": ["batch", "tables"],
                "about": "each table's id of the candidate item",
            },
        ],
        "dims": {"batch": [1, None], "length": [1, section.max_len]},
        "output": {
            "name": "score",
            "dtype": "float32",
            "shape": ["batch"],
            "about": "click probability: the sigmoid of the CTR model's logit",
        },
        "unknown_keys": "a raw key not in a vocabulary gets the table's unknown id, whose row "
        "is zero (as is the padding row); an unknown item's side features are unknown too",
        "torch": torch.__version__,
    }


def _write(
    out: Path,
    force: bool,
    program: torch.export.ExportedProgram,
    vocabularies: Path,
    manifest: dict[str, Any],
) -> None:
    """The artifact under a temporary name beside ``out``, renamed when complete
    (``writer.atomic_directory``: an existing ``out`` is replaced only with ``force``)."""
    with atomic_directory(out, overwrite=force) as tmp:
        torch.export.save(program, tmp / MODEL_FILE)
        shutil.copytree(vocabularies, tmp / vocab.DIRECTORY)
        shutil.copyfile(score.__file__, tmp / SCORER_FILE)
        manifest["files"] = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        (tmp / score.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
