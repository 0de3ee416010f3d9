"""The popularity baseline: score a CTR sample by its candidate's count in training events.

On GPSD's public split of MovieLens-100K popularity alone scores an AUC of ~0.72–0.75 (the
paper's public code's authors measured it on this protocol; see docs/results.md), so every
model's AUC is reported beside it. "Training events" are the events of the pretraining
sequences (``seq``): every user's events but the last, the data every stage may train on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys.data.files import open_dataset


def item_counts(seq: str | Path) -> np.ndarray:
    """Events per item id over a ``seq`` dataset."""
    dataset = open_dataset(str(seq))
    counts = np.zeros(dataset.meta.vocab["item"], dtype=np.int64)
    for part in dataset.parts:
        table = dataset.open_file(part).read(columns=["item_ids"])
        ids = pc.list_flatten(table.column("item_ids")).to_numpy()
        counts += np.bincount(ids, minlength=len(counts))
    return counts


def labels_and_candidates(ctr: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and candidate item ids of a ``ctr`` dataset, in file order."""
    dataset = open_dataset(str(ctr))
    labels, items = [], []
    for part in dataset.parts:
        table = dataset.open_file(part).read(columns=["label", "item_id"])
        labels.append(table.column("label").to_numpy())
        items.append(table.column("item_id").to_numpy())
    return np.concatenate(labels), np.concatenate(items)


def popularity_auc(seq: str | Path, ctr: str | Path) -> dict[str, float]:
    """AUC of the popularity score on ``ctr``, with its positives and negatives."""
    counts = item_counts(seq)
    labels, items = labels_and_candidates(ctr)
    scores = torch.from_numpy(counts[items].astype(np.float64))
    auc = float(binary_auroc(scores, torch.from_numpy(labels)))
    positives = int(labels.sum())
    return {"auc": auc, "positives": positives, "negatives": len(labels) - positives}
