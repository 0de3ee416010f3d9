"""``recsys doctor``: is this host's stack able to train?

This module owns the diagnosis of an installation: the versions of the stack, the
accelerator, the distributed backends, and a chain of checks ending with a real 2-rank gloo
job that shards a TorchRec ``EmbeddingCollection`` (``recsys.distributed.selfcheck``). Each
failed check names its cause and the fix. It imports torch and friends lazily, so that it
still reports when they are missing or broken.
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata

PACKAGES = {
    # What the report calls a package → the distributions that provide it.
    "torch": ("torch",),
    "torchrec": ("torchrec",),
    "fbgemm-gpu": ("fbgemm-gpu", "fbgemm-gpu-cpu"),
    "torchx": ("torchx",),
    "pyarrow": ("pyarrow",),
    "torchmetrics": ("torchmetrics",),
}

SETUP_FIX = "run `make setup` (CPU) or `make setup ACCEL=cuda` (GPU hosts)"


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    """``ok``, ``warn`` (works, but outside what is tested), ``fail`` or ``skip``."""
    detail: str = ""
    fix: str = ""


def _installed(names: tuple[str, ...]) -> list[tuple[str, str]]:
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append((name, metadata.version(name)))
    return found


def versions() -> dict[str, str]:
    """The version of python and of each package of the stack ('not installed' if absent)."""
    report = {"python": platform.python_version()}
    for label, dists in PACKAGES.items():
        found = _installed(dists)
        report[label] = (
            ", ".join(v if d == label else f"{v} ({d})" for d, v in found) or "not installed"
        )
    return report


def pinned_versions() -> dict[str, str]:
    """Versions pinned with ``==`` by this project's own requirements (its tested stack)."""
    try:
        requires = metadata.requires("recsys") or []
    except metadata.PackageNotFoundError:
        return {}
    pins = {}
    for requirement in requires:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;]+)", requirement)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


# Version combinations seen to fail; each entry: (test on installed versions, cause, fix).
KNOWN_BAD: list[tuple[Callable[[dict[str, str]], bool], str, str]] = [
    (
        lambda v: (
            _major_minor(v.get("torch", "0")) == (2, 13)
            and _major_minor(v.get("fbgemm", "0")) >= (1, 9)
        ),
        "fbgemm-gpu 1.9 and newer fail to load their operators with torch 2.13 (ABI mismatch)",
        "install fbgemm-gpu-cpu==1.8.0 (CPU) or fbgemm-gpu==1.8.0 (CUDA): " + SETUP_FIX,
    ),
    (
        lambda v: "torchrec" in v and _major_minor(v.get("torchmetrics", "0")) >= (1, 9),
        "torchmetrics 1.9 and newer break torchrec.metrics' AUC (torchrec pins 1.0.3)",
        "pip install torchmetrics==1.0.3",
    ),
]


def accelerator() -> str:
    """CUDA devices and their names, or why there are none."""
    import torch

    if not torch.cuda.is_available():
        built = (
            f"torch built with CUDA {torch.version.cuda}"
            if torch.version.cuda
            else "torch built without CUDA"
        )
        return f"none: no CUDA device ({built})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"CUDA {torch.version.cuda}, {len(names)} device(s): " + ", ".join(
        f"{i}: {n}" for i, n in enumerate(names)
    )


def backends() -> dict[str, bool]:
    """Which collective backends this torch build offers."""
    import torch.distributed as dist

    if not dist.is_available():
        return {"gloo": False, "nccl": False, "mpi": False, "ucc": False}
    return {
        "gloo": dist.is_gloo_available(),
        "nccl": dist.is_nccl_available(),
        "mpi": dist.is_mpi_available(),
        "ucc": dist.is_ucc_available(),
    }


