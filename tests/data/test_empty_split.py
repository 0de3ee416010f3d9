"""A split that would have 0 rows is refused before anything is written, naming the split and
the option to change (a dataset of 0 rows cannot be read back)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.cli import main as cli


def refused(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert cli(["data", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_synth_with_too_few_users_for_a_test_split(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "s"
    line = refused(capsys, "synth", "--users", "3", "--out", str(out))
    assert "split ctr_test would have 0 rows" in line
    assert "--test-quantile" in line and "--users" in line
    assert not out.exists()


def test_a_test_quantile_that_leaves_no_test_user(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "s"
    args = ["synth", "--users", "20", "--test-quantile", "0.999", "--out", str(out)]
    line = refused(capsys, *args)
    assert "split ctr_test would have 0 rows" in line and "lower --test-quantile" in line
    assert not out.exists()
