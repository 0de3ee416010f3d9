"""Making a plan offline: a stage's model on the meta device, TorchRec's planner, the result.

This module owns turning "this config, these table sizes, these hosts" into a plan document
(``recsys.plan.planfile``): the model is built on the meta device (no memory for its tables,
whatever their size), the fused table optimizer is attached to the trainable tables so that
the planner counts its state (frozen tables get none), and TorchRec's planner places every
table. When nothing fits, :class:`DoesNotFit` explains why and what would.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from recsys.data.schema import DatasetMeta
from recsys.distributed.planning import constraints_for, run_planner
from recsys.errors import UserError
from recsys.plan.hosts import GB, Cluster
from recsys.stages.config import StageConfig

STAGES = {"pretrain": "seq", "finetune": "ctr"}
"""Stages whose model can be planned, and the dataset kind each reads."""

COMPUTE_KERNELS = ("fused", "fused_uvm_caching", "fused_uvm")
"""Kernels a plan may use: tables in HBM (``fused``, the only one on CPU), in host memory
with an HBM cache (``fused_uvm_caching``) or in host memory (``fused_uvm``)."""


class PlanError(UserError, ValueError):
    """A plan request that cannot be served; the message names the parameter."""


class DoesNotFit(PlanError):
    """No placement of the tables fits the ranks' memory."""


@dataclass(frozen=True)
class Request:
    """What to plan."""

    stage: str = "finetune"
    tables: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    """``--table name=ROWSxDIM`` overrides: rows, and the width when given."""
    frozen: tuple[str, ...] = ()
    sharding_types: dict[str, list[str]] = field(default_factory=dict)
    """Allowed sharding types per table (the config's ``plan.sharding_types`` when empty)."""
    compute_kernels: tuple[str, ...] = ("fused",)
    batch_size: int | None = None
    """Per-rank batch (the config's ``data.batch_size`` when None)."""


def parse_table(text: str) -> tuple[str, tuple[int, int | None]]:
    """``item=4e9x64`` or ``item=4e9`` → ``("item", (4000000000, 64 | None))``."""
    match = re.fullmatch(r"([A-Za-z_][\w]*)=([0-9.eE+_,]+)(?:x(\d+))?", text.strip())
    if not match:
        raise PlanError(f"--table {text!r}: expected NAME=ROWS or NAME=ROWSxDIM, e.g. item=4e9x64")
    name, rows_text, dim = match[1], match[2].replace("_", "").replace(",", ""), match[3]
    try:
        rows = float(rows_text)
    except ValueError:
        raise PlanError(f"--table {text!r}: rows {rows_text!r} is not a number") from None
    if rows < 1 or rows != int(rows):
        raise PlanError(f"--table {text!r}: rows must be a whole number >= 1")
    return name, (int(rows), int(dim) if dim else None)


def vocabularies(config: StageConfig, request: Request) -> DatasetMeta:
    """The tables' sizes: the dataset of ``data.train`` when it is set, then ``--table``.

    Without a dataset, ``--table`` names every table: ``item`` and the side features."""
    from recsys.stages.build import dataset_meta
    from recsys.stages.common import StageError

    kind = STAGES[request.stage]
    rows = {name: r for name, (r, _) in request.tables.items()}
    if config.data.train:
        try:
            meta = dataset_meta(config.data.train, kind, "data.train")
        except StageError as err:
            raise PlanError(str(err)) from None
        known = ["item", *meta.side_features]
        unknown = sorted(set(rows) - set(known))
        if unknown:
            raise PlanError(
                f"--table {', '.join(unknown)}: the dataset {config.data.train} has no such "
                f"table; its tables are {', '.join(known)}"
            )
        vocab = {**meta.vocab, **rows}
        return DatasetMeta(kind=kind, vocab=vocab, side_features=list(meta.side_features))
    if "item" not in rows:
        raise PlanError(
            "no table sizes: set data.train to a dataset, or give every table with "
            "--table NAME=ROWS (at least --table item=ROWS)"
        )
    sides = [n for n in rows if n != "item"]
    return DatasetMeta(kind=kind, vocab=rows, side_features=sides)


