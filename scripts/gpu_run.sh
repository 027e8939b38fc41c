#!/usr/bin/env bash
# One call on a lent GPU machine: build the extension with its CUDA kernels, run the gpu-marked
# tests, then the benchmarks; JSON, logs and RESULTS.md land in $OUT (or ./gpu_out).
#   bash scripts/gpu_run.sh [pytest -k expression for the benchmarks]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
time python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
# the build must have the CUDA kernels: without them gather/scatter would run plain PyTorch
python3 -c "from mae_kernels import tokens as t; print('extension', t.LIBRARY, 'kernels for', sorted(t.KERNEL_DEVICES)); assert 'cuda' in t.KERNEL_DEVICES"
python3 -m pytest tests -m gpu -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 -m pytest benchmarks -q -p no:cacheprovider -k "${1:-}" \
    --benchmark-json="$OUT/results.json" 2>&1 | tail -5
python3 benchmarks/report.py "$OUT/results.json" --output "$OUT/RESULTS.md" --plots "$OUT/plots"
grep -E "^\| " "$OUT/RESULTS.md" | grep -E "bfloat16|images" | head -60
