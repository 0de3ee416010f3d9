"""Damaged checkpoints and weights are named, never loaded: bytes changed in place (bit rot) are
found by the manifest's checksums, a truncated file is one error naming it, a full disk during a
save is one error and the run resumes once space is back, and ``export`` keeps existing files.

Single process, no process group, a tiny module: each test takes well under a second."""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystem

from recsys.checkpoint import manager as manager_module
from recsys.checkpoint import manifest
from recsys.checkpoint.manager import CheckpointError, CheckpointManager
from recsys.checkpoint.weights import load_weights, named_weights, save_weights
from recsys.cli import main
from recsys.errors import guarded


class Tiny(nn.Module):
    """Every weight is ``value``, so its bytes are easy to find in a saved file."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((32, 8), value))
        self.bias = nn.Parameter(torch.full((8,), value))


def rot(directory: Path, value: float) -> Path:
    """Overwrite one float ``value`` inside the saved tensor data of ``directory``, keeping the
    file's size (what bit rot does); the damaged file."""
    pattern = struct.pack("<f", value) * 4
    for file in sorted(directory.glob("*.distcp")):
        data = bytearray(file.read_bytes())
        at = data.find(pattern)
        if at >= 0:
            data[at : at + 4] = struct.pack("<f", -value)
            file.write_bytes(bytes(data))
            return file
    raise AssertionError(f"no saved {value} in {directory}")


def test_bit_rot_in_the_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "checkpoint"
    manager = CheckpointManager(directory, keep=3)
    manager.save(1, {"model": Tiny(1.5)})
    manager.save(2, {"model": Tiny(2.5)})
    assert json.loads((directory / "step-00000002" / "manifest.json").read_text())["files"]
    damaged = rot(directory / "step-00000002", 2.5)

    resumed = Tiny(0.0)
    with caplog.at_level(logging.WARNING):
        path = CheckpointManager(directory).load({"model": resumed})
    assert path.name == "step-00000001"
    assert torch.equal(resumed.weight, torch.full((32, 8), 1.5))
    assert f"{damaged}: checksum mismatch (bit rot or overwritten): expected crc32" in caplog.text
    assert (directory / ".step-00000002.broken").is_dir()


def test_bit_rot_in_weights_is_named_by_load_weights(tmp_path: Path) -> None:
    weights = tmp_path / "stage" / "weights"
    save_weights(Tiny(1.5), weights)
    damaged = rot(weights, 1.5)
    with pytest.raises(CheckpointError) as err:
        load_weights(Tiny(0.0), weights, named_weights(Tiny(0.0)))
    assert str(err.value).startswith(f"{damaged}: checksum mismatch (bit rot or overwritten): ")


def test_a_truncated_weights_file_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = tmp_path / "weights"
    save_weights(Tiny(1.5), weights)
    (data,) = weights.glob("*.distcp")
    data.write_bytes(data.read_bytes()[:100])
    model = Tiny(0.0)
    code = guarded(lambda: load_weights(model, weights, named_weights(model)), "finetune")
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"finetune: {data}: truncated (100 bytes") and err.count("\n") == 1


def test_checkpoint_ls_of_a_rotted_checkpoint_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    directory = tmp_path / "checkpoint"
    CheckpointManager(directory).save(1, {"model": Tiny(1.5)})
    assert main(["checkpoint", "ls", str(directory)]) == 0
    capsys.readouterr()
    damaged = rot(directory / "step-00000001", 1.5)
    assert main(["checkpoint", "ls", str(directory)]) != 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"recsys checkpoint: {damaged}: checksum mismatch")
    assert err.count("\n") == 1


@contextmanager
def _full(self, path, mode):
    """``FileSystem.create_stream`` on a full disk: the file opens, no byte can be written."""
    with open(path, mode) as stream:

        class Full:
            def __getattr__(self, name):
                return getattr(stream, name)

            def write(self, data) -> int:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        yield Full()


def test_a_full_disk_during_a_save_is_one_error_and_the_run_resumes_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "checkpoint"
    manager = CheckpointManager(directory, keep=3)
    manager.save(1, {"model": Tiny(1.5)})
    with monkeypatch.context() as patch:
        patch.setattr(FileSystem, "create_stream", _full)
        with pytest.raises(CheckpointError) as err:
            manager.save(2, {"model": Tiny(2.5)})
    assert str(err.value) == (
        f"{directory}: cannot save the checkpoint of step 2: no space left on device"
    )
    # The failed save gave its space back; the run resumes from the last good checkpoint.
    assert [p.name for p in directory.iterdir()] == ["step-00000001"]
    resumed = Tiny(0.0)
    assert CheckpointManager(directory).load({"model": resumed}).name == "step-00000001"
    assert torch.equal(resumed.bias, torch.full((8,), 1.5))
    # A save killed half-way leaves its temporary directory; the next save clears every one.
    for stale in (".step-00000002.tmp", ".step-00000007.tmp"):
        (directory / stale).mkdir()
        (directory / stale / "__0_0.distcp").write_bytes(b"partial")
    manager.save(2, {"model": Tiny(2.5)})
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000001", "step-00000002"]
    assert CheckpointManager(directory).load({"model": resumed}).name == "step-00000002"
    assert torch.equal(resumed.bias, torch.full((8,), 2.5))


