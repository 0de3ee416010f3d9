"""A process without torchrun's variables runs as a world of one; bad variables are named."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from recsys.distributed.env import default_backend, distributed

TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_world(no_torchrun: None) -> None:
    with distributed("cpu") as env:
        assert (env.rank, env.world_size, env.backend, env.device.type) == (0, 1, "gloo", "cpu")
        assert env.is_main
        tensor = torch.ones(3)
        dist.all_reduce(tensor)
        assert tensor.tolist() == [1.0, 1.0, 1.0]
    assert not dist.is_initialized()


def test_world_without_rendezvous_is_an_error(
    no_torchrun: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"), distributed("cpu"):
        pass


def test_bad_variable_is_named(no_torchrun: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK='zero' must be an integer"), distributed("cpu"):
        pass


def test_backend_per_device() -> None:
    assert default_backend("cuda") == "nccl"
    assert default_backend("cpu") == "gloo"


def test_existing_group_is_described_and_kept(
    no_torchrun: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with distributed("cpu"):
        monkeypatch.setenv("RANK", "5")  # stale variables must not win over the group
        monkeypatch.setenv("WORLD_SIZE", "8")
        with distributed("cpu") as inner:
            assert (inner.rank, inner.world_size, inner.backend) == (0, 1, "gloo")
        assert dist.is_initialized()
    assert not dist.is_initialized()
