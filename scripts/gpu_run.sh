#!/usr/bin/env bash
# One call on a lent GPU machine: the plan of scripts/gpu_plan.py, under 8 minutes, the headline
# figures first (the build, non-fatal; the ViT-B/16 step and the end-to-end loader, their start
# reserved; the smoke stage; then the gpu-marked tests, the op benchmarks, compute-sanitizer and
# extras while time is left); each stage's files land in $OUT (or ./gpu_out) as it ends.
#   bash scripts/gpu_run.sh                                # the plan
#   bash scripts/gpu_run.sh --only step,loader             # the warm rerun (the build is kept)
#   bash scripts/gpu_run.sh --only tests,ops,sanitizer     # what the first call leaves out
#   bash scripts/gpu_run.sh -k EXPR                        # the benchmarks matching EXPR as extras
#   bash scripts/gpu_run.sh --dry-run                      # the stages and their time budget
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_plan.py "$@"