def meta_model(config: StageConfig, request: Request) -> nn.Module:
    """The stage's model on the meta device, its trainable tables with the fused optimizer."""
    from recsys.stages import build
    from recsys.train.optim import attach_sparse_optimizer

    if request.stage not in STAGES:
        raise PlanError(f"--stage {request.stage!r}: expected one of {', '.join(STAGES)}")
    meta = vocabularies(config, request)
    width = build.tower(config.model).hidden
    for name, (_, dim) in request.tables.items():
        if dim is not None and dim != width:
            raise PlanError(
                f"--table {name}: width {dim} differs from the model's {width} "
                f"(model.size={config.model.size}); every table is as wide as the model: "
                f"change model.size instead"
            )
    tables = ["item", *meta.side_features]
    unknown = sorted(set(request.frozen) - set(tables))
    if unknown:
        raise PlanError(f"--frozen {', '.join(unknown)}: no such table; tables: {tables}")
    if request.stage == "pretrain":
        model = build.generative_model(config.model, meta)
        if request.frozen:
            raise PlanError("--frozen applies to the finetune model (sparse freezing)")
    else:
        model = build.ctr_model(config.model, meta, frozen=tuple(request.frozen))
    attach_sparse_optimizer(model, config.optim)
    return model


def optimizer_bytes(rows: int, dim: int, element: int, optimizer: str) -> int:
    """Bytes of fused-optimizer state of a ``rows × dim`` block (TorchRec's own estimate:
    row-wise Adagrad keeps one value per row, Adam two per element)."""
    if optimizer == "rowwise_adagrad":
        return rows * element
    if optimizer == "adam":
        return 2 * rows * dim * element
    raise PlanError(f"unknown sparse optimizer {optimizer!r}")


def make(config: StageConfig, request: Request, cluster: Cluster) -> dict:
    """The plan document (``recsys.plan.planfile``'s format) of ``request`` on ``cluster``."""
    from torchrec.distributed.planner.types import PlannerError, PlannerErrorType

    from recsys.plan.planfile import document

    if cluster.host.device == "cpu":
        bad = [k for k in request.compute_kernels if k != "fused"]
        if bad:
            raise PlanError(f"--compute-kernels {','.join(bad)}: CPU ranks run only 'fused'")
    bad = [k for k in request.compute_kernels if k not in COMPUTE_KERNELS]
    if bad:
        raise PlanError(
            f"--compute-kernels {','.join(bad)}: expected some of {', '.join(COMPUTE_KERNELS)}"
        )
    if cluster.host.device == "cuda" and cluster.hbm_bytes <= 0:
        raise PlanError(
            f"cuda ranks of host {cluster.host.name} have no HBM: give --hbm-gb (or a GPU --host)"
        )
    if cluster.ddr_bytes <= 0 and cluster.host.device == "cpu":
        raise PlanError("CPU ranks need host memory: give --ddr-gb > 0")
    model = meta_model(config, request)
    tables = [t.name for t in model.sparse.config.tables]
    if request.sharding_types:
        types = dict(request.sharding_types)
        unknown = sorted(set(types) - {"*", *tables})
        if unknown:
            raise PlanError(
                f"--sharding-types names tables the model does not have: {', '.join(unknown)}; "
                f"its tables are {', '.join(tables)}"
            )
        every = types.pop("*", None)
        if every:
            types = {t: types.get(t, every) for t in tables}
    else:  # the config's constraints, for the tables this model has
        types = {t: v for t, v in config.plan.sharding_types.items() if t in tables}
    try:
        constraints = constraints_for(model, types, request.compute_kernels)
    except ValueError as err:
        raise PlanError(f"--sharding-types: {err}") from None
    batch = request.batch_size or config.data.batch_size
    start = time.perf_counter()
    try:
        _, options = run_planner(model, cluster.topology(), constraints, batch)
    except PlannerError as err:
        placement = (PlannerErrorType.INSUFFICIENT_STORAGE, PlannerErrorType.STRICT_CONSTRAINTS)
        if err.error_type in placement:

            def fits(ranks: Cluster) -> bool:
                try:
                    run_planner(model, ranks.topology(), constraints, batch)
                except PlannerError:
                    return False
                return True

            raise DoesNotFit(explain(model, config, request, cluster, types, fits)) from None
        raise PlanError(f"TorchRec's planner found no plan: {err}") from None
    seconds = time.perf_counter() - start
    return document(
        options,
        model,
        cluster,
        {
            "stage": request.stage,
            "arch": config.model.arch,
            "size": config.model.size,
            "batch_size": batch,
            "sparse_optimizer": config.optim.sparse,
            "compute_kernels": list(request.compute_kernels),
            "sharding_types": {k: list(v) for k, v in sorted(types.items())},
        },
        seconds,
    )


RESERVE = 0.15
"""Share of each rank's memory TorchRec's planner keeps back for the dense part, inputs and
activations (its default storage reservation)."""


