"""YAML a user writes (stage configs, overrides, experiment files, ``torchx.yaml``) → plain data.

This module owns reading such YAML with every mistake in one line naming the file (or the
override), the position and the problem, raised as the caller's own error class. Only plain
data is built (YAML's safe loader), and a key given twice in one mapping is refused: PyYAML
would keep the last one silently, so the line a reader sees first would not be the one in
effect. Merge keys (``<<: *base``) may still be overridden, as YAML intends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from recsys.errors import os_reason


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class refuses it
                continue
            if seen is not key_node:
                at = seen.start_mark
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (first at line {at.line + 1}, column "
                    f"{at.column + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def parse(text: str, where: str, error: type[Exception]) -> Any:
    """``text`` as YAML, or ``error`` of one line naming ``where`` and the position."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "cannot be parsed"
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{where}: not valid YAML{at}: {problem}") from None
    except yaml.reader.ReaderError as err:  # a character YAML text cannot hold (binary data)
        code = err.character if isinstance(err.character, int) else ord(err.character)
        where = f"{where}: not YAML text"
        raise error(f"{where}: character U+{code:04X} at offset {err.position}") from None
    except yaml.YAMLError as err:
        raise error(f"{where}: not valid YAML: {' '.join(str(err).split())}") from None


def read(path: str | Path, error: type[Exception], what: str = "YAML text") -> Any:
    """The content of the YAML file ``path``; ``error`` (one line naming the file) when it
    cannot be read, is not UTF-8 or cannot be parsed. ``what`` names the kind of file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"{path}: cannot be read: {os_reason(err)}") from None
    except UnicodeDecodeError as err:
        raise error(
            f"{path}: not a UTF-8 text file (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); {what}"
        ) from None
    return parse(text, str(path), error)
