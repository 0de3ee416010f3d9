"""``recsys doctor``: is this host's stack able to train?

This module owns the diagnosis of an installation: the versions of the stack, the
accelerator, the distributed backends, and a chain of checks ending with a real 2-rank gloo
job that shards a TorchRec ``EmbeddingCollection`` (``recsys.distributed.selfcheck``). Each
failed check names its cause and the fix. It imports torch and friends lazily, so that it
still reports when they are missing or broken.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

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


def installed() -> dict[str, list[tuple[str, str]]]:
    """For each package of the stack, the (distribution, version) pairs installed."""
    found: dict[str, list[tuple[str, str]]] = {}
    for label, dists in PACKAGES.items():
        found[label] = []
        for dist in dists:
            try:
                found[label].append((dist, metadata.version(dist)))
            except metadata.PackageNotFoundError:
                continue
    return found


def versions(stack: dict[str, list[tuple[str, str]]] | None = None) -> dict[str, str]:
    """Python's version and each package's, as the report shows them."""
    stack = installed() if stack is None else stack
    report = {"python": platform.python_version()}
    for label, found in stack.items():
        shown = [v if d == label else f"{v} ({d})" for d, v in found]
        report[label] = ", ".join(shown) or "not installed"
    return report


def pinned_versions() -> dict[str, str]:
    """Versions pinned with ``==`` by this project's requirements (the tested stack)."""
    try:
        requires = metadata.requires("recsys") or []
    except metadata.PackageNotFoundError:
        return {}
    pins = {}
    for line in requires:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        exact = [s.version for s in requirement.specifier if s.operator == "=="]
        if exact:
            pins[requirement.name.lower()] = exact[0]
    return pins


def _pin(name: str, fallback: str) -> str:
    return f"{name}=={pinned_versions().get(name, fallback)}"


def _release(version: str | None) -> tuple[int, ...]:
    """(major, minor) of a version; (0,) when absent or unreadable."""
    try:
        return Version(version).release[:2] if version else (0,)
    except InvalidVersion:
        return (0,)


# Version combinations seen to fail: (test on {package: version}, cause, fix).
KNOWN_BAD: list[tuple[Callable[[dict[str, str]], bool], str, str]] = [
    (
        lambda v: _release(v.get("torch")) == (2, 13) and _release(v.get("fbgemm-gpu")) >= (1, 9),
        "fbgemm-gpu 1.9 and newer fail to load their operators with torch 2.13 (ABI mismatch)",
        "install fbgemm-gpu-cpu==1.8.0 (CPU) or fbgemm-gpu==1.8.0 (CUDA): " + SETUP_FIX,
    ),
    (
        lambda v: "torchrec" in v and _release(v.get("torchmetrics")) >= (1, 9),
        "torchmetrics 1.9 and newer break torchrec.metrics' AUC (torchrec pins 1.0.3)",
        "pip install torchmetrics==1.0.3",
    ),
]


def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU has bf16 matrix units (AMX), which make ``run.cpu_bf16`` pay off;
    None where the CPU's flags cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return None
    return "amx_bf16" in flags.split() if flags else None


def accelerator() -> str:
    """CUDA devices and their names, or why there are none (and whether the CPU's bf16
    units make ``run.cpu_bf16`` worth turning on)."""
    import torch

    if not torch.cuda.is_available():
        built = (
            f"torch built with CUDA {torch.version.cuda}"
            if torch.version.cuda
            else "torch built without CUDA"
        )
        units = {
            True: "CPU with bf16 matrix units (AMX): run.cpu_bf16=true speeds training up",
            False: "CPU without bf16 matrix units (AMX): keep run.cpu_bf16 off",
            None: "CPU bf16 units unknown",
        }[cpu_bf16_units()]
        return f"none: no CUDA device ({built}); {units}"
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


def _check_packages(stack: dict[str, list[tuple[str, str]]]) -> Check:
    missing = [label for label, found in stack.items() if not found]
    if missing:
        return Check("stack installed", "fail", f"not installed: {', '.join(missing)}", SETUP_FIX)
    return Check("stack installed", "ok")


