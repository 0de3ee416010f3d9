"""Sharding a model: a meta-device model and a plan → ``DistributedModelParallel``.

This module owns the one call every job makes to place a model on its ranks: TorchRec shards
the embedding tables as the plan says (allocating only each rank's shards) and wraps the
dense part in DDP. Optimizers fused into backward must be attached before
(``recsys.train.optim.attach_sparse_optimizer``).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from recsys.distributed.env import DistEnv


def shard(model: nn.Module, plan: ShardingPlan, env: DistEnv) -> DistributedModelParallel:
    """``model`` sharded over the default process group under ``plan``."""
    return DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=env.device,
        plan=plan,
    )
