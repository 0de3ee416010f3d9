"""Sharding plans for the TorchRec embedding modules of a model, addressed by table name.

This module owns turning "table → sharding type" into a TorchRec ``ShardingPlan`` for every
``EmbeddingCollection`` / ``EmbeddingBagCollection`` inside a model, by hand
(:func:`manual_plan`) or with TorchRec's planner under per-table constraints
(:func:`planned`, :func:`run_planner`). It does not apply the plan
(``DistributedModelParallel`` does) nor read or write plan files (``recsys.plan``).

On CPU, an ``EmbeddingCollection`` shards only with the fused compute kernel (the dense
kernel crashes), so ``fused`` is the default kernel here for every sharding type.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    column_wise,
    construct_module_sharding_plan,
    get_module_to_default_sharders,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan

from recsys.errors import UserError

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
"""Sharding types a manual plan may name; all three work on CPU with the fused kernel."""


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The shardable TorchRec embedding modules of ``model``, by module path."""
    shardable = tuple(get_module_to_default_sharders())
    return {path: m for path, m in model.named_modules() if isinstance(m, shardable)}


def table_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The tables of one TorchRec embedding module, by table name."""
    sharder = get_module_to_default_sharders()[type(module)]
    return dict(sharder.shardable_parameters(module))


def table_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every table of ``model``'s TorchRec embedding modules, by table name (the tables
    TorchRec places: int8 frozen tables place themselves, ``recsys.distributed.rowwise_int8``)."""
    return {
        name: weight
        for module in embedding_modules(model).values()
        for name, weight in table_parameters(module).items()
    }