def _check_torch() -> Check:
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - any import failure is the finding
        return Check("torch imports", "fail", f"{type(error).__name__}: {error}", SETUP_FIX)
    return Check("torch imports", "ok", torch.__version__)


def _check_fbgemm_build(stack: dict[str, list[tuple[str, str]]]) -> Check:
    import torch

    builds = {dist for dist, _ in stack["fbgemm-gpu"]}
    cpu_fix = f"pip install {_pin('fbgemm-gpu-cpu', '1.8.0')}, or " + SETUP_FIX
    name = "fbgemm-gpu build fits this host"
    if not builds:
        return Check(name, "fail", "neither fbgemm-gpu nor fbgemm-gpu-cpu is installed", cpu_fix)
    if builds == {"fbgemm-gpu", "fbgemm-gpu-cpu"}:
        return Check(
            name,
            "fail",
            "both fbgemm-gpu and fbgemm-gpu-cpu are installed; they write the same package",
            "pip uninstall -y fbgemm-gpu fbgemm-gpu-cpu, then " + SETUP_FIX,
        )
    if builds == {"fbgemm-gpu"} and not torch.cuda.is_available():
        return Check(
            name,
            "fail",
            "the CUDA build fbgemm-gpu is installed but this host has no CUDA device",
            "pip uninstall -y fbgemm-gpu && " + cpu_fix,
        )
    if builds == {"fbgemm-gpu-cpu"} and torch.cuda.is_available():
        return Check(
            name,
            "warn",
            "the CPU build fbgemm-gpu-cpu is installed on a host with "
            "CUDA devices: embeddings will not run on the GPU",
            "make setup ACCEL=cuda",
        )
    return Check(name, "ok", "CUDA build" if builds == {"fbgemm-gpu"} else "CPU build")


def _explain_fbgemm(error: BaseException, builds: set[str]) -> tuple[str, str]:
    text = f"{type(error).__name__}: {error}"
    cpu_fix = (
        f"pip uninstall -y fbgemm-gpu fbgemm-gpu-cpu && pip install "
        f"{_pin('fbgemm-gpu-cpu', '1.8.0')}, or " + SETUP_FIX
    )
    if isinstance(error, ModuleNotFoundError) and (error.name or "").startswith("fbgemm_gpu"):
        return f"fbgemm_gpu cannot be imported ({text})", cpu_fix
    if re.search(r"libcuda|libcudart|libnvidia|libcublas|CUDA driver", text, re.I):
        which = (
            "the CUDA build fbgemm-gpu is installed on a host without a GPU"
            if "fbgemm-gpu" in builds
            else "its files come from a CUDA build, although fbgemm-gpu-cpu is what pip lists"
        )
        return f"fbgemm_gpu needs CUDA libraries this host lacks: {which} ({text})", cpu_fix
    if "undefined symbol" in text:
        return (
            f"fbgemm-gpu was built against another torch than the one installed ({text})",
            f"install the tested pair {_pin('torch', '2.13.0')} with "
            f"{_pin('fbgemm-gpu-cpu', '1.8.0')} (or fbgemm-gpu of the same version on "
            "CUDA): " + SETUP_FIX,
        )
    return f"fbgemm-gpu failed to load ({text})", SETUP_FIX


def _check_fbgemm_ops(stack: dict[str, list[tuple[str, str]]]) -> Check:
    name = "fbgemm-gpu operators load"
    try:
        import fbgemm_gpu  # noqa: F401
        import torch

        torch.ops.fbgemm.asynchronous_complete_cumsum  # noqa: B018 - raises if not registered
    except Exception as error:  # noqa: BLE001
        cause, fix = _explain_fbgemm(error, {dist for dist, _ in stack["fbgemm-gpu"]})
        return Check(name, "fail", cause, fix)
    return Check(name, "ok")


