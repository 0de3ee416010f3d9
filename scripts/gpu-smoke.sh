#!/usr/bin/env bash
# One short job of each GPSD stage on one GPU: doctor, the gpu-marked tests, then pretrain,
# transfer (ST), freeze, finetune, evaluate and predict on a small synthetic dataset, each a
# one-process run on CUDA with the tower compiled (run.compile=on) and bf16 autocast.
#
#   scripts/gpu-smoke.sh [OUT]        # default OUT: runs/gpu-smoke
#
# Needs TorchRec with FBGEMM's CUDA build. Each stage's metrics.jsonl then holds the logging
# steps' samples/s, tokens/s, tower TFLOP/s, MFU and peak memory. SMOKE_DEVICE=cpu runs the
# same chain on CPU (what the test suite does, with tiny sizes).
set -euo pipefail

OUT=${1:-runs/gpu-smoke}
PY=${PY:-.venv/bin/python}
DEVICE=${SMOKE_DEVICE:-cuda}
SIZE=${SMOKE_SIZE:-L4H256A4}
USERS=${SMOKE_USERS:-4000}
STEPS=${SMOKE_STEPS:-60}

if [ "$DEVICE" = cuda ]; then
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: torch.cuda.is_available() is False")'
    "$PY" -m recsys.cli doctor
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
fi

DATA=$OUT/data
COMMON=(model.size="$SIZE" model.max_len=50 run.compile=on run.bf16=on run.log_every=10
        run.max_steps="$STEPS" data.batch_size=64)
"$PY" -m recsys.cli data synth --users "$USERS" --items 2000 --out "$DATA" --overwrite
"$PY" -m recsys.stages.pretrain --out "$OUT/pretrain" --force "${COMMON[@]}" \
    data.train="$DATA/seq" model.negatives=512
"$PY" -m recsys.stages.transfer --strategy ST --pretrained "$OUT/pretrain" \
    --out "$OUT/transfer" --force "${COMMON[@]}" data.train="$DATA/ctr_train"
"$PY" -m recsys.stages.freeze --init "$OUT/transfer" --sparse --out "$OUT/freeze" --force \
    "${COMMON[@]}" data.train="$DATA/ctr_train"
"$PY" -m recsys.stages.finetune --init "$OUT/freeze" --out "$OUT/finetune" --force \
    "${COMMON[@]}" data.train="$DATA/ctr_train" data.valid="$DATA/ctr_test"
"$PY" -m recsys.stages.evaluate --model "$OUT/finetune" --data "$DATA/ctr_test" \
    --out "$OUT/evaluate" --force
"$PY" -m recsys.cli data requests "$DATA/ctr_test" --limit 64 --no-labels \
    --out "$OUT/requests.parquet" --overwrite
"$PY" -m recsys.stages.predict --model "$OUT/finetune" --requests "$OUT/requests.parquet" \
    --out "$OUT/predict" --force
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for stage in ("pretrain", "finetune"):
    steps = [json.loads(l) for l in (out / stage / "metrics.jsonl").read_text().splitlines()]
    last = [s for s in steps if s["split"] == "step"][-1]
    shown = {k: round(v, 4) for k, v in last.items() if k not in ("split",)}
    print(f"{stage}: {shown}")
print("evaluate:", json.loads((out / "evaluate" / "stage.json").read_text())["results"])
PY
echo "gpu-smoke: every stage ran"
