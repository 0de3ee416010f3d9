"""Tiny datasets shared by the data tests, generated (never committed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.data.protocol import write_split
from recsys.data.synth import SynthConfig, make


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seq/ctr_train/ctr_test of 300 synthetic users, in row groups of 23 rows."""
    out = tmp_path_factory.mktemp("synth") / "data"
    result, source = make(
        SynthConfig(users=300, items=100, categories=5, min_events=5, max_events=40, seed=3)
    )
    write_split(out, result, source, row_group_rows=23)
    return out
