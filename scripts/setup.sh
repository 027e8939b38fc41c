#!/usr/bin/env bash
# Sets up a fresh machine: CPU torch (pinned, so no CUDA build is pulled), the build tools,
# then mae-kernels itself, built against that torch. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install --quiet "torch==${TORCH_VERSION}"
fi
$PY -m pip install --quiet setuptools wheel ninja
$PY -m pip install --quiet --no-build-isolation -e ".[test]"
