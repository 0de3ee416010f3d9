"""Whether and how a run compiles its Transformer towers with ``torch.compile``.

Compilation is regional, as torchtitan does it: each Transformer block is compiled on its
own (:func:`compile_towers`), so a 4- or 24-layer tower compiles one block graph (and one
for the last block of a ranker, which computes at the candidate only) rather than the whole
model, and the sharded embedding tables, their input distribution and the losses stay
eager. Shapes are dynamic after the first change: the first batch compiles for its shape,
the first batch of another size or length recompiles once with symbolic sizes, and later
sizes reuse that graph.

``run.compile``: ``on``, ``off``, or ``auto`` (the default): on where it pays, that is on
CUDA, and on CPU for runs of at least :data:`CPU_STEPS` steps (a first compile costs tens
of seconds on a 2-core CPU, a few with a warm cache; see docs/results.md "Compiled tower").

The compile cache is Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``): the pipeline
points every stage of a study at one directory, so each graph compiles once per study.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

CHOICES = ("auto", "on", "off")
"""Values of ``run.compile``."""
CPU_STEPS = 500
"""``auto`` compiles on CPU from this many training steps: below it, the one-time compile
costs more than it saves (measured: docs/results.md "Compiled tower")."""


def wanted(choice: str, device: torch.device, steps: int) -> bool:
    """Whether a run of ``steps`` training steps on ``device`` compiles (``run.compile``)."""
    if choice not in CHOICES:
        raise ValueError(f"run.compile must be {', '.join(CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    return device.type == "cuda" or steps >= CPU_STEPS


def compile_towers(model: nn.Module) -> int:
    """Compile every Transformer block of every tower in ``model`` in place (each block its
    own region); how many blocks."""
    from recsys.models.tower import towers

    blocks = 0
    for tower in towers(model):
        for block in tower.blocks:
            block.compile()
            blocks += 1
    # Each block is its own module: raise the per-function cache past the default 8, so
    # that a deep tower's blocks, each with its static and its dynamic graph, all stay
    # compiled (they share Block.forward's code).
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 4 * blocks + 8)
    return blocks
