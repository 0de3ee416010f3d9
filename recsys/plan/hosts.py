"""Host presets and the TorchRec ``Topology`` a plan is made for.

This module owns what a rank of a cluster can hold: HBM per accelerator, host memory (DDR)
shared by the ranks of a host, accelerators per host and the interconnect bandwidths the
planner's cost model uses. Presets name the hosts users rent; every figure can be overridden
with explicit numbers.

Figures are the vendors' public specifications: A100 SXM 40 GB and 80 GB (NVLink 600 GB/s),
H100 SXM 80 GB (NVLink 900 GB/s); host memory and network as on AWS p4d.24xlarge (8× A100
40 GB, 1152 GiB, 400 Gb/s EFA), p4de.24xlarge (8× A100 80 GB, 1152 GiB, 400 Gb/s) and
p5.48xlarge (8× H100 80 GB, 2048 GiB, 3200 Gb/s).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from recsys.errors import UserError

GB = 1024**3
"""Bytes per GiB: the planner's and this tool's "GB"."""

MAX_WORLD_SIZE = 65536
"""The most ranks a plan is made for: TorchRec's planner takes about 3 ms per rank on a CPU
(32,768 ranks: 100 s), and its topology holds one record per rank."""

MAX_MEMORY_GB = (2**63 - 1) / GB
"""The most memory a rank is given, in GB: 2^63 - 1 bytes (8 EiB), what a byte count in
int64 holds."""


class ClusterError(UserError, ValueError):
    """A job shape or a memory figure that cannot be planned for; the message names the
    option."""


@dataclass(frozen=True)
class Host:
    """One kind of host."""

    name: str
    device: str
    """``cuda`` or ``cpu``: where the tables' compute runs."""
    hbm_gb: float
    """Accelerator memory per rank (0 on CPU hosts)."""
    ddr_gb: float
    """Host memory, shared by the host's ranks."""
    ranks_per_host: int
    intra_host_gbps: float
    """Accelerator-to-accelerator bandwidth inside a host, GB/s."""
    inter_host_gbps: float
    """Network bandwidth per host, GB/s."""

    @property
    def ddr_gb_per_rank(self) -> float:
        return self.ddr_gb / self.ranks_per_host


HOSTS = {
    "a100-40gb": Host("a100-40gb", "cuda", 40, 1152, 8, 600, 50),
    "a100-80gb": Host("a100-80gb", "cuda", 80, 1152, 8, 600, 50),
    "h100-80gb": Host("h100-80gb", "cuda", 80, 2048, 8, 900, 400),
    "cpu": Host("cpu", "cpu", 0, 128, 1, 25, 12.5),
}
"""Presets by name (``--host``)."""


@dataclass(frozen=True)
class Cluster:
    """The ranks a plan is made for."""

    host: Host
    world_size: int
    local_world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(
                f"ranks per host must lie in [1, {self.world_size}], got {self.local_world_size}"
            )
        if self.world_size % self.local_world_size:
            raise ValueError(
                f"world size {self.world_size} is not a whole number of hosts of "
                f"{self.local_world_size} ranks"
            )

    @property
    def hbm_bytes(self) -> int:
        """HBM of one rank."""
        return int(self.host.hbm_gb * GB) if self.host.device == "cuda" else 0

    @property
    def ddr_bytes(self) -> int:
        """Host memory of one rank (the host's, shared by its ranks)."""
        return int(self.host.ddr_gb * GB / self.local_world_size)

    def topology(self):
        """The TorchRec ``Topology`` of these ranks."""
        from torchrec.distributed.planner import Topology

        return Topology(
            world_size=self.world_size,
            compute_device=self.host.device,
            hbm_cap=self.hbm_bytes,
            ddr_cap=self.ddr_bytes,
            local_world_size=self.local_world_size,
            intra_host_bw=self.host.intra_host_gbps * GB / 1000,  # bytes/ms, as TorchRec
            inter_host_bw=self.host.inter_host_gbps * GB / 1000,
        )

    def describe(self) -> str:
        hosts = self.world_size // self.local_world_size
        memory = f"{self.host.hbm_gb:g} GB HBM, " if self.host.device == "cuda" else ""
        return (
            f"{self.world_size} ranks = {hosts} × {self.local_world_size} on {self.host.name} "
            f"({memory}{self.ddr_bytes / GB:g} GB DDR per rank)"
        )


def cluster(
    host: str = "a100-40gb",
    *,
    world_size: int | None = None,
    job: str | None = None,
    device: str | None = None,
    hbm_gb: float | None = None,
    ddr_gb: float | None = None,
) -> Cluster:
    """The ranks of ``host`` hosts given by ``job`` (``NNODESxNPROC``, TorchX's ``-j``) or
    ``world_size`` (filling hosts of the preset's size), with overrides."""
    if host not in HOSTS:
        raise ClusterError(f"unknown host {host!r}; presets: {', '.join(HOSTS)}")
    preset = HOSTS[host]
    if device is not None:
        if device not in ("cuda", "cpu"):
            raise ClusterError(f"device must be cuda or cpu, got {device!r}")
        if device != preset.device:
            preset = replace(preset, device=device)
    if hbm_gb is not None:
        preset = replace(preset, hbm_gb=_memory("--hbm-gb", hbm_gb))
    if ddr_gb is not None:
        preset = replace(preset, ddr_gb=_memory("--ddr-gb", ddr_gb))
    if world_size is not None:
        _ranks("--world-size", world_size)
    if job is not None:
        if world_size is not None:
            raise ClusterError("give the job shape (-j NNODESxNPROC) or --world-size, not both")
        match = re.fullmatch(r"(\d+)x(\d+)", job)
        if not match:
            raise ClusterError(f"-j {job!r}: expected NNODESxNPROC, e.g. 4x8")
        nodes, procs = int(match[1]), int(match[2])
        if nodes < 1 or procs < 1:
            raise ClusterError(f"-j {job!r}: nodes and processes must be >= 1")
        _ranks(f"-j {job}", nodes * procs)
        return Cluster(preset, nodes * procs, procs)
    world = world_size or preset.ranks_per_host
    local = min(world, preset.ranks_per_host)
    if world % local:
        raise ClusterError(
            f"--world-size {world} is not a whole number of {host} hosts of "
            f"{preset.ranks_per_host} ranks; give -j NNODESxNPROC"
        )
    return Cluster(preset, world, local)


def _memory(option: str, gb: float) -> float:
    """A memory figure in GB: finite, > 0, at most :data:`MAX_MEMORY_GB`."""
    if not math.isfinite(gb):
        raise ClusterError(f"{option} must be a finite number > 0, got {gb:g}")
    if gb <= 0:
        raise ClusterError(f"{option} must be > 0, got {gb:g}")
    if gb > MAX_MEMORY_GB:
        raise ClusterError(
            f"{option} {gb:g}: at most {MAX_MEMORY_GB:,.0f} GB (2^63 - 1 bytes, what a byte "
            "count in int64 holds)"
        )
    return gb


def _ranks(option: str, ranks: int) -> None:
    """A number of ranks in [1, :data:`MAX_WORLD_SIZE`]."""
    if ranks < 1:
        raise ClusterError(f"{option} must be >= 1, got {ranks}")
    if ranks > MAX_WORLD_SIZE:
        raise ClusterError(
            f"{option}: {ranks:,} ranks; plans are made for at most {MAX_WORLD_SIZE:,} "
            "(TorchRec's planner takes about 3 ms per rank)"
        )
