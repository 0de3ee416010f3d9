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


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_native_and_numpy_copies_agree(dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    src = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, 1000, dtype=dtype)
    starts, lengths = _runs(rng, len(src), 300)
    expected = np.concatenate([src[a : a + n] for a, n in zip(starts, lengths, strict=True)])
    native = segments.copy_segments(src, starts, lengths, np.empty(lengths.sum(), dtype))
    monkeypatch.setattr(segments, "_LIBRARY", None)
    fallback = segments.copy_segments(src, starts, lengths, np.empty(lengths.sum(), dtype))
    np.testing.assert_array_equal(native, expected)
    np.testing.assert_array_equal(fallback, expected)


def test_int64_values_are_narrowed_into_int32_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    src = rng.integers(0, 2**31, 1000)  # int64 ids that fit
    starts, lengths = _runs(rng, len(src), 300)
    expected = np.concatenate([src[a : a + n] for a, n in zip(starts, lengths, strict=True)])
    native = segments.copy_segments(src, starts, lengths, np.empty(lengths.sum(), np.int32))
    monkeypatch.setattr(segments, "_LIBRARY", None)
    fallback = segments.copy_segments(src, starts, lengths, np.empty(lengths.sum(), np.int32))
    for out in (native, fallback):
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, expected)


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


def _scatter(src, starts, lengths, batch_of, sizes, chunks=2, dtype=None):
    """Outputs (of ``dtype``, by default the source's) of a Scatter fed in ``chunks``
    successive calls: runs into two columns per batch (the same runs twice)."""
    runs = [np.full(2 * size + 3, -7, dtype or src.dtype) for size in sizes]  # room to spare
    into_runs = segments.Scatter(runs, sizes, 2)
    for part in np.array_split(np.arange(len(starts)), chunks):
        for column in (0, 1):
            into_runs.segments(src, starts[part], lengths[part], batch_of[part], column)
    assert all((r[2 * size :] == -7).all() for r, size in zip(runs, sizes, strict=True))
    return runs, into_runs.full()


@pytest.mark.parametrize(
    "dtype, out", [(np.int64, np.int64), (np.int32, np.int32), (np.int64, np.int32)]
)
def test_scatter_appends_each_row_to_its_batch_in_order(
    dtype: type, out: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies of one type, and int64 ids narrowed into int32 batches (values that fit)."""
    rng = np.random.default_rng(1)
    src = rng.integers(np.iinfo(out).min, np.iinfo(out).max, 1000, dtype=dtype)
    starts, lengths = _runs(rng, len(src), 300)
    batch_of = rng.integers(-1, 4, 300)  # -1: rows not read
    expected = [
        np.concatenate(
            [src[starts[i] : starts[i] + lengths[i]] for i in np.flatnonzero(batch_of == b)]
        )
        for b in range(4)
    ]
    sizes = [len(e) for e in expected]
    native = _scatter(src, starts, lengths, batch_of, sizes, dtype=out)
    monkeypatch.setattr(segments, "_LIBRARY", None)
    fallback = _scatter(src, starts, lengths, batch_of, sizes, dtype=out)
    for runs, full in (native, fallback):
        assert full and all(r.dtype == out for r in runs)
        for b in range(4):
            np.testing.assert_array_equal(runs[b][: 2 * sizes[b]], np.tile(expected[b], 2))
    # A batch left short is reported, not handed out.
    scatter = segments.Scatter([np.empty(size + 1, out) for size in sizes], np.add(sizes, 1))
    scatter.segments(src, starts, lengths, batch_of)
    assert not scatter.full()
    # Values are never converted otherwise: a source of another type is refused.
    with pytest.raises(ValueError, match="src must be 1-D"):
        scatter.segments(src.astype(np.int16), starts, lengths, batch_of)
    wide = segments.Scatter([np.empty(4, np.int64)], [4])  # int32 is never widened
    with pytest.raises(ValueError, match="src must be 1-D"):
        wide.segments(np.arange(4, dtype=np.int32), np.array([0]), np.array([4]), np.array([0]))
    with pytest.raises(ValueError, match="all int64 or all int32"):
        segments.Scatter([np.empty(2, np.int64), np.empty(2, np.int32)], [1, 1])


@pytest.mark.parametrize("native", [True, False], ids=["helper", "numpy"])
def test_scatter_refuses_rows_outside_the_source_or_their_batch(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not native:
        monkeypatch.setattr(segments, "_LIBRARY", None)
    src = np.arange(10, dtype=np.int64)
    cases = [  # starts, lengths, batch_of, output sizes
        ([8], [3], [0], [3]),  # past the end of the source
        ([-1], [2], [0], [2]),  # negative start
        ([0], [-1], [0], [0]),  # negative length
        ([2**62], [2**62], [0], [0]),  # would overflow start + length
        ([0, 2], [2, 2], [0, 0], [3]),  # overflows its batch's output
        ([0], [2], [1], [2]),  # a batch past the last
    ]
    for starts, lengths, batch_of, sizes in cases:
        scatter = segments.Scatter([np.empty(s, np.int64) for s in sizes], sizes)
        with pytest.raises(IndexError, match="scatter: row"):
            scatter.segments(src, np.array(starts), np.array(lengths), np.array(batch_of))
    # Column 0 of a batch of two columns must not run into column 1.
    two = segments.Scatter([np.empty(4, np.int64)], [2], columns=2)
    with pytest.raises(IndexError, match="scatter: row"):
        two.segments(src, np.array([0]), np.array([3]), np.array([0]))
    one = segments.Scatter([np.empty(1, np.int64)], [1])
    with pytest.raises(IndexError, match="one per row"):
        one.segments(src, np.array([0]), np.array([1, 1]), np.array([0]))
    with pytest.raises(IndexError, match="no column 1"):
        one.segments(src, np.array([0]), np.array([1]), np.array([0]), column=1)
    with pytest.raises(ValueError, match="too short"):
        segments.Scatter([np.empty(3, np.int64)], [2], columns=2)


def test_a_helper_of_another_calling_convention_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert segments._load() is not None
    monkeypatch.setattr(segments, "ABI", segments.ABI + 1)  # as if the build were stale
    assert segments._load() is None
