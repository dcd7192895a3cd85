#!/usr/bin/env bash
# The one prepared GPU run (see ../shared/GPU.md): the CUDA tests, the demo table and the
# benchmark tables (layer at 4096x4096 in fp32/bf16, training, compile time, onnxruntime, mixed
# adapters), logs under $OUT. Runs on the device machine's own Python (torch, Triton, PEFT are there).
# Not yet run: no session so far has had the GPU machine.
# PART=main (default): the above, ~9.5 min. PART=scale: the 8B-shaped layer table in bf16 at 512 and
# 2048 tokens (training, checkpointing, prefill) and the fold calibration on CUDA (fold_rule's CUDA
# bound is uncalibrated until this runs), ~4 min: two calls, each inside the 10-minute limit.
# The layer table adds mode="reduce-overhead" (CUDA graphs) rows for the limit and miss_backend on CUDA.
set -uo pipefail
OUT=${OUT:-gpu-results}
PART=${PART:-main}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, transformers, peft, onnxruntime; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, onnxruntime.__version__)"
} > "$OUT/machine.txt" 2>&1
pip install -q --no-deps -e . > "$OUT/install.log" 2>&1
if [ "$PART" = scale ]; then
    timeout 150 python -m benchmarks.fold_calibration --device cuda --repeats 7 > "$OUT/fold-calibration.log" 2>&1
    echo "fold calibration rc=$?" >> "$OUT/machine.txt"
    timeout 330 python -m benchmarks --device cuda --tables scale --scale-dtype bf16 --scale-tokens 512 2048 \
        --repeats 5 --out "$OUT/BENCHMARKS-scale-bf16.md" > "$OUT/scale.log" 2>&1
    echo "scale rc=$?" >> "$OUT/machine.txt"
    exit 0
fi
timeout 240 python -m pytest -q -p no:logging -m cuda tests/test_cuda.py > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests rc=$?" >> "$OUT/machine.txt"
timeout 60 python -m miss_compile --repeats 20 > "$OUT/demo.log" 2>&1
echo "demo rc=$?" >> "$OUT/machine.txt"
# No generation table: onnxruntime there is the CPU build, and its 8B-shaped exports alone take a minute.
timeout 270 python -m benchmarks --device cuda --tables layer training compile onnx mixed --repeats 10 --compile-rounds 1 --out "$OUT/BENCHMARKS-h200.md" > "$OUT/benchmarks.log" 2>&1
echo "benchmarks rc=$?" >> "$OUT/machine.txt"
