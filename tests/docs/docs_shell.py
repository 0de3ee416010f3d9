"""The shell commands that README.md and docs/*.md show, read as a reader would copy them.

This module owns reading the commands out of the pages and running a page's blocks; what is
asserted about them lives in test_shell_blocks.py.

- A shell block is a fenced block whose info string is ``bash``, ``sh``, ``shell`` or
  ``console`` (indented fences inside lists count); other blocks (output, YAML, diagrams) are
  not commands.
- In a block where lines start with ``$ ``, those lines are the commands and the others their
  output; elsewhere every line that is not a comment is a command. A line ending in ``\\``
  continues on the next.
- A comment whose text starts with ``long:`` or ``needs:`` marks what the tests list instead
  of running (``# long: about 90 minutes``, ``# needs: a Slurm cluster``): after a command, that
  command; on a line of its own, every command below it in the block.
- A comment ``# exit N: why`` after a command says it exits with N (``diff``-like commands).
- Pages run in a workspace of their own whose entries link to the repository's, so commands
  see the repository root (configs/, components/, torchx.yaml, ``.venv`` the interpreter's
  environment) and what they write (data/, runs/, plan files) stays in the workspace.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = ("README.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md")))
SHELL_INFO = {"bash", "sh", "shell", "console"}
MARKERS = ("long:", "needs:")
BIN = Path(sys.executable).parent
# The project's own commands, run from the environment of this interpreter; anything else a
# page shows (make, pip, docker, torchrun, scripts/...) must carry a marker.
RUNNABLE = {"recsys", "torchx", "python", "python3", ".", "source", "cd", "export"}
STATEFUL = {".", "source", "cd", "export"}  # builtins that must run in the block's own shell
COMMAND_TIMEOUT_S = 90
# What the workspace does not take from the repository: its history, outputs, environments.
NOT_LINKED = {".git", ".venv", "data", "runs", ".pytest_cache", ".ruff_cache", "__pycache__"}

MARKED_KEY = pytest.StashKey[list[str]]()  # the marked commands, listed after the run

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)")
_EXIT = re.compile(r"^exit (?P<code>\d+):")


@dataclass(frozen=True)
class Command:
    """One command of a page, its continuation lines joined."""

    page: str
    line: int
    text: str
    comment: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def expected_exit(self) -> int:
        found = _EXIT.match(self.comment)
        return int(found["code"]) if found else 0

    @property
    def words(self) -> list[str]:
        """The words of the command, environment assignments (``VAR=value``) left out."""
        words = shlex.split(self.text)
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words.pop(0)
        return words

    @property
    def program(self) -> str:
        words = self.words
        return words[0] if words else ""


@dataclass(frozen=True)
class Block:
    """A shell block: where it starts (its fence's line) and its commands."""

    page: str
    line: int
    commands: tuple[Command, ...]

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def unmarked(self) -> tuple[Command, ...]:
        return tuple(c for c in self.commands if c.marker is None)


def split_comment(line: str) -> tuple[str, str]:
    """``cmd args  # note`` → (``cmd args``, ``note``): a ``#`` that starts a word outside
    quotes begins the comment, as in bash."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"':
                continue
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def marker_of(comment: str) -> str | None:
    return comment if comment.startswith(MARKERS) else None


def shell_blocks(page: str, text: str) -> list[Block]:
    """The shell blocks of a page, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        fence, indent = opened["fence"], len(opened["indent"])
        body_start = i + 1
        j = body_start
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            j += 1
        if opened["info"].lower() in SHELL_INFO:
            body = [
                (n + 1, line[indent:]) for n, line in enumerate(lines[body_start:j], body_start)
            ]
            blocks.append(Block(page, i + 1, tuple(_commands(page, body))))
        i = j + 1
    return blocks


def _commands(page: str, body: list[tuple[int, str]]) -> list[Command]:
    prompted = any(line.startswith("$ ") for _, line in body)
    commands: list[Command] = []
    section: str | None = None  # a marker on a line of its own marks what follows
    k = 0
    while k < len(body):
        number, line = body[k]
        k += 1
        if prompted:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            section = marker_of(stripped.lstrip("#").strip()) or section
            continue
        parts = [line]
        while parts[-1].rstrip().endswith("\\") and k < len(body):
            parts[-1] = parts[-1].rstrip()[:-1]
            parts.append(body[k][1])
            k += 1
        code, comment = split_comment(parts[-1])
        parts[-1] = code
        text = " ".join(part.strip() for part in parts)
        commands.append(Command(page, number, text, comment, marker_of(comment) or section))
    return commands


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in shell_blocks(page, (REPO / page).read_text())]


def runnable(command: Command) -> bool:
    """Whether the tests may run this command unmarked: the project's own programs, from
    this interpreter's environment; ``python -m`` only on the repository's modules (not pip or
    venv, which would change that environment)."""
    words = command.words
    program = words[0].removeprefix(".venv/bin/") if words else ""
    if program not in RUNNABLE:
        return False
    if program.startswith("python") and words[1:2] == ["-m"]:
        path = REPO / (words[2] if len(words) > 2 else "").replace(".", "/")
        return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()
    return True


class Workspace:
    """A page's working directory: the repository's entries linked, outputs its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for entry in REPO.iterdir():
            if entry.name not in NOT_LINKED and not entry.name.endswith(".egg-info"):
                (root / entry.name).symlink_to(entry)
        (root / ".venv").symlink_to(BIN.parent)  # the environment the tests run in
        self.env = dict(os.environ)
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p
        )

    def run(self, block: Block) -> tuple[bool, str]:
        """Run the block's unmarked commands in order in one shell: (all as expected, the
        transcript). A command that fails, or runs past COMMAND_TIMEOUT_S, stops the block."""
        script = ["set -o pipefail"]
        for command in block.unmarked:
            script.append(f"echo {shlex.quote(f'$ {command.text}    [{command.where}]')}")
            if command.program in STATEFUL:
                script.append(command.text)
            else:
                quoted = shlex.quote(command.text)
                script.append(f"timeout -k 5 {COMMAND_TIMEOUT_S} bash -o pipefail -c {quoted}")
            late = f"ran past {COMMAND_TIMEOUT_S} s: mark it '# long: ...'"
            script.append(
                f"rc=$?; if [ $rc -ne {command.expected_exit} ]; then "
                f"if [ $rc -eq 124 ]; then echo {shlex.quote(f'{command.where}: {late}')}; "
                f"else echo {shlex.quote(command.where)}': exit code '$rc', expected "
                f"{command.expected_exit}'; fi; exit 1; fi"
            )
        start = time.monotonic()
        done = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT_S * (len(block.unmarked) + 1),
            check=False,
        )
        took = f"[{block.where}: {time.monotonic() - start:.1f} s]"
        return done.returncode == 0, f"{done.stdout}\n{took}"
