"""Every command README.md and docs/*.md show runs as written, or is marked and listed.

Unmarked blocks run in order, one workspace per page (docs_shell.py says how blocks are read
and where they run), two pages at a time; a command the tests may not run (make, pip, docker,
a cluster's) or one with a placeholder (``...``, ``[--option]``, ``<name>``) fails its block
unless a ``# long: ...`` or ``# needs: ...`` comment marks it (placeholders fail even then).
Marked commands are listed at the end of the run and checked without running: their program
is one the repository knows, the files, Makefile targets and components they name exist,
``recsys`` accepts their arguments and ``torchx run`` dry-runs them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from docs_shell import (
    BIN,
    MARKED_KEY,
    REPO,
    Block,
    Command,
    Workspace,
    all_blocks,
    runnable,
    shell_blocks,
)

BLOCKS = all_blocks()
RUN = [b for b in BLOCKS if b.unmarked]
MARKED = [c for b in BLOCKS for c in b.commands if c.marker]
TOP = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")} - {
    "data",
    "runs",
}
KNOWN = {"make", "pip", "docker", "git", "torchrun", "recsys", "torchx", "python", "python3"}
# `...`, `[--option value]`, `<name>`: what a reader must fill in, so not a command as written
_PLACEHOLDER = re.compile(r"(?:^|\s)(\.\.\.|\[-[^\]]*\]|<[\w.-]+>)(?=\s|$)")


def placeholders(command: Command) -> list[str]:
    return [
        f"{command.where}: {found!r} is a placeholder: write a value that runs"
        for found in _PLACEHOLDER.findall(command.text)
    ]


def refusal(block: Block) -> str | None:
    """Why a block must not run: a command the tests may not run unmarked, a placeholder."""
    lines = []
    for command in block.unmarked:
        lines += placeholders(command)
        if not runnable(command):
            lines.append(
                f"{command.where}: {command.text!r} is not one of the project's commands "
                "(recsys, torchx, python on its files): mark it '# long: why' or '# needs: what'"
            )
    return "\n".join(lines) or None


class Pages:
    """Runs the pages of the selected blocks, two at a time, each up to its last selected
    block (earlier blocks first: later ones may read what they wrote)."""

    def __init__(self, root: Path, wanted: set[str]) -> None:
        self.results: dict[str, Future] = {b.where: Future() for b in RUN}
        self.pool = ThreadPoolExecutor(max_workers=2)
        pages = {b.page for b in RUN if b.where in wanted}
        for page in sorted(pages, key=lambda p: -sum(len(b.unmarked) for b in RUN if b.page == p)):
            self.pool.submit(self._page, root / page.replace("/", "-"), page, wanted)

    def _page(self, root: Path, page: str, wanted: set[str]) -> None:
        blocks = [b for b in RUN if b.page == page]
        last = max(i for i, b in enumerate(blocks) if b.where in wanted)
        try:
            workspace = Workspace(root)
            for block in blocks[: last + 1]:
                refused = refusal(block)
                result = (False, refused) if refused else workspace.run(block)
                self.results[block.where].set_result(result)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting tests
            for block in blocks:
                if not self.results[block.where].done():
                    self.results[block.where].set_exception(err)


@pytest.fixture(scope="session")
def pages(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    wanted = {
        item.callspec.params["block"].where
        for item in request.session.items
        if item.originalname == "test_block_runs_as_written"
    }
    running = Pages(tmp_path_factory.mktemp("docs"), wanted)
    yield running
    running.pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[b.where for b in RUN])
def test_block_runs_as_written(block: Block, pages: Pages) -> None:
    ok, transcript = pages.results[block.where].result()
    assert ok, transcript


def marked_problems(command: Command, workspace: Workspace) -> list[str]:
    """What is wrong with a marked command, checked without running it."""
    problems = placeholders(command)
    words = command.words
    program = words[0].removeprefix(".venv/bin/") if words else ""
    args = words[1:]
    if program == "make":
        targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))
        problems += [
            f"make has no target {t!r}"
            for t in args
            if not t.startswith("-") and "=" not in t and t not in targets
        ]
    elif program == "recsys":
        problems += _recsys_refuses(args)
    elif program == "torchx" and args[:1] == ["run"]:
        problems += _torchx_dryrun_fails(args[1:], workspace)
    elif program in {"python", "python3", "torchrun"}:
        problems += _python_target_missing(args)
    elif "/" in program and not program.startswith(".venv/"):
        if not (REPO / program).is_file():
            problems.append(f"{program}: no such file in the repository")
    elif program not in KNOWN:
        problems.append(f"{program!r} is not a command the repository knows")
    for word in words[1:]:
        path = word.split("=", 1)[-1]
        if path.split("/", 1)[0] in TOP and "/" in path:
            problems += _names_what_exists(path)
    return [f"{command.where}: {p}" for p in problems]


def _recsys_refuses(args: list[str]) -> list[str]:
    from recsys.cli import build_parser

    said = io.StringIO()
    with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(args)
        except SystemExit as stop:
            if stop.code:
                return [f"recsys refuses its arguments: {said.getvalue().strip()}"]
    return []


def _torchx_dryrun_fails(args: list[str], workspace: Workspace) -> list[str]:
    dry = args if "--dryrun" in args else ["--dryrun", *args]
    done = subprocess.run(
        [str(BIN / "torchx"), "run", *dry],
        cwd=workspace.root, env=workspace.env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    if done.returncode:
        return [f"torchx run --dryrun fails: {done.stderr.strip()[-2000:]}"]
    return []


def _python_target_missing(args: list[str]) -> list[str]:
    """``-m MODULE`` importable from the repository or the environment, or a script file."""
    if "-m" in args:
        module = args[args.index("-m") + 1]
        top = module.split(".")[0]
        if top in TOP:
            path = REPO / module.replace(".", "/")
            if path.with_suffix(".py").is_file() or (path / "__main__.py").is_file():
                return []
        elif importlib.util.find_spec(top) is not None:
            return []
        return [f"no module {module}"]
    scripts = [a for a in args if not a.startswith("-")]
    if scripts and not (REPO / scripts[0]).is_file():
        return [f"{scripts[0]}: no such file in the repository"]
    return []


def _names_what_exists(path: str) -> list[str]:
    """A repository path (``components/FILE.py:FUNCTION`` names a function of the file)."""
    name, _, function = path.partition(":")
    if not (REPO / name).exists():
        return [f"{name}: no such file in the repository"]
    if function and not re.search(rf"^def {function}\(", (REPO / name).read_text(), re.M):
        return [f"{name} has no function {function}"]
    return []


def test_marked_commands_name_what_exists(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Listed at the end of the run (conftest.py), whatever the outcome."""
    assert MARKED, "no page marks a command: the marker convention is not being read"
    request.config.stash[MARKED_KEY] = [f"{c.where}  [{c.marker}]  {c.text}" for c in MARKED]
    workspace = Workspace(tmp_path / "marked")
    problems = [p for command in MARKED for p in marked_problems(command, workspace)]
    assert not problems, "\n".join(problems)


