"""``recsys export``: the artifact of a tiny finetuned model, scored by plain PyTorch.

One finetune stage (world of one) and its ``evaluate`` predictions serve every test: the
artifact must give the training model's scores, in a process that cannot import recsys or
torchrec.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.cli import main as cli
from recsys.errors import UserError
from recsys.serve import score
from recsys.serve.export import ExportError, export
from recsys.serve.quantize import ServedTable, quantize_rows
from recsys.stages import evaluate, finetune, freeze, transfer

TINY = ["model.size=L1H16A2", "model.max_len=12", "model.negatives=8", "data.batch_size=32"]
MAX_LEN = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, synth_split) -> dict[str, Path]:
    """Data, a transfer (NT) → freeze (category) → finetune chain, the finetuned model's
    predictions on ctr_test, and its fp32 artifact. A frozen table lives in its own TorchRec
    collection: the export must find it there too."""
    root = tmp_path_factory.mktemp("export")
    # Histories up to 30 events: longer than max_len, so truncation is exercised.
    data = synth_split(
        root / "data", 64, users=300, items=80, categories=4, min_events=6, max_events=30, seed=3
    )
    ctr = [*TINY, f"data.train={data / 'ctr_train'}", "run.max_steps=60"]
    transfer.main(["--strategy", "NT", "--out", str(root / "nt"), *ctr])
    freeze.main(
        ["--tables", "category", "--init", str(root / "nt"), "--out", str(root / "sf"), *ctr]
    )
    record = finetune.main(["--init", str(root / "sf"), "--out", str(root / "finetune"), *ctr])
    assert record["frozen"] == ["category"]
    evaluate.main(
        ["--model", str(root / "finetune"), "--data", str(data / "ctr_test"),
         "--out", str(root / "evaluate")]
    )  # fmt: skip
    export(root / "finetune", root / "fp32")
    return {"root": root, "data": data, "stage": root / "finetune", "fp32": root / "fp32"}


def predictions(runs: dict[str, Path]) -> dict[tuple[int, int], float]:
    """evaluate's score (sigmoid of the training model's logit) per (user, candidate)."""
    rows = pq.read_table(runs["root"] / "evaluate" / "predictions").to_pylist()
    scores = {(r["user_id"], r["candidate_item"]): r["score"] for r in rows}
    assert len(scores) == len(rows)  # one sample per (user, candidate): a key is a sample
    return scores


def ctr_test_table(runs: dict[str, Path]) -> pa.Table:
    parts = sorted((runs["data"] / "ctr_test").glob("*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in parts)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def plain_site(tmp: Path) -> Path:
    """Links to every entry of this environment's site-packages but recsys (its editable
    finder), torchrec and fbgemm-gpu (TorchRec's kernels): an import path without them."""
    site = Path(torch.__file__).resolve().parents[1]
    out = tmp / "site"
    out.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("torchrec", "fbgemm", "recsys", "__editable__")) or name.endswith(
            ".pth"
        ):
            continue
        (out / entry.name).symlink_to(entry)
    return out


