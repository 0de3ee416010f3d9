"""Run logs: a JSONL metrics file, TensorBoard events and a progress bar, on rank 0 only.

This module owns where a run's numbers go. Every record is one JSON line in
``RUN/metrics.jsonl`` (``{"step": ..., "split": ..., name: value}``) and the same scalars in
TensorBoard event files under ``RUN/tensorboard``; the resolved config is written once to
``RUN/config.json``. Other ranks log nothing. A resumed run first drops what the interrupted
run logged after the checkpoint it resumes from, so every step is logged once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

_OPEN_BARS: set[tqdm] = set()


def close_bars() -> bool:
    """Close every open progress bar (so an error line starts on its own line); whether
    there was one."""
    bars = list(_OPEN_BARS)
    for bar in bars:
        bar.close()
    _OPEN_BARS.clear()
    return bool(bars)


class RunLog:
    """Metrics sink of one run directory (a no-op off rank 0)."""

    def __init__(
        self,
        run_dir: str | Path,
        main: bool,
        total_steps: int | None = None,
        config: dict[str, Any] | None = None,
        resumed_at: int | None = None,
        keep_bytes: int | None = None,
    ) -> None:
        """``resumed_at``: the step a resumed run continues from. Records the interrupted
        run wrote after that checkpoint are dropped, as the resumed run writes them again:
        ``metrics.jsonl`` is cut back to ``keep_bytes`` (its size when the checkpoint was
        saved) or, when that is unknown, to the records before ``resumed_at`` and that step's
        own record; ``resumed_at=0`` (a run that starts over) keeps nothing; and
        TensorBoard hides events after ``resumed_at`` (its ``purge_step``)."""
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
        path = self.run_dir / "metrics.jsonl"
        if resumed_at is not None and path.exists():
            _rewind(path, resumed_at, keep_bytes)
        self._file = path.open("a")
        purge = resumed_at + 1 if resumed_at is not None else None
        self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
        self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
        _OPEN_BARS.add(self._bar)

    def record(self, step: int, split: str, values: dict[str, float]) -> None:
        """One line of metrics for ``split`` (train, valid, ...) at ``step``."""
        if not self.main:
            return
        self._file.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._writer.add_scalar(f"{split}/{name}", value, step)

    def size(self) -> int | None:
        """Bytes written to ``metrics.jsonl`` so far (None off rank 0)."""
        return self._file.tell() if self.main else None

    def progress(self, step: int, values: dict[str, float]) -> None:
        if self.main:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=True)

    def close(self) -> None:
        if self.main:
            self._bar.close()
            _OPEN_BARS.discard(self._bar)
            self._writer.close()
            self._file.close()


class SampleLog:
    """The dataset row ids each training step of this rank used, one JSON line per step in
    ``RUN/samples/rank<r>.jsonl`` (an audit of exactly-once reading; off by default). A
    resumed run first drops the steps after the one it resumes from."""

    def __init__(self, run_dir: str | Path, rank: int, resumed_at: int | None = None) -> None:
        path = Path(run_dir) / "samples" / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is not None and path.exists():
            _rewind(path, resumed_at, None)
        self._file = path.open("a")

    def record(self, step: int, epoch: int, rows: list[int]) -> None:
        self._file.write(json.dumps({"step": step, "epoch": epoch, "rows": rows}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _rewind(path: Path, step: int, keep_bytes: int | None) -> None:
    """Cut ``path`` back to its first ``keep_bytes`` bytes, or to its records of steps up to
    ``step``; the file is replaced atomically."""
    data = path.read_bytes()
    if keep_bytes is not None and keep_bytes <= len(data):
        kept = data[:keep_bytes]
    else:  # a step's own record was written before its checkpoint; epoch records after it
        lines = [line for line in data.splitlines(keepends=True) if line.strip()]
        kept = b"".join(line for line in lines if _kept(line, step))
    if kept != data:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(kept)
        tmp.replace(path)


def _kept(line: bytes, step: int) -> bool:
    try:
        record = json.loads(line)
        return record["step"] < step or (
            record["step"] == step and record.get("split", "step") == "step"
        )
    except (ValueError, KeyError, TypeError):
        return False  # a torn last line of a killed run
