"""benchmarks/table_scale.py on a 1e6-row table for a few steps on 2 gloo ranks, and the
memory-fit check it runs before each size (``recsys.plan.measure``)."""

from __future__ import annotations

import importlib
import re
import time
from pathlib import Path

import pytest

from recsys.plan.measure import (
    MARGIN,
    PROCESS_BYTES,
    RELOAD_PEAK,
    PeakRss,
    TableTooLarge,
    available_bytes,
    check_fits,
    check_reload_fits,
    needed_bytes,
    peak_rss_bytes,
    rss_bytes,
    table_bytes,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/table_scale.py, importable by name (its ranks are spawned processes that
    import the functions they run)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("table_scale")


def test_table_bytes_counts_weights_and_rowwise_state():
    assert table_bytes(1000, 64) == 1000 * 65 * 4
    with pytest.raises(ValueError):
        table_bytes(0, 64)


def test_available_bytes_reads_memavailable():
    text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n"
    assert available_bytes(text) == 2048 * 1024
    with pytest.raises(ValueError, match="MemAvailable"):
        available_bytes("MemTotal: 1 kB\n")
    assert available_bytes() > 0  # this host's


def test_check_fits_passes_and_fails_at_the_boundary():
    need = needed_bytes(2**25, 64, 2)
    assert need == int(2**25 * 65 * 4 * MARGIN) + 2 * PROCESS_BYTES
    assert check_fits(2**25, 64, 2, available=need) == need
    with pytest.raises(TableTooLarge) as err:
        check_fits(2**25, 64, 2, available=need - 1)
    message = str(err.value)
    assert "\n" not in message and "33,554,432 x 64" in message and "GiB" in message


def test_peak_rss_is_positive():
    assert peak_rss_bytes() > 10 * 1024**2


def test_reloading_a_checkpoint_is_checked_against_the_host():
    gib = 1024**3
    need = check_reload_fits(4 * gib, 1, available=64 * gib)
    assert need == int(4 * gib * RELOAD_PEAK) + PROCESS_BYTES
    with pytest.raises(TableTooLarge, match=r"loading a checkpoint of 4\.0 GiB on 1 rank"):
        check_reload_fits(4 * gib, 1, available=need - 1)


def test_peak_rss_sees_a_later_phase_below_an_earlier_peak():
    import torch

    with PeakRss() as watch:
        block = torch.ones(64 * 1024**2 // 4)  # 64 MiB, touched
        time.sleep(0.2)  # many sampling intervals, on a busy host too
        del block
    assert watch.peak >= rss_bytes() + 48 * 1024**2


def test_benchmark_stops_before_a_table_the_host_cannot_hold(bench, tmp_path):
    with pytest.raises(SystemExit) as err:
        bench.main(["--sizes", "2**40", "--data", str(tmp_path), "--runs", str(tmp_path)])
    assert str(err.value).startswith("table_scale: item table 1,099,511,627,776 x 64")
    assert not any(tmp_path.iterdir())  # nothing generated


def test_parse_sizes(bench):
    assert bench.parse_sizes("1e5, 1e6,2**25,7") == [100_000, 1_000_000, 2**25, 7]
    with pytest.raises(Exception, match="whole number"):
        bench.parse_sizes("1.5")


@pytest.mark.dist
@pytest.mark.slow
def test_table_scale_on_a_million_rows(bench, tmp_path, capsys):
    summary = bench.main(
        ["--sizes", "1000000", "--steps", "3", "--warmup", "2", "--users", "3000",
         "--items", "1000000", "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs")]
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == summary
    match = re.fullmatch(
        r"table_scale: rows=(\d+) rss_over_plan=([\d.]+) step_time_ratio=([\d.]+)", summary
    )
    assert match and int(match[1]) == 1_000_000 and float(match[2]) > 0
    assert float(match[3]) == 1.0  # one size: its own ratio
    head = re.fullmatch(
        r"rows=1,000,000 row_wise: step ([\d.]+) ms, rows touched/step ([\d,]+), checkpoint "
        r"save ([\d.]+) s ([\d,.]+) MiB load ([\d.]+) s",
        lines[-6],
    )
    assert head, lines[-6]
    assert float(head[1]) > 0 and 0 < int(head[2].replace(",", "")) <= 2 * 256 * 51
    # The checkpoint (both ranks' files) holds at least the weights (fp32 × 64).
    assert float(head[4].replace(",", "")) * 1024**2 >= 1_000_000 * 64 * 4
    ranks = [
        re.fullmatch(
            r"  rank (\d): peak RSS ([\d,]+) MiB \(before the first step [\d,]+\), planned "
            r"([\d,.]+) MiB, measured/planned ([\d.]+) \(not in the plan: (-?[\d,]+) MiB\); "
            r"checkpointing [\d,]+ MiB, planned [\d,.]+ MiB \([\d.]+\)",
            line,
        )
        for line in lines[-5:-3]
    ]
    for rank in ranks:
        assert rank, lines[-5:-3]
        rss, planned = float(rank[2].replace(",", "")), float(rank[3].replace(",", ""))
        # The plan holds each rank's half of the table and its row-wise Adagrad state, and the
        # rest of the rank (runtime, dense state, activations: recsys.plan.process).
        assert rss > 0 and planned >= 1_000_000 * 65 * 4 / 2 / 1024**2 + 500
        assert float(rank[4]) == pytest.approx(rss / planned, rel=0.01)
    assert re.fullmatch(
        r"rows=1,000,000: checkpoint of 2 ranks \(row_wise\) loaded on 1 rank\(s\) "
        r"\(row_wise\) in [\d.]+ s, peak RSS [\d,]+ MiB, weights the same",
        lines[-3],
    ), lines[-3]
    assert re.fullmatch(
        r"rows=1,000,000: checkpoint of 2 ranks \(row_wise\) loaded on 2 rank\(s\) "
        r"\(table_wise\) in [\d.]+ s, peak RSS [\d,]+, [\d,]+ MiB, weights the same",
        lines[-2],
    ), lines[-2]
