"""What ranks do when their batches run out unevenly: training stops together, evaluation
scores every batch.

This module owns the two rules. Every training step and every forward of a sharded model is
collective, so each rank takes every step with all the others, and the ranks agree at each
step, in one all-reduce, on which of them still have a batch (:func:`_poll`). The rules
differ because their goals do:

- training (:func:`while_every_rank_has`) stops every rank at the first step some rank has
  no batch for: a rank cannot train on a batch again (the weights would change), and the
  other ranks' remaining batches of the epoch are left out. The stream sizes every rank's
  share to the same number of batches, so this happens only when rows of bad row groups were
  skipped;
- evaluation (:func:`until_every_rank_is_done`) must score every sample once: a rank that
  has run out repeats its last batch, unscored, until every rank is done. A rank that has
  had no batch at all has nothing to repeat: every rank stops there (logged).

Without a process group, a rank's own batches are all there is: both rules yield them all.
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
    """Which ranks have a batch for this step."""

    any_has: bool
    every_has: bool
    one_never_had: bool
    """A rank has had no batch at all so far."""


def _poll(batch: Any | None, last: Any | None) -> _Poll:
    """What every rank knows after this rank drew ``batch`` (None: it has run out), ``last``
    being its last batch so far: one all-reduce when distributed."""
    has, never = batch is not None, last is None
    if not dist.is_initialized():
        return _Poll(has, has, never)
    flags = torch.tensor([int(has), int(not has), int(never)], device=collective_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return _Poll(bool(flags[0]), not flags[1], bool(flags[2]))


def while_every_rank_has(batches: Iterator) -> Iterator:
    """Training's rule: this rank's batches while every rank still has one; every rank stops
    at the first step that some rank has no batch for."""
    last = None
    while True:
        batch = next(batches, None)
        last = batch if batch is not None else last
        if not _poll(batch, last).every_has:
            return
        yield batch


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
