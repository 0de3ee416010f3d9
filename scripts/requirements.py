"""Print the requirements `make setup` installs, in two groups, from the installed metadata.

torchrec's metadata requires `fbgemm-gpu`, the CUDA build, which cannot even import on a host
without a GPU. pip has no way to drop one dependency of a package, so setup installs torchrec
with --no-deps (group `no-deps`) and then everything else (group `deps`): recsys's own
requirements with the chosen extras, plus torchrec's requirements except `fbgemm-gpu`, whose
place is taken by the build in the `cpu` or `cuda` extra.

Usage (after `pip install --no-deps -e .`):
    python scripts/requirements.py no-deps
    python scripts/requirements.py deps --extras cpu,dev
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata

NO_DEPS = {"torchrec"}
DROPPED = {"fbgemm-gpu"}  # torchrec's CUDA-only requirement; replaced by the host's build


def _name(requirement: str) -> str:
    return re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1).lower().replace("_", "-")


def _split_extra(requirement: str) -> tuple[str, str | None]:
    """The requirement without an `extra == "x"` marker, and that extra (None if absent)."""
    body, _, marker = requirement.partition(";")
    match = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if not match:
        return requirement.strip(), None
    rest = re.sub(r"(and\s+)?extra\s*==\s*['\"][^'\"]+['\"](\s+and)?", "", marker).strip()
    return (f"{body.strip()}; {rest}" if rest else body.strip()), match.group(1)


def requirements(dist: str, extras: set[str]) -> list[str]:
    """The requirements of an installed distribution that apply with ``extras``."""
    selected = []
    for requirement in metadata.requires(dist) or []:
        line, extra = _split_extra(requirement)
        if extra is None or extra in extras:
            selected.append(line)
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=["no-deps", "deps"])
    parser.add_argument("--extras", default="", help="comma-separated extras of recsys")
    args = parser.parse_args()
    extras = {e for e in args.extras.split(",") if e}
    own = requirements("recsys", extras)
    if args.group == "no-deps":
        lines = [r for r in own if _name(r) in NO_DEPS]
    else:
        lines = [r for r in own if _name(r) not in NO_DEPS]
        for dist in NO_DEPS:
            lines += [r for r in requirements(dist, set()) if _name(r) not in DROPPED]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
