"""The generative model learns the planted structure of synthetic logs on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recsys.data.protocol import write_split
from recsys.data.stream import ParquetStream, StreamConfig
from recsys.data.synth import SynthConfig, make
from recsys.models.generative import GenerativeConfig, GenerativeModel
from recsys.models.tower import TowerConfig

STEPS, NEGATIVES, CATEGORIES = 150, 64, 10


@pytest.mark.slow
def test_pretraining_loss_falls_well_below_guessing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result, source = make(
        SynthConfig(
            users=2000, items=200, categories=CATEGORIES, stay=0.9, min_events=10, max_events=30
        )
    )
    write_split(tmp_path / "synth", result, source)
    config = GenerativeConfig(
        TowerConfig.from_name("L1H32A2", max_len=32),
        200,
        {"category": CATEGORIES},
        negatives=NEGATIVES,
    )
    model = GenerativeModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    stream = ParquetStream(str(tmp_path / "synth" / "seq"), StreamConfig(batch_size=64))
    losses: list[tuple[float, float]] = []
    while len(losses) < STEPS:
        for batch in stream:
            out = model(batch.features)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append((out.item_loss.item(), out.side_losses["category"].item()))
            if len(losses) == STEPS:
                break
    item, category = (sum(v) / 10 for v in zip(*losses[-10:], strict=True))
    # Guessing: log(K + 1) for the sampled softmax, log(C) for the next cluster. The planted
    # walk stays in its cluster 90% of the time, so the next cluster is nearly certain.
    assert losses[0][0] > 0.95 * math.log(NEGATIVES + 1)
    assert item < 0.75 * math.log(NEGATIVES + 1)
    assert category < 0.4 * math.log(CATEGORIES)
