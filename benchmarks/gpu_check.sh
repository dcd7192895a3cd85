#!/usr/bin/env bash
# The one prepared GPU run (see ../shared/GPU.md): the CUDA tests and the demo table,
# logs under $OUT. Runs on the device machine's own Python (torch, Triton, PEFT are there).
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
timeout 420 python -m pytest -q -p no:logging -m cuda tests/test_cuda.py > "$OUT/cuda-tests.log" 2>&1
echo "cuda tests rc=$?" >> "$OUT/machine.txt"
timeout 120 python -m miss_compile --repeats 20 > "$OUT/demo.log" 2>&1
echo "demo rc=$?" >> "$OUT/machine.txt"
