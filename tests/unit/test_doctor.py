"""`recsys doctor` passes on a working stack and names cause and fix when a part is broken.

Broken stacks are simulated in a subprocess whose PYTHONPATH puts a package in front of the
real one that fails on import the way a broken install does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys import doctor

RECSYS = str(Path(sys.executable).with_name("recsys"))


def run_doctor(
    *args: str, shadow: dict[str, str] | None = None, tmp_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if shadow:
        assert tmp_path is not None
        for package, source in shadow.items():
            (tmp_path / package).mkdir()
            (tmp_path / package / "__init__.py").write_text(source)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [RECSYS, "doctor", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.dist
def test_doctor_passes_on_this_host() -> None:
    proc = run_doctor("--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["ok"] is True
    assert [c["status"] for c in report["checks"]] == ["ok"] * 8
    assert report["checks"][-1]["name"].startswith("2 gloo ranks shard an EmbeddingCollection")
    for package in (
        "python",
        "torch",
        "torchrec",
        "fbgemm-gpu",
        "torchx",
        "pyarrow",
        "torchmetrics",
    ):
        assert report["versions"][package] != "not installed"
    assert report["backends"]["gloo"] is True
    text = doctor.render(report)
    assert text.endswith("all checks passed")
    assert "accelerator" in text and "distributed backends" in text


def test_cuda_fbgemm_on_cpu_host_is_named(tmp_path: Path) -> None:
    proc = run_doctor(
        tmp_path=tmp_path,
        shadow={
            "fbgemm_gpu": (
                "raise OSError('libcudart.so.12: cannot open shared object file: "
                "No such file or directory')"
            )
        },
    )
    assert proc.returncode == 1
    out = proc.stdout
    assert "FAIL  fbgemm-gpu operators load" in out
    assert "fbgemm_gpu needs CUDA libraries this host lacks" in out
    assert "libcudart.so.12" in out
    assert "pip install fbgemm-gpu-cpu==1.8.0" in out
    assert "SKIP  torchrec imports" in out
    assert "SKIP  2-rank sharded EmbeddingCollection step" in out
    assert out.rstrip().endswith("1 check(s) failed: fbgemm-gpu operators load")


def test_fbgemm_built_for_another_torch_is_named(tmp_path: Path) -> None:
    proc = run_doctor(
        tmp_path=tmp_path,
        shadow={
            "fbgemm_gpu": (
                "raise OSError('fbgemm_gpu_py.so: undefined symbol: _ZN3c1017RegisterOperators')"
            )
        },
    )
    assert proc.returncode == 1
    assert "fbgemm-gpu was built against another torch" in proc.stdout
    assert "torch==2.13.0 with fbgemm-gpu-cpu==1.8.0" in proc.stdout


def test_missing_torchrec_is_named(tmp_path: Path) -> None:
    proc = run_doctor(
        tmp_path=tmp_path,
        shadow={
            "torchrec": (
                "raise ModuleNotFoundError(\"No module named 'torchrec'\", name='torchrec')"
            )
        },
    )
    assert proc.returncode == 1
    assert "FAIL  torchrec imports" in proc.stdout
    assert "pip install --no-deps torchrec==1.9.2" in proc.stdout


def test_known_bad_combination_fails() -> None:
    stack = doctor.installed()
    stack["torch"] = [("torch", "2.13.0+cpu")]
    stack["fbgemm-gpu"] = [("fbgemm-gpu-cpu", "1.9.0")]
    check = doctor._check_versions(stack)
    assert check.status == "fail"
    assert "fbgemm-gpu 1.9 and newer fail to load their operators with torch 2.13" in check.detail


def test_untested_versions_only_warn() -> None:
    stack = doctor.installed()
    stack["torchx"] = [("torchx", "0.6.0")]
    check = doctor._check_versions(stack)
    assert check.status == "warn"
    assert check.detail == "differs from the tested stack: torchx 0.6.0 (tested: 0.7.0)"


def test_missing_package_fails() -> None:
    stack = doctor.installed()
    stack["pyarrow"] = []
    check = doctor._check_packages(stack)
    assert (check.status, check.detail) == ("fail", "not installed: pyarrow")
    assert doctor.versions(stack)["pyarrow"] == "not installed"
    stack["fbgemm-gpu"] = []
    assert doctor._check_fbgemm_build(stack).status == "fail"


def test_wrong_sharded_results_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    result = {
        "rank": 1,
        "world_size": 2,
        "sharding_type": "row_wise",
        "forward_error": 0.5,
        "update_error": 0.0,
        "rows_updated": 0,
        "local_shards": 2,
    }
    monkeypatch.setattr(doctor, "_run_bounded", lambda cmd, timeout: (1, json.dumps([result]), ""))
    check = doctor._check_sharded_step(10)
    assert check.status == "fail"
    assert "rank 1: forward differs from the unsharded reference by 0.5" in check.detail
    assert "rank 1: the backward step changed no rows" in check.detail


def test_timeout_kills_the_whole_job(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    assert doctor._run_bounded([sys.executable, "-c", script], timeout=3) is None
    status = Path(f"/proc/{int(pid_file.read_text())}/status")
    for _ in range(50):  # the kill is immediate; reaping by init may take a moment
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    assert not status.exists() or "State:\tZ" in status.read_text()


@pytest.mark.gpu
def test_doctor_names_every_cuda_device() -> None:
    import torch

    line = doctor.accelerator()
    assert f"{torch.cuda.device_count()} device(s)" in line
    for i in range(torch.cuda.device_count()):
        assert torch.cuda.get_device_name(i) in line


def test_doctor_says_whether_cpu_bf16_pays_off(tmp_path) -> None:
    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    plain.write_text("processor : 0\nflags : fpu avx2 avx512f\n")
    assert doctor.cpu_bf16_units(str(amx)) is True
    assert doctor.cpu_bf16_units(str(plain)) is False
    assert doctor.cpu_bf16_units(str(tmp_path / "missing")) is None