@contextmanager
def _short(self, path, mode):
    """``FileSystem.create_stream`` on a disk that fills up under torch.save's zip writer,
    which then fails with a RuntimeError (as a 2^25-row table's save did on a real full disk),
    not with the OSError behind it."""
    with open(path, mode) as stream:

        class Short:
            def __getattr__(self, name):
                return getattr(stream, name)

            def write(self, data) -> int:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

        yield Short()


def test_a_save_that_fails_on_a_full_disk_without_an_os_error_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "checkpoint"
    manager = CheckpointManager(directory)
    monkeypatch.setattr(FileSystem, "create_stream", _short)
    with monkeypatch.context() as patch:  # a disk with room: the failure is passed on as it is
        patch.setattr(manager_module, "_free_bytes", lambda directory: 10 * 1024**3)
        with pytest.raises(BaseException) as err:
            manager.save(1, {"model": Tiny(1.5)})
        assert not isinstance(err.value, CheckpointError)
    monkeypatch.setattr(manager_module, "_free_bytes", lambda directory: 4096)
    with pytest.raises(CheckpointError) as err:
        manager.save(1, {"model": Tiny(1.5)})
    assert str(err.value) == (
        f"{directory}: cannot save the checkpoint of step 1: no space left on device "
        f"(4,096 bytes free on the disk that holds {directory / '.step-00000001.tmp'})"
    )
    assert not directory.exists() or not any(directory.iterdir())


def test_a_full_disk_while_saving_weights_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FileSystem, "create_stream", _full)
    with pytest.raises(CheckpointError, match=r"weights: cannot save the weights: no space left"):
        save_weights(Tiny(1.5), tmp_path / "weights")


def test_export_keeps_an_existing_file_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    directory = tmp_path / "checkpoint"
    CheckpointManager(directory).save(1, {"model": Tiny(1.5)})
    out = tmp_path / "one.pt"
    out.write_bytes(b"keep me")
    assert main(["checkpoint", "export", str(directory), str(out)]) != 0
    assert capsys.readouterr().err == (
        f"recsys checkpoint: {out}: exists already; pass --force to replace it\n"
    )
    assert out.read_bytes() == b"keep me"
    assert main(["checkpoint", "export", "--force", str(directory), str(out)]) == 0
    assert torch.load(out, weights_only=False)["model"]["bias"].eq(1.5).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary
    # An OUT that cannot be written is one line naming it.
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    for bad, reason in [("a-dir", "is a directory"), ("a-file/one.pt", "not a directory")]:
        capsys.readouterr()
        assert main(["checkpoint", "export", str(directory), str(tmp_path / bad)]) != 0
        err = capsys.readouterr().err
        assert err.endswith(f": {reason}\n") and err.count("\n") == 1, err


def test_a_checkpoint_without_a_manifest_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "checkpoint"
    CheckpointManager(directory).save(1, {"model": Tiny(1.5)})
    (directory / "step-00000001" / manifest.MANIFEST).unlink()  # as an older version wrote it
    resumed = Tiny(0.0)
    with caplog.at_level(logging.WARNING):
        assert CheckpointManager(directory).load({"model": resumed}).name == "step-00000001"
    assert torch.equal(resumed.weight, torch.full((32, 8), 1.5))
    assert "step-00000001: no manifest.json (written by an older version)" in caplog.text


def test_the_ranks_share_the_checksums_by_size() -> None:
    files = {name: {"size": size, "crc32": "0"} for name, size in [("a", 9), ("b", 5), ("c", 4)]}
    shares = [manifest.share(files, rank, 2) for rank in range(2)]
    assert shares == [["a"], ["b", "c"]]
    assert manifest.share(files, 0, 1) == ["a", "b", "c"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_diverged_are_not_saved(tmp_path: Path, value: float) -> None:
    """What a stage hands on is finite: a diverged model leaves no weights/ to build on."""
    model = Tiny(1.5)
    with torch.no_grad():
        model.weight[31, 7] = value
    with pytest.raises(CheckpointError, match=r"not saved: dense/weight holds NaN or infinite"):
        save_weights(model, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()
