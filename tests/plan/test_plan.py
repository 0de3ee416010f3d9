"""`recsys plan`: meta-device planning at scale, the plan file, can't-fit errors, freezing,
and a 2-rank training run that uses the plan it was given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.cli import main as cli
from recsys.distributed.env import DistEnv
from recsys.plan import planfile, show
from recsys.plan.hosts import cluster
from recsys.plan.make import PlanError, Request, meta_model
from recsys.plan.make import make as make_plan
from recsys.stages.config import load

BIG = ["--table", "item=4e9x64", "--table", "category=1e5"]
TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=16"]


def plan_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "plan.json"
    assert cli(["plan", *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_a_4e9_row_table_is_planned_without_allocating_it(tmp_path: Path) -> None:
    # 4e9 × 64 fp32 is 954 GB: the process must stay far below that (and below 3 GB).
    out = tmp_path / "plan.json"
    args = [*BIG, "-j", "8x8", "--out", str(out)]
    script = (
        "import resource, sys\n"
        "from recsys.cli import main\n"
        f"code = main(['plan', *{args!r}])\n"
        "print('peak-kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    peak_kb = int(run.stderr.split("peak-kb")[-1].split()[0])
    assert peak_kb < 3 * 1024 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
    doc = json.loads(out.read_text())
    item = next(t for t in doc["tables"] if t["name"] == "item")
    assert (item["rows"], item["dim"], item["sharding_type"]) == (4_000_000_000, 64, "row_wise")
    assert len(item["ranks"]) == 64
    assert sum(s["sizes"][0] for s in item["shards"]) == 4_000_000_000
    # Weights and row-wise Adagrad state are counted per rank and add up to the table's.
    assert sum(s["weight_bytes"] for s in item["shards"]) == 4_000_000_000 * 64 * 4
    assert sum(s["optimizer_bytes"] for s in item["shards"]) == 4_000_000_000 * 4
    assert all(r["hbm_bytes"] <= doc["cluster"]["hbm_bytes_per_rank"] for r in doc["ranks"])
    assert "0–63 (64)" in run.stdout and "HBM imbalance" in run.stdout


def test_frozen_tables_are_planned_without_optimizer_state(tmp_path: Path) -> None:
    trained = plan_json(tmp_path, *BIG, "-j", "4x8")
    frozen = plan_json(tmp_path, *BIG, "-j", "4x8", "--frozen", "item")
    item = {d["name"]: d for d in frozen["tables"]}["item"]
    assert item["frozen"] and all(s["optimizer_bytes"] == 0 for s in item["shards"])
    assert item["optimizer_bytes_saved"] == 4_000_000_000 * 4
    # The planner's own estimate shrinks by exactly the state freezing drops.
    used = sum(r["hbm_bytes"] for r in trained["ranks"]) - sum(
        r["hbm_bytes"] for r in frozen["ranks"]
    )
    assert used == pytest.approx(4_000_000_000 * 4, rel=1e-6)
    assert "item saves 14.90 GB" in show.render(frozen)


def test_a_frozen_table_stored_in_fp16_is_planned_at_half_its_bytes(tmp_path: Path) -> None:
    fp32 = plan_json(tmp_path, *BIG, "-j", "4x8", "--frozen", "item")
    fp16 = plan_json(tmp_path, *BIG, "-j", "4x8", "--frozen", "item", "--frozen-dtype", "fp16")
    (a,), (b,) = ([t for t in d["tables"] if t["name"] == "item"] for d in (fp32, fp16))
    assert (a["dtype"], b["dtype"]) == ("float32", "float16")
    weights = [sum(s["weight_bytes"] for s in t["shards"]) for t in (a, b)]
    assert weights == [4_000_000_000 * 64 * 4, 4_000_000_000 * 64 * 2]
    # Freezing saves the state the table would have had trained, in fp32, either way.
    assert a["optimizer_bytes_saved"] == b["optimizer_bytes_saved"] == 4_000_000_000 * 4
    assert "yes, float16" in show.render(fp16)
    with pytest.raises(PlanError, match="--frozen-dtype applies to the --frozen tables"):
        make_plan(load(None, [], "finetune"), Request(tables={"item": (100, None)},
                  frozen_dtype="fp16"), cluster("cpu", world_size=2))  # fmt: skip
    with pytest.raises(PlanError, match="--frozen-dtype 'int4': expected one of fp32, fp16, int8"):
        make_plan(load(None, [], "finetune"), Request(tables={"item": (100, None)},
                  frozen=("item",), frozen_dtype="int4"), cluster("cpu", world_size=2))  # fmt: skip


def frozen_plan(data: Path, tmp_path: Path, dtype: str):
    """A 2-rank CPU plan file of a CTR finetune whose item table is frozen in ``dtype``; the
    finetune's config and rank 0's environment."""
    out = tmp_path / f"{dtype}.json"
    ctr = [*TINY, f"data.train={data / 'ctr_train'}"]
    args = ["plan", "--host", "cpu", "-j", "1x2", "--frozen", "item", "--frozen-dtype", dtype]
    assert cli([*args, "--out", str(out), *ctr]) == 0
    env = DistEnv(0, 2, 0, 2, "gloo", __import__("torch").device("cpu"))
    return out, load(None, ctr, "finetune"), env


def test_int8_frozen_tables_are_planned_as_their_own_row_blocks(data: Path, tmp_path: Path) -> None:
    doc = plan_json(tmp_path, *BIG, "-j", "4x8", "--frozen", "item", "--frozen-dtype", "int8")
    (item,) = [t for t in doc["tables"] if t["name"] == "item"]
    assert (item["dtype"], item["compute_kernel"], item["sharding_type"]) == (
        "int8",
        "int8_rowwise",
        "row_wise",
    )
    assert len(item["shards"]) == 32 and item["ranks"] == list(range(32))
    assert sum(s["sizes"][0] for s in item["shards"]) == 4_000_000_000
    assert sum(s["weight_bytes"] for s in item["shards"]) == 4_000_000_000 * (64 + 4)
    assert all(s["hbm_bytes"] == s["weight_bytes"] for s in item["shards"])  # A100s: in HBM
    assert "yes, int8" in show.render(doc)
    # On too few ranks the explanation counts the int8 rows' bytes.
    assert cli(["plan", *BIG, "-j", "1x2", "--frozen", "item", "--frozen-dtype", "int8"]) == 2
    # A plan file of int8 tables places a job whose freeze stored them int8, and no other.
    out, config, env = frozen_plan(data, tmp_path, "int8")
    int8 = meta_model(config, Request(frozen=("item",), frozen_dtype="int8"))
    placed = planfile.sharding_plan(planfile.read(out), int8, env)
    assert {t for m in placed.plan.values() for t in m} == {"category"}  # item places itself
    fp16 = meta_model(config, Request(frozen=("item",), frozen_dtype="fp16"))
    with pytest.raises(planfile.PlanFileError, match="table 'item' is stored float16 here"):
        planfile.sharding_plan(planfile.read(out), fp16, env)


def test_each_rank_counts_the_memory_besides_its_tables(tmp_path: Path) -> None:
    doc = plan_json(tmp_path, *BIG, "-j", "4x8", "--batch-size", "64")
    bigger = plan_json(tmp_path, *BIG, "-j", "4x8", "--batch-size", "128")
    process, more = doc["process"], bigger["process"]
    assert process["process_bytes"] == sum(
        process[k] for k in ("runtime_bytes", "dense_bytes", "activation_bytes")
    )
    beside = process["dense_bytes"] + process["activation_bytes"]
    for rank in doc["ranks"]:  # A100 ranks: dense state and activations in HBM
        assert rank["total_hbm_bytes"] == rank["hbm_bytes"] + beside
        assert rank["total_ddr_bytes"] == rank["ddr_bytes"] + process["runtime_bytes"]
        assert rank["checkpoint_ddr_bytes"] == rank["total_ddr_bytes"] + rank["checkpoint_bytes"]
        assert rank["checkpoint_bytes"] == 125_000_000 * 64 * 4  # a rank's item shard (32)
    cpu = plan_json(tmp_path, *BIG, "-j", "128x1", "--host", "cpu", "--batch-size", "64")
    for rank in cpu["ranks"]:  # CPU ranks: everything in host memory
        assert rank["total_hbm_bytes"] == 0
        assert rank["total_ddr_bytes"] == rank["ddr_bytes"] + cpu["process"]["process_bytes"]
    # Activations grow with the batch, the rest does not.
    assert more["activation_bytes"] == pytest.approx(2 * process["activation_bytes"], rel=1e-6)
    assert more["runtime_bytes"] == process["runtime_bytes"] > 0
    assert "Besides its tables each rank holds about" in show.render(doc)
    assert "checkpoint's save or load copies a rank's shards" in show.render(doc)
    assert "MORE than" not in show.render(doc)
    # A 4e9-row table in the host memory of one host of 8 GPUs (an HBM cache in front): a
    # checkpoint's copy of a shard beside it is more than a rank's share of the host.
    uvm = plan_json(tmp_path, *BIG, "-j", "1x8", "--host", "a100-80gb",
                    "--compute-kernels", "fused,fused_uvm_caching")  # fmt: skip
    rank = uvm["ranks"][0]
    assert rank["checkpoint_bytes"] == 500_000_000 * 64 * 4
    assert "MORE than the 144.00 GB of DDR a rank has" in show.render(uvm)


def test_a_plan_that_cannot_fit_says_what_would(capsys: pytest.CaptureFixture) -> None:
    assert cli(["plan", *BIG, "-j", "1x8"]) == 2
    message = capsys.readouterr().err
    assert "do not fit 8 ranks = 1 × 8 on a100-40gb" in message
    assert "table 'item' (4,000,000,000 × 64, fp32) needs 953.7 GB of weights" in message
    assert "8 ranks hold 272.0 GB" in message
    # The planner confirmed the bigger job it proposes.
    assert "- more ranks: 32 (-j 4x8) fit" in message
    assert "a smaller width: 16" in message and "freezing item, category" in message
    # Constrained to table_wise, the table is too big for any one rank.
    assert cli(["plan", *BIG, "-j", "1x8", "--sharding-types", "table_wise"]) == 2
    assert "row_wise for item: allowed only table_wise" in capsys.readouterr().err


def test_bad_requests_name_the_parameter() -> None:
    config = load(None, [])
    ranks = cluster("a100-40gb", world_size=8)
    with pytest.raises(PlanError, match="--table item: width 32 differs from the model's 64"):
        meta_model(config, Request(tables={"item": (100, 32)}))
    with pytest.raises(PlanError, match="at least --table item=ROWS"):
        meta_model(config, Request(tables={"category": (100, None)}))
    with pytest.raises(PlanError, match="--frozen price: no such table"):
        meta_model(config, Request(tables={"item": (100, None)}, frozen=("price",)))
    with pytest.raises(PlanError, match="--compute-kernels dense"):
        make_plan(config, Request(tables={"item": (100, None)}, compute_kernels=("dense",)), ranks)
    with pytest.raises(ValueError, match="-j '3': expected NNODESxNPROC"):
        cluster("a100-40gb", job="3")
    with pytest.raises(PlanError, match="rows must be a whole number"):
        cli_table("item=0.5")


def cli_table(text: str):
    from recsys.plan.make import parse_table

    return parse_table(text)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, synth_split) -> Path:
    out = tmp_path_factory.mktemp("plan") / "data"
    config = {"items": 60, "categories": 3, "min_events": 6, "max_events": 20, "seed": 2}
    return synth_split(out, row_group_rows=16, users=120, **config)


def cpu_plan(tmp_path: Path, data: Path, *extra: str) -> tuple[Path, dict]:
    out = tmp_path / "cpu-plan.json"
    args = ["plan", "--stage", "pretrain", "--host", "cpu", "-j", "1x2", *extra]
    assert cli([*args, "--out", str(out), *TINY, f"data.train={data / 'seq'}"]) == 0
    return out, json.loads(out.read_text())


def test_the_plan_file_round_trips_into_the_same_torchrec_plan(data: Path, tmp_path: Path) -> None:
    path, doc = cpu_plan(tmp_path, data, "--sharding-types", "item=table_wise")
    config = load(None, [*TINY, f"data.train={data / 'seq'}"], "pretrain")
    model = meta_model(config, Request(stage="pretrain"))
    env = DistEnv(0, 2, 0, 2, "gloo", __import__("torch").device("cpu"))
    plan = planfile.sharding_plan(planfile.read(path), model, env)
    placed = {t: p for m in plan.plan.values() for t, p in m.items()}
    for table in doc["tables"]:
        p = placed[table["name"]]
        assert (p.sharding_type, p.compute_kernel) == (
            table["sharding_type"],
            table["compute_kernel"],
        )
        assert p.ranks == [s["rank"] for s in table["shards"]]
        shards = [(m.shard_offsets, m.shard_sizes) for m in p.sharding_spec.shards]
        assert shards == [(s["offsets"], s["sizes"]) for s in table["shards"]]
    assert placed["item"].sharding_type == "table_wise"
    # Showing the written file gives what the planning run printed.
    assert show.render(planfile.read(path)) == show.render(doc)


def test_a_plan_of_fp16_frozen_tables_used_for_fp32_ones_is_warned_about(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, config, env = frozen_plan(data, tmp_path, "fp16")
    for dtype, warned in (("fp16", False), ("fp32", True)):
        caplog.clear()
        model = meta_model(config, Request(frozen=("item",), frozen_dtype=dtype))
        planfile.sharding_plan(planfile.read(out), model, env)
        said = "planned table 'item' stored as float16; here it is float32" in caplog.text
        assert said == warned, caplog.text


def test_a_plan_that_does_not_match_is_rejected_with_the_difference(
    data: Path, tmp_path: Path
) -> None:
    path, _ = cpu_plan(tmp_path, data)
    wider = load(None, [*TINY, "model.size=L1H32A2", f"data.train={data / 'seq'}"], "pretrain")
    model = meta_model(wider, Request(stage="pretrain"))
    torch = __import__("torch")
    one = DistEnv(0, 1, 0, 1, "gloo", torch.device("cpu"))
    with pytest.raises(planfile.PlanFileError) as err:
        planfile.sharding_plan(planfile.read(path), model, one, str(path))
    message = str(err.value)
    assert "made for 2 ranks, this job has 1" in message
    assert "table 'item' is 62 × 16 in the plan but 62 × 32 in the model" in message
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(planfile.PlanFileError, match=r"junk\.json: not a plan file"):
        planfile.read(tmp_path / "junk.json")


def test_compare_names_what_changed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    assert cli(["plan", *BIG, "-j", "4x8", "--out", str(a)]) == 0
    assert cli(["plan", *BIG, "-j", "8x8", "--frozen", "item", "--out", str(b)]) == 0
    capsys.readouterr()
    assert cli(["plan", "--compare", str(a), str(b)]) == 1
    lines = capsys.readouterr().out
    assert f"cluster.world_size: 32 ({a}) → 64 ({b})" in lines
    assert "table item frozen: False" in lines
    assert "table item shards: 32 × 125,000,000×64" in lines and "64 × 62,500,000×64" in lines
    assert cli(["plan", "--compare", str(a), str(a)]) == 0
    assert "the same way" in capsys.readouterr().out


def _pretrain_with_plan(data: str, out: str, plan: str) -> dict:
    from recsys.stages import pretrain

    record = pretrain.main(
        ["--out", out, *TINY, f"data.train={data}", "run.max_steps=2", f"plan={plan}"]
    )
    return record["sharding"]


@pytest.mark.dist
def test_a_two_rank_training_run_uses_the_plan_file(data: Path, tmp_path: Path) -> None:
    from recsys.distributed.launch import run_on_ranks

    # The planner left alone would put item row-wise (the config's default constraint):
    # the plan file says table-wise, on the rank it chose.
    path, doc = cpu_plan(tmp_path, data, "--sharding-types", "item=table_wise")
    expected = {
        t["name"]: {
            "sharding_type": t["sharding_type"],
            "compute_kernel": t["compute_kernel"],
            "ranks": t["ranks"],
        }
        for t in doc["tables"]
    }
    assert expected["item"]["sharding_type"] == "table_wise"
    records = run_on_ranks(
        _pretrain_with_plan, str(data / "seq"), str(tmp_path / "run"), str(path), quiet=True
    )
    assert records == [expected, expected]


def test_a_stage_given_a_plan_for_another_job_stops_with_the_difference(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from recsys.stages import pretrain
    from recsys.stages.common import run_stage

    path, _ = cpu_plan(tmp_path, data)  # 2 ranks; this process is a world of one
    args = ["--out", str(tmp_path / "p"), *TINY, f"data.train={data / 'seq'}", f"plan={path}"]
    assert run_stage(pretrain.main, args) == 2
    err = capsys.readouterr().err
    assert f"{path} does not match this model and job: it was made for 2 ranks" in err
    assert not (tmp_path / "p" / "DONE").exists()


def test_a_table_no_rank_holds_gets_row_wise_advice_when_memory_suffices(
    capsys: pytest.CaptureFixture,
) -> None:
    assert cli(["plan", *BIG, "-j", "8x8", "--sharding-types", "item=table_wise"]) == 2
    err = capsys.readouterr().err
    assert "under these constraints (in all, memory suffices)" in err
    assert "row_wise for item: allowed only table_wise" in err
    assert "more ranks" not in err  # more ranks would not help


def test_column_wise_shards_count_their_own_row_wise_state(tmp_path: Path) -> None:
    doc = plan_json(
        tmp_path, "--table", "item=4e6", "-j", "2x4", "--sharding-types", "item=column_wise",
        "model.size=L1H512A4",
    )  # fmt: skip
    item = {t["name"]: t for t in doc["tables"]}["item"]
    assert item["sharding_type"] == "column_wise" and len(item["shards"]) > 1
    # Each column block keeps one Adagrad value per row: rows × 4 bytes per shard ...
    assert all(s["optimizer_bytes"] == 4_000_000 * 4 for s in item["shards"])
    # ... and the rank's memory holds it (no negative remainder).
    assert all(r["other_bytes"] >= 0 for r in doc["ranks"])
    for r in doc["ranks"]:
        assert r["hbm_bytes"] >= r["weight_bytes"] + r["optimizer_bytes"]


def test_compare_sees_the_same_shards_on_other_ranks(tmp_path: Path) -> None:
    doc = plan_json(tmp_path, *BIG, "-j", "4x8")
    moved = json.loads(json.dumps(doc))
    item = {t["name"]: t for t in moved["tables"]}["item"]
    item["shards"][0]["rank"], item["shards"][1]["rank"] = 1, 0
    assert show.compare(doc, moved) == ["table item: 2 shards placed on other ranks (a → b)"]


def test_memory_and_devices_are_checked(capsys: pytest.CaptureFixture) -> None:
    assert cli(["plan", "--table", "item=1000", "--hbm-gb", "-5"]) == 2
    assert "--hbm-gb must be > 0" in capsys.readouterr().err
    assert cli(["plan", "--table", "item=1000", "--host", "cpu", "--device", "cuda"]) == 2
    assert "have no HBM: give --hbm-gb" in capsys.readouterr().err
    args = ["--sharding-types", "row_wise", "--sharding-types", "itme=table_wise"]
    assert cli(["plan", "--table", "item=1000", *args]) == 2
    assert "names tables the model does not have: itme" in capsys.readouterr().err


def test_a_plan_file_with_a_broken_entry_is_named(data: Path, tmp_path: Path) -> None:
    path, doc = cpu_plan(tmp_path, data)
    del doc["tables"][0]["shards"][0]["rank"]
    path.write_text(json.dumps(doc))
    config = load(None, [*TINY, f"data.train={data / 'seq'}"], "pretrain")
    model = meta_model(config, Request(stage="pretrain"))
    env = DistEnv(0, 2, 0, 2, "gloo", __import__("torch").device("cpu"))
    name = doc["tables"][0]["name"]
    with pytest.raises(planfile.PlanFileError, match=f"table '{name}', shard 0 lacks rank"):
        planfile.sharding_plan(planfile.read(path), model, env, str(path))
