"""The compiled segmented copy and its NumPy fallback give the same values."""

from __future__ import annotations

import numpy as np
import pytest

import recsys.data.segments as segments


def _runs(rng: np.random.Generator, src: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(0, 9, n)  # empty runs included
    starts = rng.integers(0, src - 8, n)
    return starts, lengths


def test_the_helper_is_built() -> None:
    # `make setup` compiles it; a NumPy-only install is a fallback, not what we test and ship.
    assert segments.NATIVE


def test_native_and_numpy_copies_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    src = rng.integers(-(2**62), 2**62, 1000)
    starts, lengths = _runs(rng, len(src), 300)
    expected = np.concatenate([src[a : a + n] for a, n in zip(starts, lengths, strict=True)])
    native = segments.copy_segments(src, starts, lengths, np.empty(lengths.sum(), np.int64))
    monkeypatch.setattr(segments, "_LIBRARY", None)
    fallback = segments.copy_segments(src, starts, lengths, np.empty(lengths.sum(), np.int64))
    np.testing.assert_array_equal(native, expected)
    np.testing.assert_array_equal(fallback, expected)


@pytest.mark.parametrize(
    "starts, lengths, out",
    [([995], [6], 6), ([-1], [2], 2), ([0, 4], [3, 3], 5), ([0], [-1], 0)],
    ids=["past the end", "negative start", "output too short", "negative length"],
)
def test_runs_outside_the_arrays_are_refused(starts: list, lengths: list, out: int) -> None:
    src = np.arange(1000, dtype=np.int64)
    with pytest.raises(IndexError, match="outside"):
        segments.copy_segments(
            src, np.array(starts, np.int64), np.array(lengths, np.int64), np.empty(out, np.int64)
        )


@pytest.mark.parametrize("native", [True, False], ids=["helper", "numpy"])
def test_both_paths_refuse_the_same_bad_runs(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not native:
        monkeypatch.setattr(segments, "_LIBRARY", None)
    src = np.arange(10, dtype=np.int64)
    cases = [
        (np.array([8]), np.array([3]), 3),  # past the end
        (np.array([0, 2]), np.array([2]), 2),  # lengths do not match the starts
        (np.array([2**62]), np.array([2**62]), 0),  # would overflow start + length
    ]
    for starts, lengths, size in cases:
        with pytest.raises(IndexError):
            segments.copy_segments(src, starts, lengths, np.empty(size, np.int64))
