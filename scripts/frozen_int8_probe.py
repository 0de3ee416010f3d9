"""Can a frozen table be stored int8 and sharded for training on this host? A probe, not a
feature.

    python scripts/frozen_int8_probe.py

A frozen table is looked up in training (forward only, no gradient), so it needs a kernel
that reads compact rows and a sharder that spreads them over ranks and checkpoints them. On
this host's CPU build each step is tried on its own (1 gloo rank), so that one failure does
not hide the next:

1. TorchRec's training collection with ``DataType.FP16``, sharded by
   ``DistributedModelParallel``: its lookup against the fp32 table (what ``freeze.dtype=fp16``
   uses);
2. the same with ``DataType.INT8``;
3. FBGEMM's training kernel (``SplitTableBatchedEmbeddingBagsCodegen``) with int8 weights on
   the CPU, filled by FBGEMM's own row-wise quantizer, its lookup against the dequantized
   rows;
4. FBGEMM's inference kernel (``IntNBitTableBatchedEmbeddingBagsCodegen``, what TorchRec's
   quantized collections use), int8 rows with an fp16 scale and bias each, filled from fp32
   rows by hand, the same comparison.

Prints one line per step: ``ok`` with the largest lookup error (a step that runs but looks
up wrong values is ``ok`` too: read its error), or ``FAILED`` with the error's first line.
docs/plan.md ("Frozen tables in fp16 and int8") records the findings.
"""

from __future__ import annotations

import importlib.metadata
import os

import torch
import torch.distributed as dist
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.modules.embedding_configs import DataType
from torchrec_inference_probe import step  # this directory is on the path of a script

ROWS, DIM = 1000, 64
IDS = torch.tensor([1, 5, 7, 999])


def collection(data_type: DataType) -> str:
    """A sharded frozen collection of ``data_type``: its largest lookup error against fp32."""
    torch.manual_seed(0)
    table = EmbeddingConfig(
        name="item", num_embeddings=ROWS, embedding_dim=DIM, feature_names=["f"],
        data_type=data_type,
    )  # fmt: skip
    module = EmbeddingCollection(tables=[table], device=torch.device("meta"))
    module.requires_grad_(False)
    sharded = DistributedModelParallel(module, device=torch.device("cpu"))
    reference = torch.randn(ROWS, DIM) * 0.02
    (shard,) = sharded.state_dict()["embeddings.item.weight"].local_shards()
    shard.tensor.copy_(reference)
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], IDS, torch.tensor([len(IDS)]))
    out = sharded(kjt)["f"].values()
    return f"stored {shard.tensor.dtype}, max error {(out - reference[IDS]).abs().max():.2e}"


def training_kernel_int8() -> str:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    kernel = SplitTableBatchedEmbeddingBagsCodegen(
        [(ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        weights_precision=SparseType.INT8,
        pooling_mode=PoolingMode.NONE,
        optimizer=EmbOptimType.EXACT_SGD,
        output_dtype=SparseType.FP32,
    )
    kernel.init_embedding_weights_uniform(-0.05, 0.05)  # FBGEMM's own row-wise quantizer
    (rows,) = kernel.split_embedding_weights()
    expected = torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(rows.contiguous())[IDS]
    out = kernel(IDS, torch.tensor([0, len(IDS)]))
    error = (out - expected).abs().max()
    return f"rows {list(rows.shape)} {rows.dtype}, max error {error:.2e} (first {out[0, :3]})"


def inference_kernel_int8() -> str:
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    kernel = IntNBitTableBatchedEmbeddingBagsCodegen(
        [("item", ROWS, DIM, SparseType.INT8, EmbeddingLocation.HOST)],
        pooling_mode=PoolingMode.NONE,
        device="cpu",
        output_dtype=SparseType.FP32,
    )
    kernel.fill_random_weights()
    reference = torch.randn(ROWS, DIM) * 0.02
    # Its int8 layout: per row an fp16 scale and bias, then the bytes (TorchRec's quantized
    # collections write it so); filled by hand from the fp32 rows.
    rows, scale_bias = kernel.split_embedding_weights(split_scale_shifts=True)[0]
    low, high = reference.min(1, keepdim=True).values, reference.max(1, keepdim=True).values
    scale = ((high - low) / 255).half()
    codes = ((reference - low.half().float()) / scale.float()).round().clamp(0, 255)
    rows.copy_(codes.to(torch.uint8))
    scale_bias.view(torch.float16).copy_(torch.cat([scale, low.half()], 1))
    expected = codes * scale.float() + low.half().float()
    out = kernel(IDS.int(), torch.tensor([0, len(IDS)], dtype=torch.int32)).view(len(IDS), DIM)
    error = (out - expected[IDS]).abs().max()
    return (
        f"rows {list(rows.shape)} {rows.dtype} + scale/bias {list(scale_bias.shape)}, max "
        f"error {error:.2e} against the dequantized rows, "
        f"{(out - reference[IDS]).abs().max():.2e} against fp32"
    )


def main() -> int:
    versions = {n: importlib.metadata.version(n) for n in ("torch", "torchrec", "fbgemm-gpu-cpu")}
    print(", ".join(f"{n} {v}" for n, v in versions.items()))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29655", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    try:
        step("1. sharded collection, fp16", lambda: collection(DataType.FP16))
        step("2. sharded collection, int8", lambda: collection(DataType.INT8))
        step("3. FBGEMM training kernel, int8 on CPU", training_kernel_int8)
        step("4. FBGEMM inference kernel, int8 on CPU", inference_kernel_int8)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
