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
from decimal import Decimal, InvalidOperation

import torch
from torch import nn

from recsys.data.schema import DatasetMeta
from recsys.distributed.planning import (
    constraints_for,
    embedding_modules,
    run_planner,
    table_weights,
)
from recsys.errors import UserError
from recsys.models import build as models
from recsys.models.sparse import FROZEN_DTYPES
from recsys.models.tower import Tower
from recsys.plan.hosts import GB, MAX_WORLD_SIZE, Cluster
from recsys.plan.planfile import (
    COMPUTE_KERNELS,
    INT8_KERNEL,
    INT8_ROW_BYTES,
    document,
    optimizer_bytes,
)
from recsys.plan.process import process_memory
from recsys.stages.build import dataset_meta
from recsys.stages.common import StageError
from recsys.stages.config import StageConfig
from recsys.train.optim import attach_sparse_optimizer

PLANNABLE = {"pretrain": "seq", "finetune": "ctr"}
"""Stages whose model can be planned, and the dataset kind each reads."""

TENSOR_BYTES = 2**63 - 1
"""The most bytes one tensor holds: PyTorch counts a storage's bytes in int64 (a larger
table fails to build, even on the meta device)."""

FP32 = 4
"""Bytes per element of every table (float32)."""

FROZEN_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
"""Bytes per element of a frozen table stored as each of ``FROZEN_DTYPES`` (int8 rows hold
``INT8_ROW_BYTES`` more each)."""

CONFIRM_RANKS = 8192
"""The largest job a can't-fit explanation plans to confirm it (TorchRec's planner takes
about 3 ms per rank on a CPU; beyond this the job is estimated, not planned)."""


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
    frozen_dtype: str = "fp32"
    """How the frozen tables are stored (``freeze.dtype``)."""
    sharding_types: dict[str, list[str]] = field(default_factory=dict)
    """Allowed sharding types per table (the config's ``plan.sharding_types`` when empty)."""
    compute_kernels: tuple[str, ...] = ("fused",)
    batch_size: int | None = None
    """Per-rank batch (the config's ``data.batch_size`` when None)."""


TABLE = re.compile(r"([A-Za-z_]\w*)=([-+0-9.eE_,]+)(?:x([-+]?\d+))?")


def parse_table(text: str) -> tuple[str, tuple[int, int | None]]:
    """``item=4e9x64`` or ``item=4e9`` → ``("item", (4000000000, 64 | None))``, exactly
    (``9007199254740993`` stays that number)."""
    match = TABLE.fullmatch(text.strip())
    if not match:
        raise PlanError(f"--table {text!r}: expected NAME=ROWS or NAME=ROWSxDIM, e.g. item=4e9x64")
    name, rows_text, dim = match[1], match[2].replace("_", "").replace(",", ""), match[3]
    try:
        rows = Decimal(rows_text)
    except InvalidOperation:
        raise PlanError(f"--table {text!r}: rows {rows_text!r} is not a number") from None
    if rows < 1 or rows != rows.to_integral_value():
        raise PlanError(f"--table {text!r}: rows must be a whole number >= 1")
    if rows > TENSOR_BYTES:  # compared before int(): 1e999999 would take minutes to convert
        raise PlanError(
            f"--table {text!r}: {rows_text} rows is over 2^63 - 1, the most rows a tensor "
            "holds (PyTorch counts in int64)"
        )
    if dim is not None and int(dim) < 1:
        raise PlanError(f"--table {text!r}: the width must be >= 1 (and the model's)")
    return name, (int(rows), int(dim) if dim else None)


def parse_tables(texts: list[str]) -> dict[str, tuple[int, int | None]]:
    """Every ``--table``; a table given twice is refused."""
    tables: dict[str, tuple[int, int | None]] = {}
    for text in texts:
        name, size = parse_table(text)
        if name in tables:
            raise PlanError(f"--table {name} is given twice; give each table once")
        if hasattr(nn.ModuleDict(), name):  # TorchRec keeps tables in one, by name
            raise PlanError(
                f"--table {name}: a table cannot be named like an attribute of torch's "
                f"ModuleDict ({name!r}), where TorchRec keeps tables; rename it"
            )
        tables[name] = size
    return tables


