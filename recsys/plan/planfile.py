"""The plan document: TorchRec's placement of every table, in a stable JSON format.

This module owns the plan file that ``recsys plan --out`` writes and training stages read
(``plan.file=plan.json``), so that the plan a user inspected is the plan that runs. The
format (``"format": "recsys-plan"``, ``"version": 1``; documented in docs/plan.md) holds:

- ``cluster``: host preset, device, world size, ranks per host, memory per rank;
- ``model``: the stage, architecture, size, per-rank batch, sparse optimizer, constraints;
- ``tables``: per table (sorted by name) its rows, width, dtype, whether frozen, sharding
  type, compute kernel, ranks and shards (rank, offsets, sizes, and the planner's HBM/DDR
  estimate, weights and optimizer state in bytes);
- ``ranks``: per rank the HBM/DDR used, of which weights, optimizer state, and other
  (input/output buffers, caches); ``checkpoint_bytes``, the host memory a checkpoint's save
  or load adds (DCP copies one tensor at a time: the rank's largest shard or optimizer
  state); then ``process_bytes``, the rank's memory besides its tables, and what the rank
  needs in all: ``total_hbm_bytes`` (the tables' HBM, and on GPUs the dense state and
  activations), ``total_ddr_bytes`` (the tables' DDR and the runtime, and on CPUs the dense
  state and activations) and ``checkpoint_ddr_bytes`` (host memory while a checkpoint is
  saved or loaded: ``total_ddr_bytes``, which the allocator keeps after training steps, and
  ``checkpoint_bytes``);
- ``process``: that estimate's parts (``recsys.plan.process``: runtime, dense state,
  activations), the same on every rank;
- ``planner``: the TorchRec version and the seconds planning took.

:func:`sharding_plan` turns a document back into a TorchRec ``ShardingPlan`` for a model and
a job, after checking that they match it (table names, shapes, world size, device). The
arithmetic both sides share lives here too: the compute kernels a plan may use and the bytes
of optimizer state a shard holds (:func:`optimizer_bytes`). Planning (``recsys.plan.make``)
and training (``recsys.stages.build.place``) stand on this module; it imports neither.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import nn

from recsys.distributed.rowwise_int8 import RowWiseInt8Table, int8_tables, local_rows
from recsys.errors import UserError, os_reason
from recsys.plan.hosts import Cluster

log = logging.getLogger(__name__)

FORMAT = "recsys-plan"
VERSION = 1

COMPUTE_KERNELS = ("fused", "fused_uvm_caching", "fused_uvm")
"""Kernels a plan may use: tables in HBM (``fused``, the only one on CPU), in host memory
with an HBM cache (``fused_uvm_caching``) or in host memory (``fused_uvm``)."""

INT8_KERNEL = "int8_rowwise"
"""The kernel of an int8 frozen table in a plan: ``recsys.distributed.rowwise_int8``'s row
blocks and lookup, which TorchRec's planner does not place (the plan adds them itself)."""

INT8_ROW_BYTES = 4
"""Bytes besides the codes in each row of an int8 table: its fp16 scale and bias."""


class PlanFileError(UserError, ValueError):
    """A plan file that cannot be read or does not match the model or job."""


def optimizer_bytes(rows: int, dim: int, element: int, optimizer: str) -> int:
    """Bytes of fused-optimizer state of a ``rows × dim`` block (TorchRec's own estimate:
    row-wise Adagrad keeps one value per row, Adam two per element): the config's
    ``optim.sparse`` takes no other."""
    if optimizer == "rowwise_adagrad":
        return rows * element
    if optimizer == "adam":
        return 2 * rows * dim * element
    raise ValueError(f"unknown sparse optimizer {optimizer!r}")


def _optimizer_name(tensor: Any) -> str | None:
    classes = getattr(tensor, "_optimizer_classes", None)
    return classes[0].__name__ if classes else None


