"""Shared test set-up: markers that need hardware skip with their reason where it is absent.

Multi-rank tests run their bodies through ``recsys.distributed.launch.run_on_ranks`` (2 gloo
processes of this host); bodies must be module-level functions so the spawned ranks can
import them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _log_handlers():
    """Entry points (``run_stage``, ``recsys.cli.main``) point log handlers at the stderr of
    their time, which pytest replaces between tests: restore the handlers after each test."""
    loggers = [logging.getLogger(), logging.getLogger("recsys")]
    saved = [(list(lg.handlers), lg.level) for lg in loggers]
    yield
    for logger, (handlers, level) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Path:
    """A directory in which no file can be made: a read-only one, or /sys where the tests run
    as root (for whom permissions do not refuse)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for candidate in (locked, Path("/sys")):
        try:
            (candidate / "probe").mkdir()
        except OSError:
            return candidate
        (candidate / "probe").rmdir()
    pytest.skip("no directory here refuses new files")


@pytest.fixture(scope="session")
def synth_split():
    """A function writing ``out``/seq, ctr_train, ctr_test of a synthetic log: tiny datasets
    of module fixtures (``synth_split(out, row_group_rows, **SynthConfig fields)``)."""
    return _synth_split


def _synth_split(out: Path, row_group_rows: int, **config: int) -> Path:
    from recsys.data.protocol import write_split
    from recsys.data.synth import SynthConfig, make

    result, source = make(SynthConfig(**config))
    write_split(out, result, source, row_group_rows=row_group_rows)
    return out
