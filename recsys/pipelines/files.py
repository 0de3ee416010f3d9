"""The project's files beside the package: ``torchx.yaml`` and ``components/``.

A pipeline reads the scheduler profiles of ``torchx.yaml`` and builds each stage's job from
``components/<stage>.py``, from whatever directory it runs. This module owns finding the
directory that holds both, the first of:

1. ``$RECSYS_HOME`` (a checkout, or a copy of the two to edit);
2. the checkout the ``recsys`` package is imported from (a working tree, ``make setup``'s
   editable install, ``PYTHONPATH``);
3. where ``pip install`` put them beside an installed package: ``share/recsys`` under the
   environment's data directory (pyproject's ``data-files``).

A command's own option (``recsys pipeline run --profiles FILE``) still wins for the profiles.
It does not read them.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from recsys.errors import UserError

HOME = "RECSYS_HOME"
"""The environment variable naming the directory of torchx.yaml and components/."""

PROFILES = "torchx.yaml"
COMPONENTS = "components"


def home() -> Path:
    """The directory holding ``torchx.yaml`` and ``components/``."""
    given = os.environ.get(HOME)
    if given:
        path = Path(given).expanduser().absolute()
        if not (path / PROFILES).is_file() or not (path / COMPONENTS).is_dir():
            raise UserError(
                f"{HOME}={given}: expected a directory with {PROFILES} and {COMPONENTS}/"
            )
        return path
    for path in _candidates():
        if (path / PROFILES).is_file() and (path / COMPONENTS).is_dir():
            return path
    raise UserError(
        f"no {PROFILES} and {COMPONENTS}/ beside the recsys package nor in an environment's "
        f"share/recsys: set {HOME} to a checkout of the project"
    )


def profiles() -> Path:
    """The project's ``torchx.yaml``."""
    return home() / PROFILES


def component(name: str) -> str:
    """TorchX's name of a component of ``components/``: ``PATH/components/NAME.py:NAME``."""
    return f"{home() / COMPONENTS / name}.py:{name}"


def _candidates() -> list[Path]:
    import recsys

    checkout = Path(recsys.__file__).resolve().parents[1]
    schemes = [sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")]
    return [checkout, *(Path(sysconfig.get_path("data", s)) / "share" / "recsys" for s in schemes)]
