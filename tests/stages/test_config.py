"""Stage configs: YAML + overrides → typed sections, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.stages.build import optim_config
from recsys.stages.config import ConfigError, load


def test_file_and_overrides_resolve_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {size: L2H32A4}\noptim: {lr: 0.01, betas: [0.9, 0.95]}\n")
    config = load(
        path, ["optim.lr=3e-4", "run.max_steps=null", "plan.sharding_types={item: [table_wise]}"]
    )
    assert config.model.size == "L2H32A4"
    assert config.optim.lr == 3e-4 and config.optim.betas == (0.9, 0.95)
    assert config.run.max_steps is None
    assert config.plan.sharding_types == {"item": ["table_wise"]}


def test_a_mapping_given_again_replaces_the_whole_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("plan: {sharding_types: {user: [table_wise]}}\n")
    assert load(path).plan.sharding_types == {"user": ["table_wise"]}  # no default item
    override = "plan.sharding_types={item: [column_wise]}"
    assert load(path, [override]).plan.sharding_types == {"item": ["column_wise"]}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
        (["model.layers=4"], "model: unknown keys ['layers']"),
        (["trainer.epochs=2"], "unknown config sections ['trainer']"),
        (["epochs=2"], "is not of the form section.key=value"),
        (["run.epochs=true"], "run.epochs: expected int, got True"),
        (["optim.sparse=sgd"], "optim.sparse: the sparse optimizer must be one of"),
    ],
)
def test_bad_configs_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load(None, overrides)
    assert message in str(err.value)


def test_schedule_fits_the_run_unless_the_config_sets_it() -> None:
    unset = load(None, ["run.epochs=3"])
    assert (unset.optim.total_steps, unset.optim.warmup_steps) == (None, None)  # derived
    fitted = optim_config(unset, steps_per_epoch=50)
    assert (fitted.total_steps, fitted.warmup_steps) == (150, 15)
    capped = optim_config(load(None, ["run.epochs=3", "run.max_steps=40"]), steps_per_epoch=50)
    assert (capped.total_steps, capped.warmup_steps) == (40, 4)
    long = optim_config(load(None, ["run.epochs=30"]), steps_per_epoch=50)
    assert (long.total_steps, long.warmup_steps) == (1500, 100)  # warm-up capped at 100
    given = optim_config(load(None, ["optim.total_steps=7", "optim.warmup_steps=2"]), 50)
    assert (given.total_steps, given.warmup_steps) == (7, 2)
    # Warm-up left to the data takes 10% of the run, whatever the schedule's length.
    half = optim_config(load(None, ["optim.total_steps=1000", "run.epochs=3"]), 50)
    assert (half.total_steps, half.warmup_steps) == (1000, 15)
    # Set to the numbers an unset length records, they still count as set.
    same = optim_config(load(None, ["optim.total_steps=1000", "optim.warmup_steps=100"]), 5)
    assert (same.total_steps, same.warmup_steps) == (1000, 100)


def test_stage_sections_apply_to_their_stage_only(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run: {epochs: 2}\nstages:\n  pretrain: {run: {epochs: 20}}\n")
    assert load(path, stage="pretrain").run.epochs == 20
    assert load(path, stage="finetune").run.epochs == 2
    assert load(path, ["run.epochs=30"], stage="pretrain").run.epochs == 30  # overrides win
    path.write_text("stages:\n  pretrian: {run: {epochs: 20}}\n")
    with pytest.raises(ConfigError, match=r"unknown stages \['pretrian'\]"):
        load(path, stage="pretrain")


def test_an_unset_lum_section_leaves_gpsd_records_as_they_were() -> None:
    # GPSD stages record (and fingerprint) their config without LUM's section unless set.
    assert "lum" not in load(None, ["model.size=L1H16A2"]).to_dict()
    record = load(None, ["lum.queries={liked: [0, 1]}"]).to_dict()
    assert record["lum"]["queries"] == {"liked": [0, 1]}
    with pytest.raises(ConfigError, match="same number"):
        load(None, ["lum.queries={a: [0, 1], b: [0]}"])


def test_cpu_bf16_is_recorded_only_when_on() -> None:
    assert "cpu_bf16" not in load(None, []).to_dict()["run"]
    config = load(None, ["run.cpu_bf16=true"])
    assert config.run.cpu_bf16 and config.to_dict()["run"]["cpu_bf16"] is True


def test_values_are_taken_as_written() -> None:
    # OmegaConf would read these as an interpolation, an environment variable and a missing
    # value: a setting is what it says.
    for text in ("runs/${name}/seq", "${oc.env:HOME}", "???", "a\\${b", "\\???"):
        assert load(None, [f"data.train='{text}'"]).data.train == text
    refused = {
        "data.train=123": "data.train: expected str, got 123",
        "data.valid=[a]": "data.valid: expected str | null, got ['a']",
        "lum.queries={liked: ['0']}": "lum.queries: expected dict[str, list[int]], got",
        "optim.betas=[0.9]": "optim.betas: expected tuple[float, float], got [0.9]",
        "run.epochs=${run.keep}": "run.epochs: expected int, got '${run.keep}'",
    }
    for override, message in refused.items():
        with pytest.raises(ConfigError) as err:
            load(None, [override])
        assert str(err.value).startswith(message)
    widened = load(None, ["optim.lr=1", "optim.sparse_lr=3e-4", "optim.betas=[0, 0.5]"]).optim
    assert (widened.lr, widened.sparse_lr, widened.betas) == (1.0, 3e-4, (0.0, 0.5))
    assert all(isinstance(v, float) for v in (widened.lr, *widened.betas))


def test_every_stage_section_is_checked_by_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("stages:\n  finetune: {model: {layers: 4}}\n")
    with pytest.raises(ConfigError, match=r"^stages\.finetune\.model: unknown keys \['layers'\]"):
        load(path, stage="pretrain")
