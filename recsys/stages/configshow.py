"""``recsys config show STAGE``: the config a stage would run with, and every key it takes.

This module owns showing the stage config's schema (:mod:`recsys.stages.sections`) to a
user: the resolved config as YAML (file, ``stages.<stage>`` section and overrides, read by
:func:`recsys.stages.config.load` as the stage reads them), then each ``section.key`` with
its type as its dataclass declares it, its default and the docstring under its field (read
from the source with ``ast``, where it is written once)::

    recsys config show finetune --config configs/ml100k/2026-11-23-demo.yaml optim.lr=3e-4

The parser is built without importing the stages, so ``recsys --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from recsys.stages import STAGES

STAGES_HELP = ", ".join(STAGES[:-1]) + f" or {STAGES[-1]}"
"""The stages a config serves, for ``--help`` (the package's list: no stage imported)."""


@dataclass(frozen=True)
class Key:
    """One setting of a stage config."""

    name: str
    """``section.key``."""
    type: str
    """Its type as the dataclass declares it (``null`` for None)."""
    default: Any
    """Its default, as plain YAML data."""
    doc: str
    """The docstring under its field (empty if it has none)."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass ``cls``, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def every_key() -> list[Key]:
    """Every key of a stage config, section by section, in the order of the schema."""
    from recsys.stages.config import SECTIONS, field_type, section_class

    out = []
    for section in SECTIONS:
        cls = section_class(section)
        defaults = _plain(dataclasses.asdict(cls()))
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            name = f"{section}.{f.name}"
            kind = field_type(cls, f.name)
            out.append(Key(name, kind, defaults[f.name], docs.get(f.name, "")))
    return out


def show(stage: str, path: str | Path | None = None, overrides: tuple[str, ...] = ()) -> str:
    """The text ``recsys config show`` prints: the resolved config of ``stage`` as YAML,
    then every key with its type, default and doc."""
    from recsys.stages.config import ConfigError, load

    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
    config = load(path, overrides, stage)
    given = " ".join([f"--config {path}" if path else "built-in defaults", *overrides])
    lines = [f"# the config of stage {stage} ({given})"]
    for section, values in _plain(dataclasses.asdict(config)).items():
        lines += [f"{section}:", *(f"  {k}: {_inline(v)}" for k, v in values.items())]
    lines += ["", "# every key: type = default, then what it does (null: none, or derived)"]
    for key in every_key():
        lines.append(f"{key.name}: {key.type} = {_inline(key.default)}")
        lines += [f"    {line}" if line else "" for line in key.doc.splitlines()]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """``value`` as plain YAML data (tuples as lists, str subclasses as str)."""
    return json.loads(json.dumps(value))


def _inline(value: Any) -> str:
    """``value`` as YAML on one line."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1_000_000)
    return text.removesuffix("\n...\n").strip()


class _IntermixedParser(argparse.ArgumentParser):
    """A parser whose options may come between its positional arguments, as a stage's do
    (``STAGE --config F optim.lr=3e-4``): argparse's own parser would take STAGE and no
    override at once, then refuse the overrides after ``--config``."""

    _mixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._mixing:  # the intermixed parse runs the plain one itself
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def add_command(commands: argparse._SubParsersAction) -> None:
    """``recsys config show``."""
    actions = commands.add_parser(
        "config", help="show a stage's resolved config and what every key means"
    ).add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_IntermixedParser)
    p = actions.add_parser(
        "show",
        help="print a stage's resolved config, then every key's type, default and doc",
        description="Read the config as the stage would (the file, its stages.STAGE "
        "sections, the overrides in order), print it as YAML, then every section.key with its "
        "type, default and what it does. A bad setting is one line naming the key (exit 2).",
    )
    p.add_argument("stage", metavar="STAGE", help=f"the stage: {STAGES_HELP}")
    p.add_argument("--config", help="YAML stage config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    print(show(args.stage, args.config, tuple(args.overrides)))
    return 0
