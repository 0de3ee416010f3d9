"""Slabs are reused only once every array carved from them is gone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.data.memory import Slabs


def _slabs() -> Slabs:
    slabs = Slabs()
    slabs.SLAB = 1000  # ten arrays of 100 per slab
    return slabs


def test_a_slab_is_reused_only_when_nothing_carved_from_it_is_alive() -> None:
    slabs = _slabs()
    kept = slabs.empty(100)
    kept[:] = 7
    for _ in range(9):
        slabs.empty(100)
    held = torch.from_numpy(slabs.empty(100)[:10])  # a tensor over a view of the second slab
    held[:] = 8
    owners = set()
    for _ in range(200):  # every later array is dropped at once: its slab is reused
        out = slabs.empty(100)
        out[:] = -1
        owners.add(out.base.ctypes.data)
    assert (kept == 7).all() and (held == 8).all()
    assert len(owners) <= 3  # a few slabs in turn, not new memory for each
    first = kept.base.ctypes.data
    assert first not in owners
    del kept
    for _ in range(10):  # the next slab switch finds the first slab free
        slabs.empty(100)
    assert first in {slab.ctypes.data for slab in slabs._free}


def test_large_requests_get_their_own_memory() -> None:
    big = _slabs().empty(501)
    assert big.base is None and len(big) == 501
    assert isinstance(big, np.ndarray)


def test_int32_arrays_hold_their_slab_too() -> None:
    slabs = _slabs()
    narrow = slabs.empty(199, np.int32)  # 100 int64s' room
    assert narrow.dtype == np.int32 and len(narrow) == 199
    narrow[:] = 3
    first = narrow.base
    for _ in range(30):  # three slabs' worth, each array dropped at once
        slabs.empty(100)[:] = -1
    assert (narrow == 3).all()
    assert all(slab is not first for slab in slabs._free)
    with pytest.raises(ValueError, match="int64 or int32"):
        slabs.empty(3, np.float32)