def most_rows(width: int) -> int:
    """The most rows a table of ``width`` fp32 columns can have (:data:`TENSOR_BYTES`)."""
    return TENSOR_BYTES // (width * FP32)


def check_table_sizes(vocab: dict[str, int], width: int, source: str) -> None:
    """Each table of ``vocab`` (rows per table) at ``width`` fits one tensor."""
    for name, rows in vocab.items():
        if rows > most_rows(width):
            raise PlanError(
                f"table {name!r} ({source}): {rows:,} rows × {width} × {FP32} bytes (fp32) is "
                f"over 2^63 - 1 bytes, the most a tensor holds (PyTorch counts bytes in "
                f"int64); at width {width} a table has at most {most_rows(width):,} rows"
            )


def check_batch(batch: int, config: StageConfig, given: bool) -> None:
    """The per-rank batch is >= 1 and its embeddings (batch × (max_len + 1) tokens × width
    fp32) fit one tensor."""
    name = "--batch-size" if given else "data.batch_size"
    if batch < 1:
        raise PlanError(f"{name} {batch}: the per-rank batch must be >= 1")
    tokens = config.model.max_len + 1
    width = models.tower(config.model).hidden
    most = TENSOR_BYTES // (tokens * width * FP32)
    if batch > most:
        raise PlanError(
            f"{name} {batch:,}: a batch's embeddings ({tokens} tokens × width {width} × "
            f"{FP32} bytes per row) would be over 2^63 - 1 bytes, the most a tensor holds; "
            f"at most {most:,} rows per rank"
        )


def vocabularies(config: StageConfig, request: Request) -> DatasetMeta:
    """The tables' sizes: the dataset of ``data.train`` when it is set, then ``--table``.

    Without a dataset, ``--table`` names every table: ``item`` and the side features."""
    kind = PLANNABLE[request.stage]
    rows = {name: r for name, (r, _) in request.tables.items()}
    if config.data.train:
        try:
            meta = dataset_meta(config.data.train, kind, "data.train")
        except StageError as err:  # names data.train itself
            raise PlanError(str(err)) from None
        except UserError as err:
            raise PlanError(f"data.train: {err}") from None
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
    if request.stage not in PLANNABLE:
        raise PlanError(f"--stage {request.stage!r}: expected one of {', '.join(PLANNABLE)}")
    try:
        width = models.tower(config.model).hidden
    except ValueError as err:
        raise PlanError(f"model.size={config.model.size}: {err}") from None
    meta = vocabularies(config, request)
    given = {n for n in meta.vocab if n in request.tables}
    check_table_sizes({n: meta.vocab[n] for n in given}, width, "--table")
    check_table_sizes({n: r for n, r in meta.vocab.items() if n not in given}, width, "data.train")
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
    if request.stage == "pretrain" and request.frozen:
        raise PlanError("--frozen applies to the finetune model (sparse freezing)")
    if request.frozen_dtype not in FROZEN_DTYPES:
        raise PlanError(
            f"--frozen-dtype {request.frozen_dtype!r}: expected one of {', '.join(FROZEN_DTYPES)}"
        )
    if request.frozen_dtype != "fp32" and not request.frozen:
        raise PlanError("--frozen-dtype applies to the --frozen tables: name them with --frozen")
    with torch.device("meta"):  # the dense part too: no memory, whatever the width
        if request.stage == "pretrain":
            model = models.generative_model(config.model, meta)
        else:
            frozen = tuple(request.frozen)
            model = models.ctr_model(config.model, meta, frozen, frozen_dtype=request.frozen_dtype)
    attach_sparse_optimizer(model, config.optim)
    return model


