"""A stage's --out never destroys what it should not, records are read carefully, the
validation set must share the training set's ids, and overrides may come anywhere."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from recsys.data.protocol import write_split
from recsys.data.synth import SynthConfig, make
from recsys.stages import finetune, pretrain, transfer
from recsys.stages.common import StageError, read_stage

TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "data"
    result, source = make(
        SynthConfig(users=60, items=42, categories=3, min_events=6, max_events=12, seed=3)
    )
    write_split(out, result, source, row_group_rows=16)
    return out


def fake_stage(path: Path, record: object | None, text: str | None = None) -> Path:
    """A directory with DONE and the given stage.json (a record, or raw text)."""
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("mine\n")
    if text is not None:
        (path / "stage.json").write_text(text)
    elif record is not None:
        (path / "stage.json").write_text(json.dumps(record))
    (path / "DONE").write_text("x\n")
    return path


def pre(data: Path, out: str, *more: str) -> list[str]:
    return ["--out", out, *TINY, f"data.train={data / 'seq'}", "run.max_steps=1", *more]


# 1. a destructive --out


def test_an_empty_out_is_refused(data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    fake_stage(tmp_path / "here", None)
    with pytest.raises(StageError, match=r"^--out is empty; give this stage's own directory"):
        pretrain.main([*pre(data, ""), "--force"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


@pytest.mark.parametrize(
    ("out", "where"), [("seq", "is"), (".", "contains"), ("seq/inner", "lies inside")]
)
def test_an_out_over_an_input_is_refused(data: Path, out: str, where: str) -> None:
    before = sorted(p.name for p in (data / "seq").iterdir())
    target = str(data / out)
    with pytest.raises(StageError) as err:
        pretrain.main([*pre(data, target), "--force"])
    assert str(err.value) == (
        f"--out {target} {where} the input data.train={data / 'seq'}; give another --out"
    )
    assert sorted(p.name for p in (data / "seq").iterdir()) == before
    assert not (data / "seq" / "inner").exists()


def test_an_out_over_an_init_stage_is_refused(data: Path, tmp_path: Path) -> None:
    init = fake_stage(tmp_path / "frozen", {"stage": "freeze", "config": {}, "fingerprint": "f"})
    ctr = [*TINY, f"data.train={data / 'ctr_train'}"]
    with pytest.raises(StageError, match=r"--out .*frozen is the input --init .*frozen; give"):
        finetune.main(["--init", str(init), "--out", str(init), "--force", *ctr])
    assert (init / "keep.txt").exists()


def test_force_deletes_only_a_stage_of_the_same_name(data: Path, tmp_path: Path) -> None:
    other = fake_stage(tmp_path / "t", {"stage": "transfer", "config": {}, "fingerprint": "f"})
    with pytest.raises(StageError) as err:
        pretrain.main([*pre(data, str(other)), "--force"])
    assert str(err.value) == (
        f"--out {other} holds a transfer stage, not pretrain; --force would delete it: "
        "give another --out"
    )
    plain = fake_stage(tmp_path / "plain", None)
    with pytest.raises(StageError, match=r"is not a stage directory .*; --force would delete"):
        pretrain.main([*pre(data, str(plain)), "--force"])
    for kept in (other, plain):
        assert (kept / "keep.txt").exists()


def test_a_dataset_directory_is_never_an_out(data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(data / "ctr_test", copy)
    (copy / "stage.json").write_text(json.dumps({"stage": "pretrain"}))
    (copy / "DONE").write_text("x\n")
    with pytest.raises(StageError, match=r"holds a dataset \(dataset.json\); give another"):
        pretrain.main([*pre(data, str(copy)), "--force"])
    assert (copy / "dataset.json").exists()
    nested = fake_stage(tmp_path / "p", {"stage": "pretrain", "config": {}, "fingerprint": "f"})
    shutil.copytree(data / "ctr_test", nested / "sub")
    with pytest.raises(StageError, match=r"a dataset.json inside\); --force would delete"):
        pretrain.main([*pre(data, str(nested)), "--force"])
    assert (nested / "sub" / "dataset.json").exists()


# 2. read_stage


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "holds a list, not a stage record"),
        (json.dumps({"stage": "pretrain"}), "lacks config, fingerprint"),
    ],
)
def test_a_broken_stage_record_names_its_file(tmp_path: Path, text: str, says: str) -> None:
    stage = fake_stage(tmp_path / "s", None, text)
    with pytest.raises(StageError) as err:
        read_stage(stage, "--init")
    assert str(err.value).startswith(f"{stage / 'stage.json'}: {says}")


def test_a_missing_pretrained_directory_says_so(data: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    args = ["--strategy", "ST", "--pretrained", str(missing), "--out", str(tmp_path / "t")]
    with pytest.raises(StageError) as err:
        transfer.main([*args, *TINY, f"data.train={data / 'ctr_train'}"])
    assert str(err.value) == (
        f"--pretrained {missing}: no such directory; give a finished stage's directory"
    )
    assert not (tmp_path / "t").exists()


# 3. data.valid with other vocabularies


def other_vocab(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    meta = json.loads((out / "dataset.json").read_text())
    meta["vocab"]["item"] += 5
    meta.pop("vocabularies", None)  # data without raw keys, made with another item table
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def test_a_valid_set_with_other_vocabularies_is_refused(data: Path, tmp_path: Path) -> None:
    seq = other_vocab(data / "seq", tmp_path / "seq")
    with pytest.raises(StageError, match=rf"^data.valid={seq} has vocabularies .*ids would"):
        pretrain.main(pre(data, str(tmp_path / "p"), f"data.valid={seq}"))
    assert not (tmp_path / "p").exists()
    ctr = other_vocab(data / "ctr_test", tmp_path / "ctr")
    init = fake_stage(tmp_path / "st", {"stage": "transfer", "config": {}, "fingerprint": "f"})
    args = ["--init", str(init), "--out", str(tmp_path / "f"), *TINY]
    with pytest.raises(StageError, match=rf"^data.valid={ctr} has vocabularies"):
        finetune.main([*args, f"data.train={data / 'ctr_train'}", f"data.valid={ctr}"])
    train = [f"data.train={data / 'ctr_train'}"]
    lum_finetune = importlib.import_module("recsys.stages.lum_finetune")
    with pytest.raises(StageError, match=rf"^data.valid={ctr} has vocabularies"):
        lum_finetune.main(["--out", str(tmp_path / "l"), *TINY, *train, f"data.valid={ctr}"])
    assert not (tmp_path / "f").exists() and not (tmp_path / "l").exists()


# 4. overrides between and after options


class Parsed(Exception):
    pass


STAGE_OPTIONS = {
    "pretrain": [],
    "lum_pretrain": [],
    "lum_finetune": [],
    "finetune": ["--init", "I"],
    "freeze": ["--sparse", "--init", "I"],
    "transfer": ["--strategy", "ST", "--pretrained", "P"],
    "evaluate": ["--model", "M", "--data", "D"],
    "predict": ["--model", "M", "--requests", "R"],
    "lum_query": ["--init", "I"],
}


@pytest.mark.parametrize("name", sorted(STAGE_OPTIONS))
def test_overrides_may_come_between_and_after_options(name: str, monkeypatch) -> None:
    module = importlib.import_module(f"recsys.stages.{name}")
    seen = {}
    real = module.arguments

    def arguments(p, argv=None):
        seen["args"], seen["config"] = real(p, argv)
        raise Parsed

    monkeypatch.setattr(module, "arguments", arguments)
    options = STAGE_OPTIONS[name]
    half = len(options) // 2 if len(options) > 2 else len(options)
    argv = ["data.train=T", "--out", "X", "run.seed=7", *options[:half], "data.batch_size=8"]
    argv += [*options[half:], "model.size=L1H16A2"]
    with pytest.raises(Parsed):
        module.main(argv)
    config = seen["config"]
    assert (config.data.train, config.run.seed, config.data.batch_size) == ("T", 7, 8)
    assert config.model.size == "L1H16A2" and seen["args"].out == "X"
