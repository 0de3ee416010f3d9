"""`recsys checkpoint export` never writes inside the checkpoint it reads (nor inside the
stage or run directory named), not even with --force."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from recsys.checkpoint.manager import CheckpointManager
from recsys.cli import main


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((4, 2), 1.5))


def test_out_inside_the_source_is_refused_even_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    directory = tmp_path / "run"
    CheckpointManager(directory).save(1, {"model": Tiny()})
    latest = CheckpointManager(directory).latest()
    assert latest is not None
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    metadata = latest / ".metadata"
    for source, out in (
        (latest, metadata),
        (directory, metadata),
        (directory, directory / "model.pt"),
        (latest, latest),
    ):
        assert main(["checkpoint", "export", "--force", str(source), str(out)]) != 0
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"{out}: lies inside the source" in err and "give an OUT outside it" in err
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before
    out = tmp_path / "model.pt"
    assert main(["checkpoint", "export", str(directory), str(out)]) == 0
    assert torch.load(out, weights_only=False)["model"]["weight"].eq(1.5).all()
