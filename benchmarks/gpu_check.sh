#!/usr/bin/env bash
# The one prepared GPU run (see ../shared/GPU.md): the CUDA tests, the demo table and the
# benchmark tables (layer at 4096x4096 in fp32/bf16, training, compile time, onnxruntime, mixed
# adapters), logs under $OUT. Runs on the device machine's own Python (torch, Triton, PEFT are there).
# Not yet run: no session so far has had the GPU machine.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, transformers, peft, onnxruntime; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, onnxruntime.__version__)"
} > "$OUT/machine.txt" 2>&1
pip install -q --no-deps -e . > "$OUT/install.log" 2>&1
timeout 240 python -m pytest -q -p no:logging -m cuda tests/test_cuda.py > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests rc=$?" >> "$OUT/machine.txt"
timeout 60 python -m miss_compile --repeats 20 > "$OUT/demo.log" 2>&1
echo "demo rc=$?" >> "$OUT/machine.txt"
timeout 270 python -m benchmarks --device cuda --repeats 10 --compile-rounds 1 --out "$OUT/BENCHMARKS-h200.md" > "$OUT/benchmarks.log" 2>&1
echo "benchmarks rc=$?" >> "$OUT/machine.txt"
