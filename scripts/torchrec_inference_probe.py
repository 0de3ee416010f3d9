"""What TorchRec's own inference path does on this host's CPU build: a probe, not a feature.

    python scripts/torchrec_inference_probe.py

Builds the CTR model's tables as our training code does (``SparseArch``: one
``EmbeddingCollection`` of ``item`` 62 × 16 and ``category`` 5 × 16, random weights) and tries,
each step on its own so that one failure does not hide the next:

1. ``torchrec.inference.modules.quantize_embeddings`` of the collection to TorchRec's
   ``QuantEmbeddingCollection`` (``torchrec.quant.embedding_modules.EmbeddingCollection``),
   int8 and fp16 weights;
2. a lookup of a ``KeyedJaggedTensor`` through it, compared with the fp32 collection;
3. ``torch.export.export`` of the quantized collection;
4. the same with the table-batched modules registered as submodules, as
   ``quantize_inference_model`` does;
5. ``quantize_inference_model`` on the whole CTR model (``recsys.models.ctr.CTRModel``), its
   forward and its ``torch.export``.

Prints one line per step: ``ok`` with what was measured, or ``FAILED`` with the error's type
and first line. docs/serving.md ("TorchRec's inference path on CPU") records the findings.
"""

from __future__ import annotations

import copy
import importlib.metadata
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torchrec import EmbeddingCollection, KeyedJaggedTensor
from torchrec.inference.modules import quantize_embeddings, quantize_inference_model
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.quant.embedding_modules import quant_prep_enable_register_tbes

from recsys.models.ctr import CTRConfig, CTRModel
from recsys.models.sparse import SparseArch
from recsys.models.tower import TowerConfig

DTYPES = {"int8": torch.qint8, "fp16": torch.float16}


def step(name: str, action: Callable[[], str]) -> object:
    """Run one probe step and print its outcome; never raises."""
    try:
        print(f"{name}: ok: {action()}")
        return True
    except Exception as err:  # noqa: BLE001 (a probe records whatever fails)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        print(f"{name}: FAILED: {type(err).__name__}: {first}")
        if "-v" in sys.argv:
            traceback.print_exc()
        return False


def _torch_only(tmp: Path) -> str:
    """A directory of links to this environment's site-packages but torchrec, fbgemm_gpu and
    recsys (an import path that has torch and its dependencies only)."""
    site = Path(torch.__file__).resolve().parents[1]
    out = tmp / "site"
    out.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if not name.startswith(("torchrec", "fbgemm", "recsys", "__editable__")):
            (out / entry.name).symlink_to(entry)
    return str(out)


def features() -> KeyedJaggedTensor:
    """Two samples: histories of 3 and 1 events and their candidates."""
    lengths = [3, 1, 1, 1]  # history_item (2 rows), candidate_item (2 rows)
    items = [4, 7, 9, 11, 20, 30]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["history_item", "candidate_item", "history_category", "candidate_category"],
        values=torch.tensor([*items, 0, 1, 2, 1, 0, 2]),
        lengths=torch.tensor(lengths + lengths),
    )