def make(config: StageConfig, request: Request, cluster: Cluster) -> dict:
    """The plan document (``recsys.plan.planfile``'s format) of ``request`` on ``cluster``."""
    from torchrec.distributed.planner.types import PlannerError, PlannerErrorType

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
    tables = list(table_weights(model))  # int8 frozen tables place themselves (planfile)
    if request.sharding_types:
        # int8 frozen tables split their rows over the ranks themselves (row-wise).
        int8 = {t.name for t in model.sparse.config.tables} - set(tables)
        types = {t: v for t, v in request.sharding_types.items() if t not in int8}
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
    given = request.batch_size is not None
    batch = request.batch_size if given else config.data.batch_size
    check_batch(batch, config, given)
    start = time.perf_counter()
    try:
        _, options = run_planner(model, cluster.topology(), constraints, batch)
    except PlannerError as err:
        placement = (PlannerErrorType.INSUFFICIENT_STORAGE, PlannerErrorType.STRICT_CONSTRAINTS)
        if err.error_type in placement:

            def fits(ranks: Cluster, rows: int = batch) -> bool:
                try:
                    run_planner(model, ranks.topology(), constraints, rows)
                except PlannerError:
                    return False
                return True

            text = explain(model, config, request, cluster, types, fits, batch)
            raise DoesNotFit(text) from None
        raise PlanError(f"TorchRec's planner found no plan: {err}") from None
    seconds = time.perf_counter() - start
    process = process_memory(  # a real tower on the CPU: its forward counts activations
        Tower(models.tower(config.model)) if config.model.arch == "gpsd" else None,
        _dense_bytes(model),
        batch,
        config.model.max_len,
        config.model.negatives if request.stage == "pretrain" else None,
    )
    doc = document(
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
        process.to_json(),
    )
    _check_int8_fits(doc, cluster)
    return doc


def _check_int8_fits(doc: dict, cluster: Cluster) -> None:
    """TorchRec's planner places every table but the int8 frozen ones (a block of rows on each
    rank, ``recsys.plan.planfile``): raise :class:`DoesNotFit` when a rank cannot hold its
    blocks beside what the planner placed there."""
    int8 = [t for t in doc["tables"] if t["compute_kernel"] == INT8_KERNEL]
    if not int8:
        return
    cuda = cluster.host.device == "cuda"
    key, kind = ("hbm_bytes", "HBM") if cuda else ("ddr_bytes", "DDR")
    usable = (cluster.hbm_bytes if cuda else cluster.ddr_bytes) * (1 - RESERVE)
    worst = max(doc["ranks"], key=lambda r: r[key])
    if worst[key] <= usable:
        return
    total = sum(s[key] for t in int8 for s in t["shards"])
    others = max(
        0, worst[key] - sum(s[key] for t in int8 for s in t["shards"] if s["rank"] == worst["rank"])
    )
    ranks = math.ceil(total / max(usable - others, 1))
    raise DoesNotFit(
        f"the tables do not fit {cluster.describe()}: the int8 frozen tables "
        f"({', '.join(t['name'] for t in int8)}) take {total / GB:,.1f} GB in row blocks over "
        f"the ranks, and rank {worst['rank']} would hold {worst[key] / GB:,.1f} GB of "
        f"{kind}, more than its {usable / GB:,.1f} GB usable (after the planner's "
        f"{RESERVE:.0%} reserve); about {ranks:,} ranks hold them (--world-size {ranks})"
    )


def _smaller_batch(
    cluster: Cluster, fits: Callable[..., bool] | None, batch: int | None
) -> int | None:
    """The largest power of two below ``batch`` rows per rank that the planner fits on
    ``cluster``, or None (none does, or the job is too large to plan again and again)."""
    if fits is None or not batch or batch < 2 or cluster.world_size > CONFIRM_RANKS:
        return None
    if not fits(cluster, 1):
        return None
    low, high = 0, (batch - 1).bit_length() - 1  # 2**low fits; 2**high < batch
    while low < high:  # about log2(log2(batch)) plans
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(cluster, 2**middle) else (low, middle - 1)
    return 2**low


DENSE_COPIES = 6
"""How many times its fp32 weights TorchRec's planner reserves for a model's dense part on
every rank (its heuristic storage reservation: weights, gradients, optimizer state)."""


