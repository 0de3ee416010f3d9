"""YAML files a user writes for the pipeline (experiment files, ``torchx.yaml``).

This module owns parsing them into plain data with every mistake in one line: the file, the
position and the problem. A key given twice in one mapping is refused (PyYAML keeps the last
one silently, so the line a reader sees first would not be the one in effect).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """The safe loader (plain data only), refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (first at line {first.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def read(path: str | Path, error: type[Exception]) -> Any:
    """The content of the YAML file ``path``; ``error`` (one line naming the file) when it
    cannot be read or parsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        reason = err.strerror or str(err)
        raise error(f"{path}: cannot be read: {reason[:1].lower()}{reason[1:]}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not a UTF-8 text file (byte offset {err.start})") from None
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or "cannot be parsed"
        raise error(f"{path}: not valid YAML{at}: {problem}") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
