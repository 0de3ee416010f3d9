"""Run logs: a JSONL metrics file, TensorBoard events and a progress bar, on rank 0 only.

This module owns where a run's numbers go. Every record is one JSON line in
``RUN/metrics.jsonl`` (``{"step": ..., "split": ..., name: value}``) and the same scalars in
TensorBoard event files under ``RUN/tensorboard``; the resolved config is written once to
``RUN/config.json``. Other ranks log nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    """Metrics sink of one run directory (a no-op off rank 0)."""

    def __init__(
        self,
        run_dir: str | Path,
        main: bool,
        total_steps: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.main = main
        self.run_dir = Path(run_dir)
        self._writer = None
        self._bar = None
        self._file = None
        if not main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self._file = (self.run_dir / "metrics.jsonl").open("a")
        self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def record(self, step: int, split: str, values: dict[str, float]) -> None:
        """One line of metrics for ``split`` (train, valid, ...) at ``step``."""
        if not self.main:
            return
        self._file.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._writer.add_scalar(f"{split}/{name}", value, step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        if self.main:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=True)

    def close(self) -> None:
        if self.main:
            self._bar.close()
            self._writer.close()
            self._file.close()