def _check_torchrec() -> Check:
    name = "torchrec imports"
    try:
        import torchrec.distributed  # noqa: F401
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "torchrec":
            return Check(
                name,
                "fail",
                "torchrec is not installed",
                f"pip install --no-deps {_pin('torchrec', '1.9.2')} (its metadata "
                "names the CUDA-only fbgemm-gpu), or " + SETUP_FIX,
            )
        return Check(name, "fail", f"a torchrec dependency is missing: {error}", SETUP_FIX)
    except Exception as error:  # noqa: BLE001
        return Check(name, "fail", f"{type(error).__name__}: {error}", SETUP_FIX)
    return Check(name, "ok")


def _check_versions(stack: dict[str, list[tuple[str, str]]]) -> Check:
    name = "known-good version combination"
    current = {label: found[0][1] for label, found in stack.items() if found}
    bad = [(cause, fix) for test, cause, fix in KNOWN_BAD if test(current)]
    if bad:
        return Check(name, "fail", "; ".join(c for c, _ in bad), "; ".join(f for _, f in bad))
    pins = pinned_versions()
    differ = []
    for found in stack.values():
        for dist, version in found:
            pin = pins.get(dist)
            if pin and Version(version).public != Version(pin).public:
                differ.append(f"{dist} {version} (tested: {pin})")
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


def _run_bounded(command: list[str], timeout: float) -> tuple[int, str, str] | None:
    """Run ``command`` in its own session; on timeout kill the whole group (ranks included)."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return proc.returncode, out, err


def _check_sharded_step(timeout: float) -> Check:
    name = "2 gloo ranks shard an EmbeddingCollection (row_wise), forward + backward"
    from recsys.distributed.selfcheck import passed

    start = time.monotonic()
    done = _run_bounded([sys.executable, "-m", "recsys.distributed.selfcheck", "row_wise"], timeout)
    if done is None:
        return Check(
            name,
            "fail",
            f"no result after {timeout:.0f} s (rendezvous or collective "
            "hung); its processes were killed",
            "check that localhost TCP ports are open; rerun with a larger --timeout",
        )
    code, out, err = done
    seconds = time.monotonic() - start
    try:
        results = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = "\n".join((err or out).strip().splitlines()[-15:])
        return Check(name, "fail", f"the 2-rank job failed (exit code {code}):\n{tail}", SETUP_FIX)
    failed = [r for r in results if not passed(r)]
    if code != 0 or failed:
        problems = []
        for r in failed:
            if r["forward_error"] != 0.0:
                problems.append(
                    f"rank {r['rank']}: forward differs from the unsharded "
                    f"reference by {r['forward_error']:.3g}"
                )
            if r["update_error"] >= 1e-6:
                problems.append(f"rank {r['rank']}: SGD update differs by {r['update_error']:.3g}")
            if r["rows_updated"] == 0:
                problems.append(f"rank {r['rank']}: the backward step changed no rows")
        return Check(
            name,
            "fail",
            "; ".join(problems) or f"exit code {code}",
            "report it with this output; try the tested versions: " + SETUP_FIX,
        )
    return Check(
        name, "ok", f"outputs equal the reference, SGD update within 1e-6 ({seconds:.1f} s)"
    )


def diagnose(timeout: float = 300.0) -> dict:
    """Run every check; return the whole report as a dict (``ok`` is the verdict)."""
    stack = installed()
    report: dict = {"versions": versions(stack), "accelerator": None, "backends": {}, "checks": []}
    checks: list[Check] = report["checks"]
    checks.append(_check_packages(stack))
    checks.append(_check_torch())
    if checks[-1].status == "fail":
        return _finish(report)
    report["accelerator"] = accelerator()
    report["backends"] = backends()
    checks.append(_check_fbgemm_build(stack))
    checks.append(_check_fbgemm_ops(stack))
    fbgemm_ok = checks[-1].status != "fail"
    checks.append(
        _check_torchrec()
        if fbgemm_ok
        else Check("torchrec imports", "skip", "needs fbgemm-gpu operators")
    )
    checks.append(_check_versions(stack))
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