def document(
    options: list,
    model: nn.Module,
    cluster: Cluster,
    about: dict[str, Any],
    seconds: float,
    process: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The plan document of the planner's chosen ``options`` for ``model`` on ``cluster``;
    ``process``: each rank's memory besides its tables (``recsys.plan.process``)."""
    import torchrec

    frozen = set(model.sparse.config.frozen)
    optimizer = about["sparse_optimizer"]
    tables, ranks = [], defaultdict(lambda: defaultdict(int))
    for option in sorted(options, key=lambda o: o.name):
        rows, dim = (int(x) for x in option.tensor.shape)
        element = option.tensor.element_size()
        trainable = _optimizer_name(option.tensor) is not None
        shards = []
        for shard in option.shards:
            size = [int(x) for x in shard.size]
            weights = math.prod(size) * element
            state = optimizer_bytes(size[0], size[1], element, optimizer) if trainable else 0
            hbm, ddr = int(shard.storage.hbm), int(shard.storage.ddr)
            # TorchRec counts row-wise Adagrad state as one value per row of the whole table,
            # spread over its shards by size; a column-wise shard keeps a value per row of its
            # own: the difference is added where the shard's weights live.
            counted = math.ceil(weights * (1 / dim if optimizer == "rowwise_adagrad" else 2))
            extra = max(0, state - counted) if trainable else 0
            if option.compute_kernel in ("fused_uvm", "fused_uvm_caching") or not hbm:
                ddr += extra
            else:
                hbm += extra
            shards.append(
                {
                    "rank": int(shard.rank),
                    "offsets": [int(x) for x in shard.offset],
                    "sizes": size,
                    "hbm_bytes": hbm,
                    "ddr_bytes": ddr,
                    "weight_bytes": weights,
                    "optimizer_bytes": state,
                }
            )
            used = ranks[int(shard.rank)]
            used["hbm_bytes"] += hbm
            used["ddr_bytes"] += ddr
            used["weight_bytes"] += weights
            used["optimizer_bytes"] += state
            # DCP copies one tensor at a time: the shard, or one of its optimizer's states.
            tensors = 2 if optimizer == "adam" else 1
            copied = max(weights, state // tensors if trainable else 0)
            used["checkpoint_bytes"] = max(used["checkpoint_bytes"], copied)
        tables.append(
            {
                "name": option.name,
                "module": option.path,
                "rows": rows,
                "dim": dim,
                "dtype": str(option.tensor.dtype).removeprefix("torch."),
                "frozen": option.name in frozen,
                "sharding_type": option.sharding_type,
                "compute_kernel": option.compute_kernel,
                "ranks": sorted({s["rank"] for s in shards}),
                "shards": shards,
                # What the optimizer state of a frozen table would have taken, trained in fp32.
                "optimizer_bytes_saved": (
                    optimizer_bytes(rows, dim, 4, optimizer) if option.name in frozen else 0
                ),
            }
        )
    for path, table in sorted(_int8_tables(model).items(), key=lambda kv: kv[0]):
        tables.append(_int8_entry(path, table, cluster, ranks, optimizer))
    tables.sort(key=lambda t: t["name"])
    per_rank = []
    for rank in range(cluster.world_size):
        used = dict(ranks.get(rank, {}))
        row = {k: int(used.get(k, 0)) for k in ("hbm_bytes", "ddr_bytes")}
        row |= {k: int(used.get(k, 0)) for k in ("weight_bytes", "optimizer_bytes")}
        row["other_bytes"] = max(  # buffers and caches (0 rather than rounding below it)
            0, row["hbm_bytes"] + row["ddr_bytes"] - row["weight_bytes"] - row["optimizer_bytes"]
        )
        # DCP saves and loads a rank's shards one at a time through a host-memory copy.
        row["checkpoint_bytes"] = int(used.get("checkpoint_bytes", 0))
        if process:
            cuda = cluster.host.device == "cuda"  # dense state and activations: HBM
            beside = process["dense_bytes"] + process["activation_bytes"]
            row["process_bytes"] = process["process_bytes"]
            row["total_hbm_bytes"] = row["hbm_bytes"] + (beside if cuda else 0)
            row["total_ddr_bytes"] = (
                row["ddr_bytes"] + process["runtime_bytes"] + (0 if cuda else beside)
            )
            # What training took stays resident (the allocator keeps it), plus one copy.
            row["checkpoint_ddr_bytes"] = row["total_ddr_bytes"] + row["checkpoint_bytes"]
        per_rank.append({"rank": rank, **row})
    return {
        "format": FORMAT,
        "version": VERSION,
        "cluster": {
            "host": cluster.host.name,
            "device": cluster.host.device,
            "world_size": cluster.world_size,
            "local_world_size": cluster.local_world_size,
            "hbm_bytes_per_rank": cluster.hbm_bytes,
            "ddr_bytes_per_rank": cluster.ddr_bytes,
        },
        "model": about,
        "tables": tables,
        "ranks": per_rank,
        "planner": {"torchrec": torchrec.__version__, "seconds": round(seconds, 3)},
    } | ({"process": dict(process)} if process else {})


def _int8_entry(
    path: str, table: Any, cluster: Cluster, ranks: dict, optimizer: str
) -> dict[str, Any]:
    """The plan entry of an int8 frozen table: a block of rows per rank (as the table splits
    them), in HBM on GPU ranks (DMP moves the model there), counted into ``ranks``."""
    shards = []
    for rank in range(cluster.world_size):
        rows = local_rows(table.rows, rank, cluster.world_size)
        if not len(rows):
            continue
        size = len(rows) * (table.dim + INT8_ROW_BYTES)
        hbm = size if cluster.host.device == "cuda" else 0
        shards.append(
            {
                "rank": rank,
                "offsets": [rows.start, 0],
                "sizes": [len(rows), table.dim],
                "hbm_bytes": hbm,
                "ddr_bytes": size - hbm,
                "weight_bytes": size,
                "optimizer_bytes": 0,
            }
        )
        used = ranks[rank]
        used["hbm_bytes"] += hbm
        used["ddr_bytes"] += size - hbm
        used["weight_bytes"] += size
        used["checkpoint_bytes"] = max(used["checkpoint_bytes"], len(rows) * table.dim)
    return {
        "name": path.rsplit(".", 1)[1],
        "module": path.rsplit(".tables.", 1)[0],
        "rows": table.rows,
        "dim": table.dim,
        "dtype": "int8",
        "frozen": True,
        "sharding_type": "row_wise",
        "compute_kernel": INT8_KERNEL,
        "ranks": [s["rank"] for s in shards],
        "shards": shards,
        "optimizer_bytes_saved": optimizer_bytes(table.rows, table.dim, 4, optimizer),
    }


def write(doc: dict[str, Any], path: str | Path) -> Path:
    """Write ``doc`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read(path: str | Path) -> dict[str, Any]:
    """The plan document in ``path``, checked for its format and version."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as err:
        raise PlanFileError(f"{path}: cannot be read: {os_reason(err)}") from None
    except json.JSONDecodeError as err:
        raise PlanFileError(f"{path}: not a plan file (invalid JSON: {err})") from None
    except UnicodeDecodeError as err:
        raise PlanFileError(
            f"{path}: not a plan file (not UTF-8 text: byte {err.start}); give the JSON file "
            "that `recsys plan --out` wrote"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PlanFileError(f'{path}: not a plan file (no "format": "{FORMAT}")')
    if doc.get("version") != VERSION:
        raise PlanFileError(
            f"{path}: plan format version {doc.get('version')!r}; this recsys reads {VERSION}"
        )
    for key in ("cluster", "model", "tables", "ranks"):
        if key not in doc:
            raise PlanFileError(f"{path}: plan file without {key!r}")
    _check_layout(doc, str(path))
    return doc


def _model_tables(model: nn.Module) -> dict[str, tuple[str, tuple[int, int]]]:
    from recsys.distributed.planning import embedding_modules, table_parameters

    out = {}
    for path, module in embedding_modules(model).items():
        for name, weight in table_parameters(module).items():
            out[name] = (path, (int(weight.shape[0]), int(weight.shape[1])))
    for path, table in _int8_tables(model).items():
        out[path.rsplit(".", 1)[1]] = (path.rsplit(".tables.", 1)[0], (table.rows, table.dim))
    return out


def _int8_tables(model: nn.Module) -> dict[str, Any]:
    """The int8 frozen tables of ``model`` by module path (``sparse.*.tables.<name>``)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, RowWiseInt8Table)}


def _model_dtypes(model: nn.Module) -> dict[str, str]:
    """Each table's dtype as a plan writes it (``float32``, ``float16``, ``int8``)."""
    from recsys.distributed.planning import table_weights

    return {
        name: str(weight.dtype).removeprefix("torch.")
        for name, weight in table_weights(model).items()
    } | dict.fromkeys(int8_tables(model), "int8")


PAIR = "pair"
"""Two whole numbers >= 0 (a shard's offsets or sizes)."""
WHOLES = "wholes"
"""A list of whole numbers >= 0 (a table's ranks)."""

CLUSTER_KEYS = {
    "host": str,
    "device": str,
    "world_size": 1,
    "local_world_size": 1,
    "hbm_bytes_per_rank": 0,
    "ddr_bytes_per_rank": 0,
}
MODEL_KEYS = {"stage": str, "arch": str, "size": str, "batch_size": 1, "sparse_optimizer": str}
TABLE_KEYS = {
    "name": str,
    "rows": 1,
    "dim": 1,
    "frozen": bool,
    "sharding_type": str,
    "compute_kernel": str,
    "ranks": WHOLES,
    "shards": list,
    "optimizer_bytes_saved": 0,
}
SHARD_KEYS = {
    "rank": 0,
    "offsets": PAIR,
    "sizes": PAIR,
    "hbm_bytes": 0,
    "ddr_bytes": 0,
    "weight_bytes": 0,
    "optimizer_bytes": 0,
}
RANK_KEYS = {
    "rank": 0,
    "hbm_bytes": 0,
    "ddr_bytes": 0,
    "weight_bytes": 0,
    "optimizer_bytes": 0,
    "other_bytes": 0,
}
"""What each part of a version-1 plan holds: a type, a whole number's least value, or a
list (:data:`PAIR`, :data:`WHOLES`). Keys not listed are ignored (docs/plan.md)."""


def _whole(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _fits(value: Any, kind: Any) -> bool:
    if kind == PAIR:
        return isinstance(value, list) and len(value) == 2 and all(_whole(v) for v in value)
    if kind == WHOLES:
        return isinstance(value, list) and all(_whole(v) for v in value)
    if isinstance(kind, type):
        return isinstance(value, kind)
    return _whole(value, kind)


def _wanted(kind: Any) -> str:
    names = {str: "text", bool: "true or false", list: "a list", PAIR: "two whole numbers"}
    if kind == WHOLES:
        return "a list of whole numbers"
    return names.get(kind) or f"a whole number >= {kind}"


def _check_entry(entry: Any, keys: dict[str, Any], where: str) -> None:
    """``entry`` is an object holding ``keys`` of their kinds, or a PlanFileError naming
    ``where`` and the key."""
    if not isinstance(entry, dict):
        raise PlanFileError(f"{where} is not an object")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise PlanFileError(f"{where} lacks {', '.join(missing)}")
    for key, kind in keys.items():
        if not _fits(entry[key], kind):
            shown = json.dumps(entry[key])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise PlanFileError(f"{where}: {key} must be {_wanted(kind)}, got {shown}")


def _check_choices(table: dict[str, Any], where: str) -> None:
    """The table's sharding type and compute kernel are ones this project places (checked
    here, not left to TorchRec's ValueError when the plan is applied)."""
    from recsys.distributed.planning import SHARDING_TYPES

    kernels = (*COMPUTE_KERNELS, INT8_KERNEL)
    for key, known in (("sharding_type", SHARDING_TYPES), ("compute_kernel", kernels)):
        if table[key] not in known:
            raise PlanFileError(
                f"{where}: {key} {json.dumps(table[key])[:40]} is not one of {', '.join(known)}"
            )


def _check_layout(doc: dict[str, Any], where: str) -> None:
    """Every part of the plan holds the keys a reader needs, of their kinds."""
    _check_entry(doc["cluster"], CLUSTER_KEYS, f"{where}: 'cluster'")
    _check_entry(doc.get("model"), MODEL_KEYS, f"{where}: 'model'")
    for key in ("tables", "ranks"):
        if not isinstance(doc[key], list):
            raise PlanFileError(f"{where}: '{key}' must be a list")
    for i, table in enumerate(doc["tables"]):
        name = table.get("name") if isinstance(table, dict) else None
        label = f"table {name!r}" if isinstance(name, str) else f"table entry {i}"
        _check_entry(table, TABLE_KEYS, f"{where}: {label}")
        _check_choices(table, f"{where}: {label}")
        for j, shard in enumerate(table["shards"]):
            _check_entry(shard, SHARD_KEYS, f"{where}: {label}, shard {j}")
    for i, rank in enumerate(doc["ranks"]):
        _check_entry(rank, RANK_KEYS, f"{where}: rank entry {i}")


def check(doc: dict[str, Any], model: nn.Module, world_size: int, device: str, where: str) -> None:
    """Raise :class:`PlanFileError` naming every difference between the plan and the model or
    job: tables missing on either side, shapes, world size, device, shards that do not tile
    their table."""
    _check_layout(doc, where)
    problems = []
    cluster = doc["cluster"]
    if cluster["world_size"] != world_size:
        problems.append(
            f"it was made for {cluster['world_size']} ranks, this job has {world_size} "
            f"(plan again with --world-size {world_size})"
        )
    if cluster["device"] != device:
        problems.append(f"it was made for {cluster['device']} ranks, this job runs on {device}")
    tables = {t["name"]: t for t in doc["tables"]}
    ours = _model_tables(model)
    missing = sorted(set(ours) - set(tables))
    extra = sorted(set(tables) - set(ours))
    if missing:
        problems.append(f"it places no table {', '.join(missing)} (the model has it)")
    if extra:
        problems.append(f"it places tables the model does not have: {', '.join(extra)}")
    int8 = set(int8_tables(model))
    for name in sorted(set(ours) & set(tables)):
        if (tables[name]["compute_kernel"] == INT8_KERNEL) != (name in int8):
            planned_as = "int8" if name not in int8 else tables[name]["dtype"]
            problems.append(
                f"table {name!r} is stored {_model_dtypes(model)[name]} here but planned "
                f"{planned_as} (plan with the --frozen-dtype of the freeze stage's "
                "freeze.dtype)"
            )
            continue
        planned = (tables[name]["rows"], tables[name]["dim"])
        if planned != ours[name][1]:
            problems.append(
                f"table {name!r} is {planned[0]:,} × {planned[1]} in the plan but "
                f"{ours[name][1][0]:,} × {ours[name][1][1]} in the model"
            )
            continue
        cells = sum(math.prod(s["sizes"]) for s in tables[name]["shards"])
        if cells != planned[0] * planned[1]:
            problems.append(f"the shards of table {name!r} do not cover it exactly")
        outside = sorted({s["rank"] for s in tables[name]["shards"]} - set(range(world_size)))
        if outside and cluster["world_size"] == world_size:
            problems.append(f"table {name!r} has shards on ranks {outside}")
    if problems:
        raise PlanFileError(f"{where} does not match this model and job: " + "; ".join(problems))


def sharding_plan(doc: dict[str, Any], model: nn.Module, env, where: str = "the plan file"):
    """The TorchRec ``ShardingPlan`` of ``doc`` for ``model`` on this job (``env``: a
    ``DistEnv``), exactly the shards the document lists; the model's own module paths are
    used, so a table frozen since planning (moved to the frozen collection) still places."""
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
    from torchrec.distributed.sharding_plan import placement
    from torchrec.distributed.types import (
        EmbeddingModuleShardingPlan,
        ParameterSharding,
        ShardingPlan,
    )

    device = env.device.type
    check(doc, model, env.world_size, device, where)
    if doc["cluster"]["local_world_size"] != env.local_world_size:
        log.warning(
            "%s was planned for %d ranks per host; this job has %d per host (placements are "
            "kept, the planner's communication estimates assumed the other shape)",
            where,
            doc["cluster"]["local_world_size"],
            env.local_world_size,
        )
    frozen = set(model.sparse.config.frozen)
    for table in doc["tables"]:
        if table["frozen"] != (table["name"] in frozen):
            state = "frozen" if table["frozen"] else "trainable"
            log.warning(
                "%s planned table %r as %s; here it is not (its optimizer state was %s)",
                where,
                table["name"],
                state,
                "not counted" if table["frozen"] else "counted",
            )
    dtypes = _model_dtypes(model)
    for table in doc["tables"]:
        planned, here = table.get("dtype"), dtypes.get(table["name"])
        if planned and here and planned != here:
            log.warning(
                "%s planned table %r stored as %s; here it is %s (its weights' bytes differ "
                "from the plan's)",
                where,
                table["name"],
                planned,
                here,
            )
    paths = {name: path for name, (path, _) in _model_tables(model).items()}
    plan: dict[str, EmbeddingModuleShardingPlan] = {}
    for table in doc["tables"]:
        if table["compute_kernel"] == INT8_KERNEL:  # its own row blocks, not TorchRec's
            continue
        shards = table["shards"]
        spec = EnumerableShardingSpec(
            [
                ShardMetadata(
                    shard_offsets=list(s["offsets"]),
                    shard_sizes=list(s["sizes"]),
                    placement=placement(device, s["rank"], env.local_world_size),
                )
                for s in shards
            ]
        )
        module_plan = plan.setdefault(paths[table["name"]], EmbeddingModuleShardingPlan())
        module_plan[table["name"]] = ParameterSharding(
            sharding_type=table["sharding_type"],
            compute_kernel=table["compute_kernel"],
            ranks=[s["rank"] for s in shards],
            sharding_spec=spec,
        )
    return ShardingPlan(plan)
