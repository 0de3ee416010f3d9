"""What every training stage shares: its loaders, its trainer, and what it hands on.

A training stage (``pretrain``, ``finetune``, ``lum_pretrain``, ``lum_finetune``) builds its
model, then :class:`Training` reads ``data.train`` (and ``data.valid`` when given), shards the
model with its optimizers and sets up the trainer (``recsys.stages.build``); the stage trains,
and :meth:`Training.finish` saves the weights, copies the data's vocabularies into the stage
(``vocab/``, what ``predict``, ``export`` and ``retrieve`` read) and records the steps, the
sharding and the results after the stage's own entries (and, for a CTR model, each epoch's
metrics). What a stage loads before training or checks after it stays in the stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from recsys.checkpoint.weights import save_weights
from recsys.data import vocab
from recsys.data.files import dataset_directory, read_meta
from recsys.distributed.env import DistEnv
from recsys.stages import build
from recsys.stages.common import StageDir
from recsys.stages.config import StageConfig


def epoch_history(run_dir: Path) -> list[dict]:
    """Each epoch's last record in the run's metrics.jsonl (a resumed run may repeat one)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    epochs: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "epoch":
            epochs[int(record["epoch"])] = record
    return [epochs[k] for k in sorted(epochs)]


class Training:
    """``model`` set up to train in ``stage``'s directory: ``sharded`` and its ``trainer``.

    ``task``: ``pretrain`` or ``ctr`` (the trainer's); ``conditions``: the loaders read
    condition features (LUM); ``wrap``: applied to each loader (LUM's user features)."""

    def __init__(
        self,
        stage: StageDir,
        model: nn.Module,
        config: StageConfig,
        env: DistEnv,
        task: str,
        *,
        conditions: bool = False,
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        def loader(path: str, train: bool):
            plain = build.loader(
                path, config.data, config.model, config.run.seed, train=train, conditions=conditions
            )
            return wrap(plain) if wrap else plain

        train = loader(config.data.train, True)
        valid = loader(config.data.valid, False) if config.data.valid else None
        self.stage, self.task, self.env = stage, task, env
        self.data = config.data.train
        self.sharded, self.trainer = build.trainer(
            model, train, valid, config, env, str(stage.path), task=task
        )
        self.results: dict[str, Any] = {}

    def train(self) -> dict[str, Any]:
        self.results = self.trainer.train()
        return self.results

    def finish(self, record: dict[str, Any]) -> dict[str, Any]:
        """Save the weights and carry the training data's vocabularies (``vocab/``), then
        write the stage's ``record`` and what training adds."""
        save_weights(self.sharded, self.stage.weights)
        if self.env.is_main:
            # dataset.json alone: its files were opened and checked when training began
            vocab.carry(self.data, read_meta(*dataset_directory(self.data)), self.stage.path)
        trained = {
            "steps": self.trainer.step,
            "sharding": build.sharding(self.sharded),
            "results": self.results,
        }
        if self.task == "ctr":
            history = epoch_history(self.stage.path) if self.env.is_main else []
            trained["epochs"] = history
        return self.stage.finish({**record, **trained})
