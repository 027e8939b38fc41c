#!/usr/bin/env bash
# One call on a lent GPU machine: the plan of scripts/gpu_plan.py (the build, the gpu-marked
# tests, compute-sanitizer, the op benchmarks at ViT-B/16 sizes in bf16, the ViT-B/16 step, then
# extras while time is left), under 8 minutes; each stage's files land in $OUT (or ./gpu_out)
# as it ends.
#   bash scripts/gpu_run.sh             # the plan
#   bash scripts/gpu_run.sh -k EXPR     # the plan, with the benchmarks matching EXPR as extras
#   bash scripts/gpu_run.sh --dry-run   # the stages and their time budget, runs nothing
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_plan.py "$@"
