"""Shared test set-up: markers that need hardware skip with their reason where it is absent.

Multi-rank tests run their bodies through ``recsys.distributed.launch.run_on_ranks`` (2 gloo
processes of this host); bodies must be module-level functions so the spawned ranks can
import them.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)