def explain(
    model: nn.Module,
    config: StageConfig,
    request: Request,
    cluster: Cluster,
    sharding_types: dict[str, list[str]],
    fits: Callable[[Cluster], bool] | None = None,
) -> str:
    """Why the tables do not fit ``cluster`` and what would: the biggest table and its
    needs, the memory the ranks have, and the changes that would make room."""
    frozen = set(model.sparse.config.frozen)
    optimizer = config.optim.sparse
    needs = {}
    for t in model.sparse.config.tables:
        weights = t.rows * t.dim * 4
        state = 0 if t.name in frozen else optimizer_bytes(t.rows, t.dim, 4, optimizer)
        needs[t.name] = (t, weights, state)
    total = sum(w + s for _, w, s in needs.values())
    kind = "HBM" if cluster.host.device == "cuda" else "DDR"
    per_rank = cluster.hbm_bytes if kind == "HBM" else cluster.ddr_bytes
    usable = per_rank * (1 - RESERVE)
    name, (table, weights, state) = max(needs.items(), key=lambda kv: sum(kv[1][1:]))
    state_name = {"rowwise_adagrad": "row-wise Adagrad", "adam": "Adam"}[optimizer]
    held = cluster.world_size * usable
    lines = [
        f"the tables do not fit {cluster.describe()}"
        + ("." if total * 1.05 > held else " under these constraints (in all, memory suffices)."),
        f"Largest: table {name!r} ({table.rows:,} × {table.dim}, fp32) needs "
        f"{weights / GB:,.1f} GB of weights"
        + (f" + {state / GB:,.1f} GB of {state_name} state" if state else " (frozen)")
        + f"; all tables need {total / GB:,.1f} GB.",
        f"Each rank has {per_rank / GB:,.1f} GB {kind} ({usable / GB:,.1f} GB usable after "
        f"the planner's {RESERVE:.0%} reserve): {cluster.world_size} ranks hold "
        f"{held / GB:,.1f} GB in all.",
        "What would fit:",
    ]
    only_whole = [
        n for n, types in sharding_types.items() if "row_wise" not in types and n in needs
    ]
    too_big = [n for n in only_whole if sum(needs[n][1:]) > usable]
    if too_big:
        lines.append(
            f"- row_wise for {', '.join(too_big)}: allowed only "
            f"{'/'.join(sharding_types[too_big[0]])}, which keeps a table (or its columns) on "
            f"few ranks, and no rank holds {too_big[0]!r} (--sharding-types {too_big[0]}=row_wise)"
        )
    if total * 1.05 <= held:  # memory suffices in all: only the placement constraints fail
        if not too_big:
            lines.append("- fewer constraints (--sharding-types): TorchRec could not meet these")
        return "\n".join(lines)
    if too_big:  # no number of ranks holds these whole: plan them with the row-wise ones
        fits = None
    ranks = math.ceil(total * 1.05 / usable)  # 5% for input/output buffers
    hosts = max(math.ceil(ranks / cluster.local_world_size), 1)
    checked = False
    for _ in range(4):  # confirm with the planner, a few hosts more each time
        if fits is None:
            break
        bigger = Cluster(cluster.host, hosts * cluster.local_world_size, cluster.local_world_size)
        if bigger.world_size > cluster.world_size and fits(bigger):
            checked = True
            break
        hosts = max(hosts + 1, math.ceil(hosts * 1.25))
    lines.append(
        f"- more ranks: {'' if checked else 'about '}{hosts * cluster.local_world_size} "
        f"(-j {hosts}x{cluster.local_world_size})"
        + (" fit, as planned with these constraints" if checked else ", the large tables row_wise")
    )
    capacity = cluster.world_size * usable / 1.05
    width = table.dim
    while width > 4:
        width //= 2
        scale = width / table.dim
        smaller = sum(  # weights scale with the width; row-wise state does not
            w * scale + (s * scale if optimizer == "adam" else s) for _, w, s in needs.values()
        )
        if smaller <= capacity:
            lines.append(
                f"- a smaller width: {width} instead of {table.dim} "
                f"(model.size with H{width}) needs about {smaller / GB:,.1f} GB"
            )
            break
    trainable = [n for n, (_, _, s) in needs.items() if s]
    if trainable and request.stage == "finetune":
        saved = sum(needs[n][2] for n in trainable)
        alone = " (enough on its own)" if total - saved <= capacity else ""
        lines.append(
            f"- freezing {', '.join(trainable)} (--frozen, GPSD's sparse freezing) drops "
            f"{saved / GB:,.1f} GB of optimizer state{alone}"
        )
    if kind == "HBM" and "fused_uvm_caching" not in request.compute_kernels:
        ddr = cluster.world_size * cluster.ddr_bytes
        if total <= ddr:
            lines.append(
                "- tables in host memory with an HBM cache "
                f"(--compute-kernels fused,fused_uvm_caching): the hosts have {ddr / GB:,.0f} GB"
            )
    return "\n".join(lines)
