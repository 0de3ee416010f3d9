"""Every setting is checked where the config is read: one line naming the key and what would
be right, before a stage writes anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recsys.errors import EXIT_USER_ERROR
from recsys.stages import STAGES, pretrain
from recsys.stages.common import run_stage
from recsys.stages.config import ConfigError, load

CONFIGS = Path(__file__).parents[2] / "configs"
POSITIVE = "must be a finite number > 0"


def refused(overrides: list[str], path: Path | None = None, stage: str | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load(path, overrides, stage)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
        ("data.workers=-1", "data.workers: must be >= 0 (0: read in the training process), got -1"),
        ("run.epochs=0", "run.epochs: must be >= 1, got 0"),
        ("run.max_steps=0", "run.max_steps: must be >= 1, or null for no limit, got 0"),
        ("run.checkpoint_every=-1", "run.checkpoint_every: must be >= 0 (0: only at the end)"),
        ("run.keep=0", "run.keep: must be >= 1, got 0"),
        ("run.nonfinite=ignore", "run.nonfinite: must be stop or skip, got 'ignore'"),
        ("run.seed=-1", "run.seed: must be in [0, 2147483647], got -1"),
    ],
)
def test_data_and_run_counts(override: str, message: str) -> None:
    assert refused([override]).startswith(message)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=0", f"optim.lr: {POSITIVE}, got 0.0"),
        ("optim.lr=-1e-3", f"optim.lr: {POSITIVE}, got -0.001"),
        ("optim.lr=.nan", f"optim.lr: {POSITIVE}, got nan"),
        ("optim.lr=.inf", f"optim.lr: {POSITIVE}, got inf"),
        ("optim.sparse_lr=.inf", f"optim.sparse_lr: {POSITIVE}, got inf"),
        ("optim.betas=[0.9, 1.0]", "optim.betas: must be two numbers in [0, 1), got [0.9, 1.0]"),
        ("optim.betas=[-0.1, 0.9]", "optim.betas: must be two numbers in [0, 1)"),
        ("optim.weight_decay=-0.1", "optim.weight_decay: must be finite and >= 0, got -0.1"),
        ("optim.weight_decay=.inf", "optim.weight_decay: must be finite and >= 0, got inf"),
        ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0, got -1"),
        ("optim.total_steps=0", "optim.total_steps: must be >= 1, got 0"),
        ("optim.min_lr_ratio=.nan", "optim.min_lr_ratio: the schedule ends at min_lr_ratio × lr"),
        # -1 would train the dense part against its gradient, 0 would freeze it
        ("optim.clip_norm=-1", f"optim.clip_norm: {POSITIVE}, or null for no clipping, got -1.0"),
        ("optim.clip_norm=0", "optim.clip_norm: must be a finite number > 0, or null"),
        ("optim.clip_norm=.inf", "optim.clip_norm: must be a finite number > 0, or null"),
    ],
)
def test_optimizer_settings(override: str, message: str) -> None:
    assert refused([override]).startswith(message)


def test_nan_and_infinity_in_a_file_are_refused_and_null_turns_clipping_off(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: .NaN}\n")
    assert refused([], path) == f"optim.lr: {POSITIVE}, got nan"
    path.write_text("optim: {sparse_lr: -.inf}\n")
    assert refused([], path) == f"optim.sparse_lr: {POSITIVE}, got -inf"
    assert load(None, ["optim.clip_norm=null"]).optim.clip_norm is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.dropout=1", "model.dropout: must be in [0, 1), got 1.0"),
        ("model.negatives=0", "model.negatives: must be >= 1, got 0"),
        ("model.max_len=1", "model.max_len: must be >= 2, got 1"),
        ("model.arch=gpt", "model.arch: must be one of gpsd, deepfm, din, got 'gpt'"),
        ("model.size=L4H64", "model.size: 'L4H64' is not of the form L<layers>H<hidden>A<heads>"),
        ('model.size="L4H64A4\\n"', "model.size: 'L4H64A4\\n' is not of the form"),
        ("model.size=L0H16A2", "model.size: layers, hidden and heads must be >= 1, got L0H16A2"),
        ("model.size=L2H32A3", "model.size: hidden 32 must split into 3 heads of an even size"),
        ("model.size=L1H12A4", "model.size: hidden 12 must split into 4 heads of an even size"),
        ("model.size=L1H18A1", "model.size: width H18 must be a multiple of 4"),
    ],
)
def test_model_settings(override: str, message: str) -> None:
    assert refused([override]).startswith(message)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("plan.sharding_types={item: []}", "plan.sharding_types.item: must be a non-empty list"),
        (
            "plan.sharding_types={item: [row_wise, diagonal]}",
            "plan.sharding_types.item: must be a non-empty list of table_wise, row_wise, "
            "column_wise, got ['row_wise', 'diagonal']",
        ),
        ("lum.temperature=.nan", f"lum.temperature: {POSITIVE}, got nan"),
        ("lum.negatives=-1", "lum.negatives: must be >= 0, got -1"),
        ("lum.pack=-1", "lum.pack: must be >= 0 (0: one user per row), got -1"),
        ("lum.pack=60", "lum.pack: must be 0 or at least 2 × model.max_len = 100"),
        ("lum.queries={liked: []}", "lum.queries: must be conditions that each give the same"),
    ],
)
def test_plan_and_lum_settings(override: str, message: str) -> None:
    assert refused([override]).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: 5\n", "model: expected a mapping of keys, got 5"),
        ("model: 0\n", "model: expected a mapping of keys, got 0"),
        ("model: [size, L4H64A4]\n", "model: expected a mapping of keys, got ['size', 'L4H64A4']"),
        ("stages: [pretrain]\n", "stages: expected a mapping of stage names, got ['pretrain']"),
        ("stages: {pretrain: 5}\n", "stages.pretrain: expected a mapping of sections, got 5"),
        # another stage's section is checked too: the mistake shows at the first stage run
        ("stages: {finetune: {run: 5}}\n", "stages.finetune.run: expected a mapping of keys"),
        ("stages: {finetune: {trainer: {}}}\n", "stages.finetune: unknown config sections"),
    ],
)
def test_sections_that_are_not_mappings(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert refused([], path, "pretrain").startswith(message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"- model\n- run\n", "expected a mapping of sections at the top, got ['model', 'run']"),
        (b"0\n", "expected a mapping of sections at the top, got 0"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not a UTF-8 text file (byte 0x89 at offset 0)"),
        (b"model: {size: caf\xe9}\n", "not a UTF-8 text file (byte 0xe9 at offset 17)"),
        (b"run: {epochs: 1}\x00\n", "not YAML text: character U+0000 at offset 16"),
        (b"optim:\n  lr: 0.1\n   bad: 1\n", "not valid YAML at line 3, column 7: mapping values"),
    ],
)
def test_files_that_are_not_a_yaml_mapping(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert refused([], path).startswith(f"{path}: {message}")


def test_a_config_path_that_is_a_directory_or_missing(tmp_path: Path) -> None:
    assert refused([], tmp_path) == f"{tmp_path}: cannot be read: is a directory"
    missing = tmp_path / "none.yaml"
    assert refused([], missing) == f"{missing}: cannot be read: no such file or directory"


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    assert refused([], path) == (
        f"{path}: not valid YAML at line 3, column 3: key 'lr' given twice "
        "(first at line 2, column 3)"
    )
    path.write_text("optim: {lr: 0.1}\noptim: {lr: 0.2}\n")
    assert "key 'optim' given twice (first at line 1, column 1)" in refused([], path)
    override = "plan.sharding_types={item: [row_wise], item: [table_wise]}"
    assert refused([override]) == (
        f"override {override!r}: not valid YAML at line 1, column 20: key 'item' given twice "
        "(first at line 1, column 2)"
    )


def test_merge_keys_may_override_what_they_merge(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: &shared {size: L1H16A2, max_len: 12}\n"
        "stages:\n  pretrain:\n    model: {<<: *shared, max_len: 20}\n"
    )
    assert load(path, (), "pretrain").model.max_len == 20


def test_a_string_is_not_a_bool_but_yaml_words_are(tmp_path: Path) -> None:
    assert refused(["run.resume='true'"]) == "run.resume: expected bool, got 'true'"
    assert refused(["run.resume=1"]) == "run.resume: expected bool, got 1"
    path = tmp_path / "c.yaml"
    path.write_text("run: {resume: no, cpu_bf16: yes}\n")
    run = load(path).run
    assert (run.resume, run.cpu_bf16) == (False, True)


def test_every_stage_config_in_configs_loads_for_every_stage() -> None:
    stage_configs = [
        p for p in sorted(CONFIGS.rglob("*.yaml")) if "arms" not in yaml.safe_load(p.read_text())
    ]
    assert stage_configs  # experiment files (with arms) have their own reader
    for path in stage_configs:
        for stage in STAGES:
            load(path, (), stage)


def run(argv: list[str]) -> int:
    try:
        return run_stage(pretrain.main, argv)
    except SystemExit as stop:  # argparse's way out
        return int(stop.code or 0)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and " INFO " not in line]


BAD = ["optim.clip_norm=-1", f"{POSITIVE}, or null for no clipping, got -1.0"]


def test_a_stage_given_a_bad_setting_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "stage"
    assert run(["--out", str(out), "data.train=nowhere", BAD[0]]) == EXIT_USER_ERROR
    assert not out.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert error_lines(err)[-1].endswith(f"optim.clip_norm: {BAD[1]}")


def test_a_stage_given_a_bad_setting_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run(["--out", str(tmp_path / "s"), BAD[0]]) == EXIT_USER_ERROR
    assert error_lines(capsys.readouterr().err) == [f"error (rank 0): optim.clip_norm: {BAD[1]}"]


def test_resuming_with_another_batch_size_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, synth_split
) -> None:
    data = synth_split(tmp_path / "data", 16, users=40, items=20, min_events=4, max_events=8)
    out = tmp_path / "p"
    common = ["--out", str(out), f"data.train={data / 'seq'}", "model.size=L1H16A2"]
    common += ["model.max_len=8", "model.negatives=4", "run.checkpoint_every=1"]
    pretrain.main([*common, "data.batch_size=8", "run.max_steps=2"])
    for leftover in ("DONE", "stage.json"):  # as if stopped after its last checkpoint
        (out / leftover).unlink()
    capsys.readouterr()
    assert run([*common, "data.batch_size=4", "run.max_steps=4"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert error_lines(err)[-1] == (
        "error (rank 0): the saved data cursor was made with other stream settings or files "
        "(saved, now): {'batch_size': (8, 4)}; resume with the same ones or start the epoch over"
    )