def test_every_page_is_read() -> None:
    """README and every page of docs/ are read, and their shell blocks found."""
    pages = {b.page for b in BLOCKS}
    assert "README.md" in pages
    assert {"docs/plan.md", "docs/data.md", "docs/clusters.md", "docs/stages.md"} <= pages
    assert len(RUN) >= 5


SAMPLE = """\
Text.

```bash
recsys plan --table item=1e3 \\
    --out p.json              # a plan
# long: a minute or two
recsys pipeline run --experiment "a b.yaml"   # ends # here
```

1. A list item:

   ```console
   $ recsys data inspect d   # needs: a dataset
   it prints this
   $ recsys plan --compare a.json b.json   # exit 1: they differ
   ```

```yaml
not: a command
```
"""


def test_blocks_read_as_documented() -> None:
    first, second = shell_blocks("page.md", SAMPLE)
    plan, pipeline = first.commands
    assert (plan.line, plan.text) == (4, "recsys plan --table item=1e3 --out p.json")
    assert (plan.comment, plan.marker, plan.expected_exit) == ("a plan", None, 0)
    assert pipeline.words == ["recsys", "pipeline", "run", "--experiment", "a b.yaml"]
    assert pipeline.marker == "long: a minute or two"  # a marker line marks what follows
    assert [c.text for c in second.commands] == [
        "recsys data inspect d",
        "recsys plan --compare a.json b.json",
    ]
    inspect, compare = second.commands
    assert (inspect.line, inspect.marker) == (13, "needs: a dataset")
    assert (compare.marker, compare.expected_exit) == (None, 1)
    assert second.unmarked == (compare,)


def test_commands_outside_the_project_or_with_placeholders_are_refused_unmarked() -> None:
    (block,) = shell_blocks(
        "page.md",
        "```sh\nrecsys --help\nmake demo\nrecsys plan --out <file>\n"
        "python -m pip install x\npython -m venv .venv\npython -m recsys.cli --help\n"
        "make test   # long: the suite\n```\n",
    )
    assert refusal(block).splitlines() == [
        "page.md:3: 'make demo' is not one of the project's commands (recsys, torchx, python "
        "on its files): mark it '# long: why' or '# needs: what'",
        "page.md:4: '<file>' is a placeholder: write a value that runs",
        "page.md:5: 'python -m pip install x' is not one of the project's commands (recsys, "
        "torchx, python on its files): mark it '# long: why' or '# needs: what'",
        "page.md:6: 'python -m venv .venv' is not one of the project's commands (recsys, "
        "torchx, python on its files): mark it '# long: why' or '# needs: what'",
    ]


def test_a_block_runs_in_one_shell_and_stops_at_an_unexpected_exit_code(tmp_path: Path) -> None:
    (block,) = shell_blocks(
        "page.md",
        "```bash\ncd configs\npython -c 'import sys; sys.exit(1)'   # exit 1: as told\n"
        "python -c 'import pathlib, sys; sys.exit(pathlib.Path.cwd().name != \"configs\")'\n"
        "python -c 'import sys; sys.exit(3)'\npython -c 'print(\"never\")'\n```\n",
    )
    ok, transcript = Workspace(tmp_path / "ws").run(block)
    assert not ok
    assert "page.md:5: exit code 3, expected 0" in transcript
    assert "never" not in transcript  # nor echoed: the block stopped before it