def main() -> int:
    warnings.filterwarnings("ignore")
    versions = {n: importlib.metadata.version(n) for n in ("torch", "torchrec", "fbgemm_gpu_cpu")}
    print(", ".join(f"{n} {v}" for n, v in versions.items()))
    torch.manual_seed(0)
    config = CTRConfig(TowerConfig.from_name("L1H16A2", max_len=13), 62, {"category": 5})
    sparse = SparseArch(config.sparse(), torch.device("cpu"))
    collection = sparse.sequence
    kjt = features()
    reference = collection(kjt)
    for label, dtype in DTYPES.items():
        quantized: dict[str, torch.nn.Module] = {}

        def quantize(dtype=dtype, quantized=quantized) -> str:
            # quantize_dynamic swaps children, never the module it is given: hand it the
            # SparseArch that holds the collection.
            parent = quantize_embeddings(
                sparse,
                dtype=dtype,
                inplace=False,
                additional_qconfig_spec_keys=[EmbeddingCollection],
                additional_mapping={EmbeddingCollection: QuantEmbeddingCollection},
            )
            module = quantized["module"] = parent.sequence
            if not isinstance(module, QuantEmbeddingCollection):
                raise TypeError(f"not swapped: {type(module).__module__}.{type(module).__name__}")
            weights = {str(t.dtype).removeprefix("torch.") for t in module.state_dict().values()}
            return f"{type(module).__module__}.{type(module).__name__}, tensors {sorted(weights)}"

        def lookup(quantized=quantized) -> str:
            out = quantized["module"](kjt)
            error = max(
                float((out[k].values().float() - reference[k].values()).abs().max())
                for k in reference
            )
            return f"max abs error vs fp32 {error:.2e} (weights' std 0.02)"

        def export(quantized=quantized) -> str:
            program = torch.export.export(quantized["module"], (kjt,), strict=False)
            quantized["program"] = program
            ops = sorted(
                {
                    str(node.target).split(".")[0] + "." + str(node.target).split(".")[1]
                    for node in program.graph.nodes
                    if node.op == "call_function" and str(node.target).startswith("fbgemm")
                }
            )
            return f"{len(program.graph.nodes)} graph nodes; FBGEMM operators: {ops or 'none'}"

        def load_plain(quantized=quantized) -> str:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "ec.pt2"
                torch.export.save(quantized["program"], path)
                # A Python without site-packages but torch's: no torchrec, no fbgemm_gpu.
                code = (
                    "import sys; sys.path.append(sys.argv[1]); import torch; "
                    "torch.export.load(sys.argv[2]); print('loaded')"
                )
                done = subprocess.run(
                    [sys.executable, "-I", "-S", "-c", code, _torch_only(Path(tmp)), str(path)],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
            if done.returncode:
                raise RuntimeError(done.stderr.strip().splitlines()[-1])
            return done.stdout.strip()

        def load_here(quantized=quantized) -> str:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "ec.pt2"
                torch.export.save(quantized["program"], path)
                out = torch.export.load(path).module()(kjt)
            error = max(
                float((out[k].values().float() - reference[k].values()).abs().max())
                for k in reference
            )
            return f"max abs error vs fp32 {error:.2e}"

        if step(f"quantize_embeddings {label}", quantize):
            step(f"QuantEmbeddingCollection {label} lookup", lookup)
            if step(f"torch.export of QuantEmbeddingCollection {label}", export):
                step(f"torch.export.save/load/run here (torchrec imported) {label}", load_here)
                step(f"torch.export.load of it without torchrec and fbgemm_gpu {label}", load_plain)

    model = CTRModel(config, sparse_device=torch.device("cpu")).eval()
    model.sparse.load_state_dict(sparse.state_dict())
    with torch.no_grad():
        logits = model(kjt).logits
    whole: dict[str, torch.nn.Module] = {}

    def whole_model() -> str:
        quantized = whole["model"] = quantize_inference_model(copy.deepcopy(model))
        kinds = sorted(
            f"{name} → {type(m).__module__}.{type(m).__name__}"
            for name, m in quantized.named_modules()
            if type(m).__module__.startswith("torchrec.quant")
        )
        return f"swapped {kinds or 'nothing'}"

    def whole_forward() -> str:
        with torch.no_grad():
            out = whole["model"](kjt).logits
        return f"logits max abs diff vs fp32 model {float((out - logits).abs().max()):.2e}"

    def whole_export() -> str:
        program = torch.export.export(whole["model"], (kjt,), strict=False)
        return f"{len(program.graph.nodes)} graph nodes"

    def registered_export() -> str:
        # What quantize_inference_model does before quantizing: the table-batched modules
        # become submodules (and so part of what torch.export traces).
        parent = copy.deepcopy(sparse)
        quant_prep_enable_register_tbes(parent, [EmbeddingCollection])
        quantized = quantize_embeddings(
            parent,
            dtype=torch.qint8,
            inplace=False,
            additional_qconfig_spec_keys=[EmbeddingCollection],
            additional_mapping={EmbeddingCollection: QuantEmbeddingCollection},
        )
        program = torch.export.export(quantized.sequence, (kjt,), strict=False)
        return f"{len(program.graph.nodes)} graph nodes"

    step("torch.export of the int8 collection quantized with register_tbes", registered_export)
    if step("quantize_inference_model (int8) on CTRModel", whole_model):
        step("quantized CTRModel forward on a KJT", whole_forward)
        step("torch.export of the quantized CTRModel (KJT input)", whole_export)
    return 0


if __name__ == "__main__":
    sys.exit(main())
