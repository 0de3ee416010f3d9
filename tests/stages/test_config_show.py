"""``recsys config show``: the resolved config of a stage, then every key's type, default and
the docstring under its field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from recsys.cli import main
from recsys.stages import STAGES, configshow
from recsys.stages.config import SECTIONS, load, section_class

DEMO = Path(__file__).parents[2] / "configs" / "ml100k" / "2026-11-23-demo.yaml"


def test_the_resolved_config_is_what_the_stage_loads() -> None:
    overrides = ("optim.lr=3e-4", "plan.sharding_types={user: [table_wise]}")
    text = configshow.show("pretrain", DEMO, overrides)
    header, _, rest = text.partition("\n")
    assert header == f"# the config of stage pretrain (--config {DEMO} {' '.join(overrides)})"
    resolved = yaml.safe_load(rest.partition("\n\n")[0])
    loaded = json.loads(json.dumps(dataclasses.asdict(load(DEMO, overrides, "pretrain"))))
    assert resolved == loaded
    assert resolved["run"]["epochs"] == 20 and resolved["optim"]["lr"] == 3e-4  # stages.pretrain
    assert resolved["optim"]["total_steps"] is None  # derived from the data when it runs


def test_every_key_has_its_type_default_and_doc() -> None:
    keys = {key.name: key for key in configshow.every_key()}
    expected = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(section_class(s))]
    assert list(keys) == expected
    assert all(key.doc for key in keys.values()), [k for k, v in keys.items() if not v.doc]
    warmup = keys["optim.warmup_steps"]
    assert (warmup.type, warmup.default) == ("int | null", None)
    assert warmup.doc.startswith("Linear warm-up from 0 to ``lr`` (None: 10% of the run's")
    assert (keys["run.keep"].type, keys["run.keep"].default) == ("int", 2)
    assert keys["plan.sharding_types"].default == {"item": ["row_wise"]}
    text = configshow.show("finetune")
    assert "\nrun.keep: int = 2\n    Checkpoints kept.\n" in text
    assert "\nplan.sharding_types: dict[str, list[str]] = {item: [row_wise]}\n" in text
    assert "\ndata.valid: str | null = null\n" in text


def test_the_command_takes_options_between_stage_and_overrides(
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["config", "show", "finetune", "--config", str(DEMO), "optim.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert "\noptim:\n  lr: 0.0003\n" in out and "\nrun:\n  epochs: 4\n" in out
    assert main(["config", "show", "finetune", "optim.lr=3e-4", "--config", str(DEMO)]) == 0
    assert capsys.readouterr().out == out


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["pretrian"], "recsys config: unknown stage 'pretrian'; stages: ['pretrain', "),
        (["pretrain", "optim.lr=fast"], "recsys config: optim.lr: expected float, got 'fast'"),
    ],
)
def test_mistakes_are_one_line(argv: list[str], line: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(line)


def test_the_help_names_every_stage() -> None:
    named = ", ".join(STAGES[:-1]) + f" or {STAGES[-1]}"
    assert named == configshow.STAGES_HELP
