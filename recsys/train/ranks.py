"""What ranks do when their evaluation batches run out unevenly: evaluation scores every
batch.

Every forward of a sharded model is collective, so each rank takes every forward with all
the others, and the ranks agree at each batch, in one all-reduce, on which of them still
have one (:func:`_poll`). Evaluation (:func:`until_every_rank_is_done`) must score every
sample once: a rank that has run out repeats its last batch, unscored, until every rank is
done. A rank that has had no batch at all has nothing to repeat: every rank stops there
(logged). Training's rule (every rank stops at the first step some rank has no batch for) is
the trainer's, agreed once per window of steps (``recsys.train.trainer``).

Without a process group, a rank's own batches are all there is: they are all yielded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from recsys.distributed.env import collective_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Poll:
    """Which ranks have a batch for this forward."""

    any_has: bool
    one_never_had: bool
    """A rank has had no batch at all so far."""


def _poll(batch: Any | None, last: Any | None) -> _Poll:
    """What every rank knows after this rank drew ``batch`` (None: it has run out), ``last``
    being its last batch so far: one all-reduce when distributed."""
    has, never = batch is not None, last is None
    if not dist.is_initialized():
        return _Poll(has, never)
    flags = torch.tensor([int(has), int(never)], device=collective_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return _Poll(bool(flags[0]), bool(flags[1]))


def until_every_rank_is_done(batches: Iterator) -> Iterator[tuple[Any, bool]]:
    """Evaluation's rule: every batch of every rank, with whether to score it. A rank that
    has run out repeats its last batch unscored while the others finish."""
    last = None
    while True:
        batch = next(batches, None)
        last = batch if batch is not None else last
        poll = _poll(batch, last)
        if not poll.any_has:
            return  # every rank is done
        if poll.one_never_had:
            # A rank has had no batch at all, so it cannot take part: stop every rank.
            log.warning("a rank has no evaluation data; evaluation stops at the shortest")
            return
        yield last, batch is not None