def column_blocks(dim: int, world_size: int) -> int:
    """How many column blocks a table of width ``dim`` is cut into on ``world_size`` ranks.

    The most blocks, at most one per rank, that divide ``dim`` evenly into widths that are
    multiples of 4 (TorchRec's kernels want widths in multiples of 4); 1 when none does.
    """
    for blocks in range(min(world_size, dim // 4), 0, -1):
        if dim % blocks == 0 and (dim // blocks) % 4 == 0:
            return blocks
    return 1


def manual_plan(
    model: nn.Module,
    sharding: Mapping[str, str],
    *,
    world_size: int,
    local_world_size: int | None = None,
    device_type: str = "cpu",
    compute_kernel: str = "fused",
) -> ShardingPlan:
    """A plan that shards each table of ``model`` the way ``sharding`` names it.

    ``sharding`` maps every table name to one of :data:`SHARDING_TYPES`. Table-wise tables
    are placed round-robin over the ranks in the order given; column-wise tables are cut into
    :func:`column_blocks` equal blocks placed on ranks 0, 1, ... The model may live on the
    meta device. Table names must be unique across the model's embedding modules.
    """
    modules = embedding_modules(model)
    tables: dict[str, str] = {}
    dims: dict[str, int] = {}
    for path, module in modules.items():
        for name, weight in table_parameters(module).items():
            if name in tables:
                raise ValueError(
                    f"table {name!r} is in both {tables[name]!r} and {path!r}; "
                    "plans address tables by name, so names must be unique"
                )
            tables[name], dims[name] = path, weight.shape[1]
    unknown = sorted(set(sharding) - set(tables))
    if unknown:
        raise ValueError(
            f"sharding names tables the model does not have: {unknown}; "
            f"the model's tables are {sorted(tables)}"
        )
    missing = sorted(set(tables) - set(sharding))
    if missing:
        raise ValueError(f"sharding gives no sharding type for tables {missing}")
    bad = {name: kind for name, kind in sharding.items() if kind not in SHARDING_TYPES}
    if bad:
        raise ValueError(f"unknown sharding types {bad}; expected one of {SHARDING_TYPES}")

    local_world_size = local_world_size or world_size
    generators: dict[str, dict[str, ParameterShardingGenerator]] = {}
    for index, (name, kind) in enumerate(sharding.items()):
        if kind == "table_wise":
            generator = table_wise(rank=index % world_size, compute_kernel=compute_kernel)
        elif kind == "row_wise":
            generator = row_wise(compute_kernel=compute_kernel)
        else:
            blocks = column_blocks(dims[name], world_size)
            generator = column_wise(
                size_per_rank=[dims[name] // blocks] * blocks, compute_kernel=compute_kernel
            )
        generators.setdefault(tables[name], {})[name] = generator
    return ShardingPlan(
        {
            path: construct_module_sharding_plan(
                modules[path],
                per_table,
                local_size=local_world_size,
                world_size=world_size,
                device_type=device_type,
            )
            for path, per_table in generators.items()
        }
    )


def constraints_for(
    model: nn.Module,
    sharding_types: Mapping[str, list[str]] | None = None,
    compute_kernels: tuple[str, ...] = ("fused",),
) -> dict:
    """TorchRec ``ParameterConstraints`` for every table of ``model``: the sharding types
    ``sharding_types`` allows it (all of :data:`SHARDING_TYPES` when it names none), the
    given compute kernels."""
    from torchrec.distributed.planner import ParameterConstraints

    modules = embedding_modules(model)
    tables = [name for m in modules.values() for name in table_parameters(m)]
    chosen = dict(sharding_types or {})
    unknown = sorted(set(chosen) - set(tables))
    if unknown:
        raise ValueError(
            f"sharding_types names tables the model does not have: {unknown}; "
            f"the model's tables are {sorted(tables)}"
        )
    bad = {n: t for n, types in chosen.items() for t in types if t not in SHARDING_TYPES}
    if bad:
        raise ValueError(f"unknown sharding types {bad}; expected one of {SHARDING_TYPES}")
    return {
        name: ParameterConstraints(
            sharding_types=list(chosen.get(name, SHARDING_TYPES)),
            compute_kernels=list(compute_kernels),
        )
        for name in tables
    }


class NoPlan(UserError, RuntimeError):
    """TorchRec's planner found no plan that fits the job's ranks."""


def run_planner(model: nn.Module, topology, constraints: dict, batch_size: int | None = None):
    """TorchRec's planner on ``model`` (which may live on the meta device) for ``topology``:
    the ``ShardingPlan`` and the chosen ``ShardingOption`` of every table (its shards with
    ranks, sizes and the planner's storage estimates). Raises TorchRec's ``PlannerError``
    when no plan fits."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=constraints, batch_size=batch_size, debug=False
    )
    sharders = list(get_module_to_default_sharders().values())
    plan = planner.plan(model, sharders)
    return plan, planner.get_selected_options()


def planned(
    model: nn.Module,
    *,
    world_size: int,
    local_world_size: int | None = None,
    device_type: str = "cpu",
    sharding_types: Mapping[str, list[str]] | None = None,
    batch_size: int | None = None,
) -> ShardingPlan:
    """A plan from TorchRec's planner for ``model``'s tables on this job's ranks.

    ``sharding_types`` constrains tables by name (e.g. ``{"item": ["row_wise"]}``); tables
    not named may take any of :data:`SHARDING_TYPES`. Every table uses the fused kernel (on
    CPU the only one EmbeddingCollection shards with). Run by every rank, it gives the same
    plan everywhere (``plan`` is deterministic for a model and topology).
    """
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.planner.types import PlannerError

    topology = Topology(
        world_size=world_size,
        compute_device=device_type,
        local_world_size=local_world_size or world_size,
    )
    constraints = constraints_for(model, sharding_types)
    try:
        plan, _ = run_planner(model, topology, constraints, batch_size)
    except PlannerError as err:
        said = " ".join(str(err).split())
        raise NoPlan(
            f"no sharding plan fits this model's tables on {world_size} {device_type} rank(s) "
            f"(TorchRec's planner: {said[:300]}); `recsys plan` with the same config shows "
            "what each rank would hold and what would fit"
        ) from None
    return plan