def _explain_fbgemm(error: BaseException) -> tuple[str, str]:
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, ModuleNotFoundError) and (error.name or "").startswith("fbgemm_gpu"):
        return (
            f"fbgemm-gpu is not installed ({text})",
            "pip install fbgemm-gpu-cpu==1.8.0, or " + SETUP_FIX,
        )
    if re.search(r"libcuda|libcudart|libnvidia|libcublas|CUDA driver", text, re.I):
        return (
            f"fbgemm-gpu needs CUDA libraries this host lacks: the CUDA build is installed "
            f"on a host without a GPU ({text})",
            "pip uninstall -y fbgemm-gpu && pip install fbgemm-gpu-cpu==1.8.0, or " + SETUP_FIX,
        )
    if "undefined symbol" in text:
        return (
            f"fbgemm-gpu was built against another torch than the one installed ({text})",
            "install the tested pair torch==2.13.0 with fbgemm-gpu-cpu==1.8.0 (or "
            "fbgemm-gpu==1.8.0 on CUDA): " + SETUP_FIX,
        )
    return f"fbgemm-gpu failed to load ({text})", SETUP_FIX


def _check_torch() -> Check:
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - any import failure is the finding
        return Check("torch imports", "fail", f"{type(error).__name__}: {error}", SETUP_FIX)
    return Check("torch imports", "ok", torch.__version__)


def _check_fbgemm_build() -> Check:
    import torch

    cuda_build = [d for d, _ in _installed(("fbgemm-gpu",))]
    cpu_build = [d for d, _ in _installed(("fbgemm-gpu-cpu",))]
    name = "fbgemm-gpu build fits this host"
    if cuda_build and cpu_build:
        return Check(
            name,
            "fail",
            "both fbgemm-gpu and fbgemm-gpu-cpu are installed; they write the same package",
            "pip uninstall -y fbgemm-gpu fbgemm-gpu-cpu, then " + SETUP_FIX,
        )
    if cuda_build and not torch.cuda.is_available():
        return Check(
            name,
            "fail",
            "the CUDA build fbgemm-gpu is installed but this host has no CUDA device",
            "pip uninstall -y fbgemm-gpu && pip install fbgemm-gpu-cpu==1.8.0, or " + SETUP_FIX,
        )
    if cpu_build and torch.cuda.is_available():
        return Check(
            name,
            "warn",
            "the CPU build fbgemm-gpu-cpu is installed on a host with "
            "CUDA devices: embeddings will not run on the GPU",
            "make setup ACCEL=cuda",
        )
    return Check(name, "ok", "CUDA build" if cuda_build else "CPU build")


def _check_fbgemm_ops() -> Check:
    name = "fbgemm-gpu operators load"
    try:
        import fbgemm_gpu  # noqa: F401
        import torch

        torch.ops.fbgemm.asynchronous_complete_cumsum  # noqa: B018 - raises if not registered
    except Exception as error:  # noqa: BLE001
        cause, fix = _explain_fbgemm(error)
        return Check(name, "fail", cause, fix)
    return Check(name, "ok")


def _check_torchrec() -> Check:
    name = "torchrec imports"
    try:
        import torchrec
        import torchrec.distributed  # noqa: F401
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "torchrec":
            return Check(
                name,
                "fail",
                "torchrec is not installed",
                "pip install --no-deps torchrec==1.9.2 (its metadata names the "
                "CUDA-only fbgemm-gpu), or " + SETUP_FIX,
            )
        return Check(name, "fail", f"a torchrec dependency is missing: {error}", SETUP_FIX)
    except Exception as error:  # noqa: BLE001
        return Check(name, "fail", f"{type(error).__name__}: {error}", SETUP_FIX)
    return Check(name, "ok")


def _check_versions(report: dict[str, str]) -> Check:
    name = "known-good version combination"
    installed = {k: v.split(" ")[0] for k, v in report.items() if v != "not installed"}
    installed["fbgemm"] = installed.get("fbgemm-gpu", "0")
    bad = [(cause, fix) for test, cause, fix in KNOWN_BAD if test(installed)]
    if bad:
        return Check(name, "fail", "; ".join(c for c, _ in bad), "; ".join(f for _, f in bad))
    pins = pinned_versions()
    pins.setdefault("fbgemm-gpu", pins.get("fbgemm-gpu-cpu", ""))
    differ = [
        f"{k} {installed[k]} (tested: {pins[k]})"
        for k in PACKAGES
        if pins.get(k) and k in installed and installed[k].split("+")[0] != pins[k]
    ]
    if differ:
        return Check(name, "warn", "differs from the tested stack: " + ", ".join(differ), SETUP_FIX)
    return Check(name, "ok")


