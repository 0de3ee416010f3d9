"""The stage components build the recorded jobs.

``appdefs.json`` holds, for each component and a set of its command lines, the AppDef that
``torchx run`` builds from them (``{python}`` stands for the interpreter that runs the test):
command line, environment, resources, replicas, retry policy and ports. Every one must come
out the same.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from pathlib import Path

import pytest
from torchx.specs.builders import materialize_appdef
from torchx.specs.finder import get_component

from recsys.stages.appdef import STAGES

RECORDED = json.loads((Path(__file__).parent / "appdefs.json").read_text())


def plain(value):
    """An AppDef as the JSON record holds it."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, str):
        return value.replace(sys.executable, "{python}")
    return value


def test_the_record_covers_every_component() -> None:
    assert {case["component"] for case in RECORDED} == {*STAGES, "doctor"}


@pytest.mark.parametrize(
    "case", RECORDED, ids=[f"{c['component']}-{i}" for i, c in enumerate(RECORDED)]
)
def test_the_appdef_is_the_recorded_one(case: dict, monkeypatch) -> None:
    monkeypatch.delenv("LOGLEVEL", raising=False)  # torchrun's level: WARNING unless set
    name = case["component"]
    component = get_component(f"components/{name}.py:{name}")
    assert plain(materialize_appdef(component.fn, case["args"])) == case["appdef"]


def test_force_is_a_bool_in_help_and_refuses_other_words() -> None:
    from torchx.specs.builders import _create_args_parser

    component = get_component("components/pretrain.py:pretrain")
    assert "--force bool" in _create_args_parser(component.fn).format_help()
    with pytest.raises(SystemExit):  # argparse: invalid bool value: 'yes'
        materialize_appdef(component.fn, ["--force", "yes"])
    args = materialize_appdef(component.fn, ["--force", "true"]).roles[0].args[-1]
    assert " --force" in args


def test_mounts_reach_the_role() -> None:
    from torchx.specs import BindMount, VolumeMount

    component = get_component("components/finetune.py:finetune")
    mounts = "type=bind,src=/data,dst=/data,readonly,type=volume,src=runs,dst=/runs"
    (role,) = materialize_appdef(component.fn, ["--mounts", mounts]).roles
    assert role.mounts == [
        BindMount(src_path="/data", dst_path="/data", read_only=True),
        VolumeMount(src="runs", dst_path="/runs", read_only=False),
    ]


@pytest.mark.parametrize("stage", STAGES)
def test_help_lists_every_option_with_its_type_and_text(stage: str) -> None:
    from torchx.specs.builders import _create_args_parser

    text = " ".join(
        _create_args_parser(get_component(f"components/{stage}.py:{stage}").fn)
        .format_help()
        .split()
    )
    for shown in ["-j str", "--cpu int", "--memMB int", "--env str", "--max_retries int"]:
        assert shown in text
    assert "--force bool" in text and "--mounts str" in text
    assert "hosts × processes per host" in text and "restarts after a failure" in text
    assert "(default: None)" in text and "(default: 8192)" in text