def _dense_bytes(model: nn.Module) -> int:
    """Bytes of the fp32 weights outside the embedding tables."""
    tables = {id(p) for m in embedding_modules(model).values() for p in m.parameters()}
    return sum(p.numel() * FP32 for p in model.parameters() if id(p) not in tables)


RESERVE = 0.15
"""Share of each rank's memory TorchRec's planner keeps back for the dense part, inputs and
activations (its default storage reservation)."""


def explain(
    model: nn.Module,
    config: StageConfig,
    request: Request,
    cluster: Cluster,
    sharding_types: dict[str, list[str]],
    fits: Callable[..., bool] | None = None,
    batch: int | None = None,
) -> str:
    """Why the tables do not fit ``cluster`` and what would: the biggest table and its
    needs, the memory the ranks have, and the changes that would make room. ``fits(ranks,
    rows)`` plans again (``rows``: the per-rank ``batch`` when not given) to confirm a
    proposal; jobs over :data:`CONFIRM_RANKS` ranks are estimated only."""
    frozen = set(model.sparse.config.frozen)
    optimizer = config.optim.sparse
    needs = {}
    dtype = model.sparse.config.frozen_dtype
    for t in model.sparse.config.tables:
        weights = t.rows * t.dim * (FROZEN_BYTES[dtype] if t.name in frozen else FP32)
        if t.name in frozen and dtype == "int8":
            weights += t.rows * INT8_ROW_BYTES
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
        f"Largest: table {name!r} ({table.rows:,} × {table.dim}, "
        f"{model.sparse.config.frozen_dtype if name in frozen else 'fp32'}) needs "
        f"{weights / GB:,.1f} GB of weights"
        + (f" + {state / GB:,.1f} GB of {state_name} state" if state else " (frozen)")
        + f"; all tables need {total / GB:,.1f} GB.",
        f"Each rank has {per_rank / GB:,.1f} GB {kind} ({usable / GB:,.1f} GB usable after "
        f"the planner's {RESERVE:.0%} reserve): {cluster.world_size} ranks hold "
        f"{held / GB:,.1f} GB in all.",
        "What would fit:",
    ]
    dense = _dense_bytes(model) * DENSE_COPIES
    if dense > usable:  # on every rank, however many there are
        lines.append(
            f"- a smaller model.size: the dense part of {config.model.size} needs "
            f"{dense / GB:,.1f} GB on every rank as TorchRec counts it ({DENSE_COPIES}× its "
            f"fp32 weights: gradients, optimizer state, copies), more than a rank's "
            f"{usable / GB:,.1f} GB"
        )
        return "\n".join(lines)
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
        smaller = _smaller_batch(cluster, fits, batch) if not too_big else None
        if smaller is not None:
            lines.append(
                f"- a smaller --batch-size: {smaller:,} rows per rank fit; TorchRec counts "
                f"input and output buffers for {batch:,}, which do not"
            )
        elif not too_big:
            lines.append("- fewer constraints (--sharding-types): TorchRec could not meet these")
        return "\n".join(lines)
    if too_big:  # no number of ranks holds these whole: plan them with the row-wise ones
        fits = None
    ranks = math.ceil(total * 1.05 / usable)  # 5% for input/output buffers
    hosts = max(math.ceil(ranks / cluster.local_world_size), 1)
    checked = False
    for _ in range(4):  # confirm with the planner, a few hosts more each time
        if fits is None or hosts * cluster.local_world_size > CONFIRM_RANKS:
            break
        bigger = Cluster(cluster.host, hosts * cluster.local_world_size, cluster.local_world_size)
        if bigger.world_size > cluster.world_size and fits(bigger):
            checked = True
            break
        hosts = max(hosts + 1, math.ceil(hosts * 1.25))
    more = hosts * cluster.local_world_size
    if checked:
        how = " fit, as planned with these constraints"
    elif more > MAX_WORLD_SIZE:
        how = f", more than a plan is made for ({MAX_WORLD_SIZE:,}): smaller tables"
    else:
        how = ", the large tables row_wise"
    lines.append(
        f"- more ranks: {'' if checked else 'about '}{more:,} "
        f"(-j {hosts}x{cluster.local_world_size}){how}"
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