def _check_gloo(available: dict[str, bool]) -> Check:
    if available.get("gloo"):
        return Check("gloo backend available", "ok")
    return Check(
        "gloo backend available",
        "fail",
        "this torch build has no gloo backend",
        "install a torch build with distributed support: " + SETUP_FIX,
    )


def _check_sharded_step(timeout: float) -> Check:
    name = "2 gloo ranks shard an EmbeddingCollection (row_wise), forward + backward"
    command = [sys.executable, "-m", "recsys.distributed.selfcheck", "row_wise"]
    start = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check(
            name,
            "fail",
            f"no result after {timeout:.0f} s (rendezvous or collective hung)",
            "check that localhost TCP ports are open; rerun with a larger --timeout",
        )
    seconds = time.monotonic() - start
    try:
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return Check(
            name, "fail", f"the 2-rank job failed (exit code {proc.returncode}):\n{tail}", SETUP_FIX
        )
    if proc.returncode != 0:
        worst = max(results, key=lambda r: (r["forward_error"], r["update_error"]))
        return Check(
            name,
            "fail",
            f"sharded results differ from the unsharded reference: "
            f"forward error {worst['forward_error']:.3g}, update error "
            f"{worst['update_error']:.3g} on rank {worst['rank']}",
            "report it with this output; try the tested versions: " + SETUP_FIX,
        )
    return Check(name, "ok", f"outputs and SGD update equal the reference ({seconds:.1f} s)")


def diagnose(timeout: float = 300.0) -> dict:
    """Run every check; return the whole report as a dict (``ok`` is the verdict)."""
    report: dict = {"versions": versions(), "accelerator": None, "backends": {}, "checks": []}
    checks: list[Check] = report["checks"]
    checks.append(_check_torch())
    if checks[-1].status == "fail":
        return _finish(report)
    report["accelerator"] = accelerator()
    report["backends"] = backends()
    checks.append(_check_fbgemm_build())
    checks.append(_check_fbgemm_ops())
    fbgemm_ok = checks[-1].status != "fail"
    checks.append(
        _check_torchrec()
        if fbgemm_ok
        else Check("torchrec imports", "skip", "needs fbgemm-gpu operators")
    )
    checks.append(_check_versions(report["versions"]))
    checks.append(_check_gloo(report["backends"]))
    if all(c.status in ("ok", "warn") for c in checks):
        checks.append(_check_sharded_step(timeout))
    else:
        checks.append(
            Check("2-rank sharded EmbeddingCollection step", "skip", "needs every check above")
        )
    return _finish(report)


def _finish(report: dict) -> dict:
    report["ok"] = all(c.status in ("ok", "warn") for c in report["checks"])
    report["checks"] = [asdict(c) for c in report["checks"]]
    return report


def render(report: dict) -> str:
    """The report as text for a terminal."""
    lines = ["versions"]
    lines += [f"  {k:<13} {v}" for k, v in report["versions"].items()]
    lines += ["accelerator", f"  {report['accelerator'] or 'unknown (torch did not import)'}"]
    lines += [
        "distributed backends",
        "  " + "  ".join(f"{k}: {'yes' if v else 'no'}" for k, v in report["backends"].items()),
    ]
    lines.append("checks")
    for check in report["checks"]:
        detail = f": {check['detail']}" if check["detail"] and check["status"] != "fail" else ""
        lines.append(f"  {check['status'].upper():<5} {check['name']}{detail}")
        if check["status"] == "fail":
            lines.append("        cause: " + check["detail"].replace("\n", "\n               "))
            lines.append(f"        fix:   {check['fix']}")
        elif check["status"] == "warn" and check["fix"]:
            lines.append(f"        fix:   {check['fix']}")
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    lines.append(
        "all checks passed"
        if report["ok"]
        else f"{len(failed)} check(s) failed: " + ", ".join(c["name"] for c in failed)
    )
    return "\n".join(lines)


def main(as_json: bool = False, timeout: float = 300.0) -> int:
    """Print the report; exit code 0 only when every check passes."""
    report = diagnose(timeout)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0 if report["ok"] else 1
