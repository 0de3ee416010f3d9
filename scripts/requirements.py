"""Print the requirements `make setup` installs, in two groups, from the installed metadata.

torchrec's metadata requires `fbgemm-gpu`, the CUDA build, which cannot even import on a host
without a GPU. pip has no way to drop one dependency of a package, so setup installs torchrec
with --no-deps (group `no-deps`) and then everything else (group `deps`): recsys's own
requirements with the chosen extras (the tested stack: torch, torchrec and the FBGEMM build of
the `cpu` or `cuda` extra), plus torchrec's requirements except `fbgemm-gpu`, whose place is
taken by the extra's build.

Usage (after `pip install packaging` and `pip install --no-deps -e .`):
    python scripts/requirements.py no-deps --extras cpu
    python scripts/requirements.py deps --extras cpu,dev
"""

from __future__ import annotations

import argparse
from importlib import metadata

from packaging.requirements import Requirement

NO_DEPS = {"torchrec"}
DROPPED = {"fbgemm-gpu"}  # torchrec's CUDA-only requirement; replaced by the host's build


def requirements(dist: str, extras: set[str]) -> list[Requirement]:
    """The requirements of an installed distribution that apply on this host with ``extras``."""
    selected = []
    for line in metadata.requires(dist) or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
            requirement.marker = None
            selected.append(requirement)
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=["no-deps", "deps"])
    parser.add_argument("--extras", default="", help="comma-separated extras of recsys")
    args = parser.parse_args()
    extras = {e for e in args.extras.split(",") if e}
    own = requirements("recsys", extras)
    if args.group == "no-deps":
        lines = [r for r in own if r.name in NO_DEPS]
        if not lines:  # torchrec comes with the extra of a host's stack
            parser.error(f"no-deps: none of {sorted(NO_DEPS)} with extras {sorted(extras)}; "
                         "name the host's build, e.g. --extras cpu")  # fmt: skip
    else:
        lines = [r for r in own if r.name not in NO_DEPS]
        for dist in sorted(NO_DEPS):
            lines += [r for r in requirements(dist, set()) if r.name not in DROPPED]
    print("\n".join(str(r) for r in lines))


if __name__ == "__main__":
    main()