# Run in the child: neither recsys nor torchrec importable, then score.py as a script.
CHILD = """
import runpy, sys
sys.path.append(sys.argv[1])
for name in ("recsys", "torchrec"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable in the child")
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_plain(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    # -I -S: no PYTHONPATH, no user or environment site-packages, no .pth files.
    command = [sys.executable, "-I", "-S", "-c", CHILD, str(plain_site(tmp)), *args]
    return subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300)


def test_fp32_artifact_scores_like_the_training_model_without_recsys_or_torchrec(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "scores.parquet"
    scorer = runs["fp32"] / "score.py"
    done = run_plain(tmp_path, str(scorer), str(runs["data"] / "ctr_test"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    served = pq.read_table(out).to_pylist()
    expected = predictions(runs)
    assert len(served) == len(expected) == len(ctr_test_table(runs))
    diffs = [abs(r["score"] - expected[(r["user_id"], r["candidate"])]) for r in served]
    assert max(diffs) <= 1e-5
    # Histories longer than max_len were scored: truncation matched the training loader's.
    lengths = pa.compute.list_value_length(ctr_test_table(runs)["history_item_ids"])
    assert pa.compute.max(lengths).as_py() > MAX_LEN


def test_the_program_takes_any_batch_and_history_length_up_to_max_len(
    runs: dict[str, Path],
) -> None:
    artifact = score.load(runs["fp32"])
    rng = np.random.default_rng(0)
    items = rng.integers(0, 80, size=(1024, MAX_LEN + 1))
    history = artifact.sides[items[:, :-1]].transpose(0, 2, 1).copy()
    lengths = rng.integers(0, MAX_LEN + 1, size=1024)
    history = np.where(
        np.arange(MAX_LEN)[None, None, :] < lengths[:, None, None],
        history,
        artifact.padding[None, :, None],
    )
    candidate = artifact.sides[items[:, -1]]
    full = artifact.score_ids(history, candidate)
    assert full.shape == (1024,) and np.isfinite(full).all()
    np.testing.assert_allclose(
        artifact.score_ids(history[:64], candidate[:64]), full[:64], atol=1e-6
    )
    np.testing.assert_allclose(artifact.score_ids(history[:1], candidate[:1]), full[:1], atol=1e-6)
    # Shorter padded widths give the same scores to rows that fit them.
    short = lengths <= 3
    np.testing.assert_allclose(
        artifact.score_ids(history[short][:, :, :3], candidate[short]), full[short], atol=1e-6
    )
    with pytest.raises(AssertionError, match=r"history.size\(\)\[2\] <= 12"):  # its guard
        artifact.score_ids(np.concatenate([history, history[:, :, :1]], 2), candidate)


def test_int8_tables_keep_the_auc_within_0_002(runs: dict[str, Path], tmp_path: Path) -> None:
    export(runs["stage"], tmp_path / "int8", "int8")
    table = ctr_test_table(runs)
    labels = table["label"].to_numpy()
    fp32 = score.load(runs["fp32"]).score_table(table)
    int8 = score.load(tmp_path / "int8").score_table(table)
    assert abs(auc(int8, labels) - auc(fp32, labels)) <= 0.002
    assert 0 < np.abs(int8 - fp32).max() < 0.01  # quantized, and close
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["dtype"] == "int8"
    rows = manifest["tables"][0]["rows"]
    assert manifest["tables"][0]["bytes"] == rows * 16 + rows * 8  # codes, scale and offset


def test_row_wise_int8_is_within_half_a_step_of_each_row() -> None:
    weight = torch.randn(50, 16) * torch.logspace(-3, 1, 50)[:, None]
    weight[7] = 0.0
    codes, scale, offset = quantize_rows(weight)
    assert codes.dtype == torch.int8
    back = ServedTable(weight, "int8").dequantized()
    assert torch.equal(back, codes.float() * scale + offset)  # what the lookup computes
    step = (weight.amax(1) - weight.amin(1)) / 255
    assert ((back - weight).abs().amax(1) <= step / 2 + 1e-6 * weight.abs().amax(1)).all()
    assert torch.equal(back[7], torch.zeros(16))  # a zeroed row stays exactly zero


def test_fp16_artifact_loads_and_scores(runs: dict[str, Path], tmp_path: Path) -> None:
    assert cli(["export", "--model", str(runs["stage"]), "--out", str(tmp_path / "h"),
                "--dtype", "fp16"]) == 0  # fmt: skip
    table = ctr_test_table(runs)
    fp16 = score.load(tmp_path / "h").score_table(table)
    fp32 = score.load(runs["fp32"]).score_table(table)
    assert np.isfinite(fp16).all() and np.abs(fp16 - fp32).max() < 1e-3
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    rows = manifest["tables"][0]["rows"]
    assert manifest["dtype"] == "fp16" and manifest["tables"][0]["bytes"] == rows * 16 * 2


def test_unknown_raw_keys_map_to_the_zeroed_unknown_row(runs: dict[str, Path]) -> None:
    artifact = score.load(runs["fp32"])
    item, category = artifact.manifest["tables"]
    history, candidate = artifact.encode_raw(
        pa.array([[3, 10_000, 5], [10_001]]), pa.array([20_000, 4])
    )
    assert history[0, 0].tolist() == [3, item["unknown"], 5]
    assert history[0, 1, 1] == category["unknown"]  # an unseen item's side feature is unknown
    assert candidate[0].tolist() == [item["unknown"], category["unknown"]]
    assert history[1, 0, 0] == item["unknown"] and candidate[1, 0] == 4
    # The reserved rows of every table are zero in the exported program.
    program = torch.export.load(runs["fp32"] / "model.pt2")
    for entry in (item, category):
        weight = program.state_dict.get(f"lookups.{entry['name']}.weight")
        if weight is None:
            weight = program.constants[f"lookups.{entry['name']}.weight"]
        assert weight.shape == (entry["rows"], 16)
        assert not weight[entry["unknown"] :].any() and weight[: entry["unknown"]].any()
    requests = [
        {"user_id": 1, "history": [3, 10_000], "candidate": 20_000},
        {"user_id": 2, "history": [3, 10_002], "candidate": 20_001},  # other unseen keys
        {"user_id": 3, "history": [], "candidate": 4},
    ]
    scores = artifact.score_requests(requests)
    assert np.isfinite(scores).all()
    assert scores[0] == scores[1]  # every unseen key is the same (unknown) row


def test_export_refuses_other_stages_and_an_existing_out(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    nt = runs["root"] / "nt"
    assert cli(["export", "--model", str(nt), "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (
        f"recsys export: --model {nt} is a transfer stage; export takes a finished finetune stage\n"
    )
    with pytest.raises(UserError, match="not a finished stage"):
        export(runs["data"] / "ctr_test", tmp_path / "b")
    fp32 = runs["fp32"]
    before = (fp32 / "manifest.json").read_text()
    with pytest.raises(ExportError, match=f"--out {fp32}: exists already; pass --force"):
        export(runs["stage"], fp32, "int8")
    assert (fp32 / "manifest.json").read_text() == before  # untouched
    with pytest.raises(ExportError, match="overlaps the stage"):
        export(runs["stage"], runs["stage"] / "artifact", force=True)
    # --force replaces it whole, and leaves no temporary directory beside it.
    copy = tmp_path / "copy"
    export(runs["stage"], copy)
    export(runs["stage"], copy, "int8", force=True)
    assert json.loads((copy / "manifest.json").read_text())["dtype"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
