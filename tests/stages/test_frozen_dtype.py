"""Frozen tables stored in fp16 (``freeze.dtype``): freeze rounds the transferred tables once,
finetuning leaves them bitwise as they are, evaluate, predict and export read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recsys.checkpoint.manager import export
from recsys.data import raw_requests
from recsys.data.protocol import write_split
from recsys.data.synth import SynthConfig, make
from recsys.distributed.launch import run_on_ranks
from recsys.serve.export import export as export_model
from recsys.stages import evaluate, finetune, freeze, predict, pretrain, transfer
from recsys.stages.config import ConfigError, load

TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=16"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp16")
    result, source = make(
        SynthConfig(users=80, items=51, categories=3, min_events=6, max_events=16, seed=5)
    )
    write_split(root / "data", result, source, row_group_rows=16)
    ctr = [*TINY, f"data.train={root / 'data' / 'ctr_train'}", "run.max_steps=3"]
    stages = {
        name: root / name for name in ("pre", "st", "fp32", "fp16", "tuned", "int8", "tuned8")
    }
    seq = f"data.train={root / 'data' / 'seq'}"
    pretrain.main(["--out", str(stages["pre"]), *TINY, seq, "run.max_steps=2"])
    transfer.main(["--strategy", "ST", "--pretrained", str(stages["pre"]),
                   "--out", str(stages["st"]), *ctr])  # fmt: skip
    freeze.main(["--sparse", "--init", str(stages["st"]), "--out", str(stages["fp32"]), *ctr])
    freeze.main(["--sparse", "--init", str(stages["st"]), "--out", str(stages["fp16"]), *ctr,
                 "freeze.dtype=fp16"])  # fmt: skip
    finetune.main(["--init", str(stages["fp16"]), "--out", str(stages["tuned"]), *ctr])
    freeze.main(["--sparse", "--init", str(stages["st"]), "--out", str(stages["int8"]), *ctr,
                 "freeze.dtype=int8"])  # fmt: skip
    finetune.main(["--init", str(stages["int8"]), "--out", str(stages["tuned8"]), *ctr])
    return stages | {"data": root / "data"}


def weights(stage: Path, tmp: Path) -> dict[str, torch.Tensor]:
    return torch.load(export(stage / "weights", tmp / f"{stage.name}.pt"))


def test_freeze_stores_the_transferred_tables_rounded_to_fp16(chain, tmp_path) -> None:
    st, fp32, fp16 = (weights(chain[n], tmp_path) for n in ("st", "fp32", "fp16"))
    for name in ("table/item", "table/category"):
        assert fp32[name].dtype == torch.float32 and torch.equal(fp32[name], st[name])
        assert fp16[name].dtype == torch.float16
        assert torch.equal(fp16[name], st[name].half())
    dense = "dense/tower.blocks.0.ffn.w1.weight"
    assert fp16[dense].dtype == torch.float32 and torch.equal(fp16[dense], st[dense])
    record = json.loads((chain["fp16"] / "stage.json").read_text())
    assert record["frozen_dtype"] == "fp16" and record["config"]["freeze"] == {"dtype": "fp16"}
    # A config that leaves freeze.dtype at fp32 records (and fingerprints) as before it existed.
    assert "freeze" not in json.loads((chain["fp32"] / "stage.json").read_text())["config"]


def test_finetuning_leaves_fp16_tables_bitwise_unchanged(chain, tmp_path) -> None:
    frozen, tuned = weights(chain["fp16"], tmp_path), weights(chain["tuned"], tmp_path)
    record = json.loads((chain["tuned"] / "stage.json").read_text())
    assert record["frozen_dtype"] == "fp16" and record["steps"] == 3
    for name in ("table/item", "table/category"):
        assert tuned[name].dtype == torch.float16 and torch.equal(tuned[name], frozen[name])
    dense = "dense/tower.blocks.0.ffn.w1.weight"
    assert not torch.equal(tuned[dense], frozen[dense])  # the dense part did train


def evaluate_predict_and_export(stage: Path, data: Path, tmp_path: Path) -> dict:
    """evaluate and predict score ``stage`` on ``data`` alike (both rebuild its frozen tables
    from its record), and export writes its artifact; the artifact's manifest."""
    record = evaluate.main(["--model", str(stage), "--data", str(data),
                            "--out", str(tmp_path / "eval")])  # fmt: skip
    assert 0 <= record["results"]["auc"] <= 1
    requests = tmp_path / "requests.parquet"
    raw_requests.write(str(data), requests)
    predicted = predict.main(["--model", str(stage), "--requests", str(requests),
                              "--out", str(tmp_path / "p")])  # fmt: skip
    for name in ("auc", "logloss", "samples"):
        assert predicted["results"][name] == pytest.approx(record["results"][name], rel=1e-6)
    manifest = export_model(stage, tmp_path / "artifact")
    assert (tmp_path / "artifact" / "model.pt2").exists()
    return manifest


