"""A hand-edited plan whose sharding type or compute kernel this project does not place, or a
plan file that is not text, is one PlanFileError naming the file (and the table and key)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from recsys.plan.planfile import PlanFileError, read

TABLE = {
    "name": "item",
    "rows": 10,
    "dim": 4,
    "frozen": False,
    "sharding_type": "table_wise",
    "compute_kernel": "fused",
    "ranks": [0],
    "shards": [
        {
            "rank": 0,
            "offsets": [0, 0],
            "sizes": [10, 4],
            "hbm_bytes": 160,
            "ddr_bytes": 0,
            "weight_bytes": 160,
            "optimizer_bytes": 0,
        }
    ],
    "optimizer_bytes_saved": 0,
}
DOC = {
    "format": "recsys-plan",
    "version": 1,
    "cluster": {
        "host": "cpu",
        "device": "cpu",
        "world_size": 1,
        "local_world_size": 1,
        "hbm_bytes_per_rank": 0,
        "ddr_bytes_per_rank": 0,
    },
    "model": {
        "stage": "pretrain",
        "arch": "gpsd",
        "size": "L1H16A2",
        "batch_size": 8,
        "sparse_optimizer": "adam",
    },
    "tables": [TABLE],
    "ranks": [
        {
            "rank": 0,
            "hbm_bytes": 160,
            "ddr_bytes": 0,
            "weight_bytes": 160,
            "optimizer_bytes": 0,
            "other_bytes": 0,
        }
    ],
}


def test_a_good_plan_reads(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(DOC))
    assert read(path)["tables"][0]["name"] == "item"


@pytest.mark.parametrize(
    ("key", "value"), [("sharding_type", "diagonal"), ("compute_kernel", "magic")]
)
def test_unknown_choices_are_named(tmp_path: Path, key: str, value: str) -> None:
    doc = copy.deepcopy(DOC)
    doc["tables"][0][key] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError) as err:
        read(path)
    assert str(err.value).startswith(f"{path}: table 'item': {key} \"{value}\" is not one of ")
    assert "table_wise" in str(err.value) or "fused" in str(err.value)


def test_a_binary_plan_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(PlanFileError) as err:
        read(path)
    assert str(err.value).startswith(f"{path}: not a plan file (not UTF-8 text")
