"""No module of ``recsys`` imports itself through others, not even from inside a function.

The graph is read from the source with ``ast``: every ``import``/``from`` statement wherever
it stands (module level, functions, ``if`` blocks), relative imports resolved against the
module's package, and ``from package import name`` counted as an import of the submodule
``package.name`` when there is one (of ``package`` otherwise). An import hidden inside a
function still ties the two modules together: one cannot be read, tested or moved without
the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "recsys"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``root`` by dotted name (a package by its own)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that module ``name`` (at ``path``) imports anywhere."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()

    def owner(dotted: str) -> str | None:  # the longest known module that ``dotted`` names
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [owner(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else owner(source)
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t and t != name)
    return found


def graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root, package)
    return {name: imported(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_recsys_has_no_import_cycle():
    edges = graph()
    assert len(edges) > 50 and "recsys.stages.build" in edges  # the walk found the package
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        (  # the circle hidden in a function
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from pkg.b import f\n",
                "pkg/b.py": "def f():\n    from pkg import c\n",
                "pkg/c.py": "import pkg.a\n",
            },
            ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ),
        (  # relative imports, from the module and from its package
            {
                "pkg/__init__.py": "",
                "pkg/sub/__init__.py": "from . import x\n",
                "pkg/sub/x.py": "def g():\n    from ..y import h\n",
                "pkg/y.py": "from .sub import x\n",
            },
            ["pkg.sub.x", "pkg.y", "pkg.sub.x"],
        ),
    ],
)
def test_a_cycle_is_found_and_named(tmp_path, files, expected):
    assert find_cycle(graph(write(tmp_path, files), "pkg")) == expected


def test_imports_that_close_no_circle_pass(tmp_path):
    root = write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low.py": "import json\n",
            "pkg/mid.py": "from pkg import low\nfrom pkg.low import json\n",
            "pkg/top.py": "def f():\n    from . import mid, low\n",
        },
    )
    edges = graph(root, "pkg")
    assert edges["pkg.top"] == {"pkg.mid", "pkg.low"} and edges["pkg.mid"] == {"pkg.low"}
    assert find_cycle(edges) is None