def test_evaluate_predict_and_export_read_fp16_tables(chain, tmp_path) -> None:
    manifest = evaluate_predict_and_export(chain["tuned"], chain["data"] / "ctr_test", tmp_path)
    assert manifest["dtype"] == "fp32"


def test_an_unknown_frozen_dtype_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"freeze\.dtype.*one of fp32, fp16, int8.*'int4'"):
        load(None, ["freeze.dtype=int4"], "freeze")


def test_tables_the_host_cannot_hold_stop_the_stage_before_placing_them(
    chain, tmp_path, monkeypatch
) -> None:
    from recsys.plan import measure

    ctr = [*TINY, f"data.train={chain['data'] / 'ctr_train'}", "run.max_steps=1"]
    args = ["--init", str(chain["fp16"]), "--out", str(tmp_path / "tuned"), *ctr]
    monkeypatch.setattr(measure, "available_bytes", lambda: 64 * 1024**2)  # 64 MiB free
    with pytest.raises(measure.TableTooLarge) as err:
        finetune.main(args)
    message = str(err.value)
    assert message.startswith("placing the tables of this host's 1 rank(s)")
    assert "0.5 GiB but the host has 0.1 GiB available" in message and "\n" not in message
    assert not (tmp_path / "tuned" / "checkpoint").exists()


def test_int8_tables_are_quantized_once_and_finetuning_leaves_them_bitwise(chain, tmp_path) -> None:
    from recsys.distributed.rowwise_int8 import dequantize, quantize

    st, int8, tuned = (weights(chain[n], tmp_path) for n in ("st", "int8", "tuned8"))
    for name in ("table/item", "table/category"):
        codes, scale_bias = int8[name], int8[f"{name}/scale_bias"]
        assert codes.dtype == torch.uint8 and scale_bias.dtype == torch.float16
        assert torch.equal(codes, quantize(st[name])[0])
        assert torch.equal(dequantize(codes, scale_bias), dequantize(*quantize(st[name])))
        assert torch.equal(tuned[name], codes)
        assert torch.equal(tuned[f"{name}/scale_bias"], scale_bias)
    record = json.loads((chain["tuned8"] / "stage.json").read_text())
    assert record["frozen_dtype"] == "int8" and record["steps"] == 3
    evaluate_predict_and_export(chain["tuned8"], chain["data"] / "ctr_test", tmp_path)


def test_a_baseline_ranker_reads_int8_tables_too(chain, tmp_path) -> None:
    ctr = [*TINY, f"data.train={chain['data'] / 'ctr_train'}", "run.max_steps=2"]
    ctr.append("model.arch=din")
    st, frozen, tuned = tmp_path / "st", tmp_path / "frozen", tmp_path / "tuned"
    transfer.main(["--strategy", "ST", "--pretrained", str(chain["pre"]), "--out", str(st), *ctr])
    record = freeze.main(["--sparse", "--init", str(st), "--out", str(frozen), *ctr,
                          "freeze.dtype=int8"])  # fmt: skip
    tuned_record = finetune.main(["--init", str(frozen), "--out", str(tuned), *ctr])
    assert tuned_record["digests"] == record["digests"]
    assert weights(tuned, tmp_path)["table/item"].dtype == torch.uint8


def _stage(name: str, argv: list[str]) -> dict:
    """Run stage ``name`` on one rank of a job (spawned: a module-level function)."""
    import importlib

    return importlib.import_module(f"recsys.stages.{name}").main(argv)


@pytest.mark.dist
def test_int8_tables_split_over_two_ranks_keep_their_digests_and_load_on_one(
    chain, tmp_path
) -> None:
    ctr = [*TINY, f"data.train={chain['data'] / 'ctr_train'}", "run.max_steps=3"]
    frozen, tuned = tmp_path / "int8-2", tmp_path / "tuned-2"
    argv = ["--sparse", "--init", str(chain["st"]), "--out", str(frozen), *ctr, "freeze.dtype=int8"]
    records = run_on_ranks(_stage, "freeze", argv, world_size=2, quiet=True)
    one_rank = json.loads((chain["int8"] / "stage.json").read_text())["digests"]
    assert records[0]["digests"] == one_rank  # the same tables, whatever the world size
    argv = ["--init", str(frozen), "--out", str(tuned), *ctr]
    records = run_on_ranks(_stage, "finetune", argv, world_size=2, quiet=True)
    assert records[0]["digests"] == one_rank and records[0]["world_size"] == 2
    # Two ranks' blocks load into one process: the same codes as the one-rank chain's.
    assert torch.equal(
        weights(tuned, tmp_path)["table/item"], weights(chain["int8"], tmp_path)["table/item"]
    )
    evaluated = evaluate.main(["--model", str(tuned), "--data", str(chain["data"] / "ctr_test"),
                               "--out", str(tmp_path / "eval")])  # fmt: skip
    assert 0 <= evaluated["results"]["auc"] <= 1
