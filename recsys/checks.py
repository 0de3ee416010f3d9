"""Range checks of typed settings: one line naming the key, the rule and the value.

Each settings dataclass (a stage config's sections, ``OptimConfig``, ``RunConfig``) checks its
values in ``__post_init__`` with :func:`require`. Its message starts with the key as the
dataclass knows it (``lr: must be ...``); a stage config puts the section in front of it
(``optim.lr: must be ...``).
"""

from __future__ import annotations

import math
from typing import Any


def shown(value: Any, most: int = 80) -> str:
    """``repr(value)``, cut to ``most`` characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= most else f"{text[: most - 3]}..."


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """``key: must be RULE, got VALUE`` as a ValueError unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}: must be {rule}, got {shown(value)}")


def positive(value: float) -> bool:
    """A finite number > 0 (NaN and infinities are neither)."""
    return math.isfinite(value) and value > 0
