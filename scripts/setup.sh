#!/usr/bin/env bash
# Sets up a fresh machine: torch (pinned, the CPU build from PyTorch's CPU wheel index, so that
# no CUDA build and its NVIDIA packages are pulled), the build tools, then mae-kernels itself,
# built against that torch. Where that index cannot be reached, it says so and falls back to a
# plain `pip install torch==...`, which on Linux brings the CUDA build unless a local CPU wheel
# is found (pip's find-links). Either way it ends by saying which torch it got. A torch already
# installed is kept. Safe to run again.
#   --torch-only   stop after torch (CI checks this step in a fresh venv: .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if ! $PY -c "import torch" 2>/dev/null; then
  # Probe the index first: pip treats an unreachable index as a warning and would then take
  # whatever torch its other sources hold, so its success would not say where torch came from.
  if $PY -c "import sys, urllib.request as u; u.urlopen(sys.argv[1] + '/torch/', timeout=10)" \
      "$CPU_INDEX" 2>/dev/null; then
    echo "setup.sh: installing torch ${TORCH_VERSION} from PyTorch's CPU index ${CPU_INDEX}"
    $PY -m pip install --quiet --index-url "$CPU_INDEX" "torch==${TORCH_VERSION}"
  else
    echo "setup.sh: PyTorch's CPU index ${CPU_INDEX} cannot be reached; falling back to" \
      "pip install torch==${TORCH_VERSION} (on Linux the CUDA build, unless pip finds a local" \
      "CPU wheel)"
    $PY -m pip install --quiet "torch==${TORCH_VERSION}"
  fi
fi
# -W: torch warns when numpy is not installed yet (the extras below bring it)
$PY -W ignore -c "import torch; cuda = torch.version.cuda
print('setup.sh: torch', torch.__version__, f'CUDA {cuda} build' if cuda else 'CPU build')"
if [ "${1:-}" = "--torch-only" ]; then exit 0; fi
# setuptools 77 reads pyproject.toml's licence expression (PEP 639); pip 25.1 shows it (pip show)
$PY -m pip install --quiet "pip>=25.1" "setuptools>=77" wheel ninja
$PY -m pip install --quiet --no-build-isolation -e ".[test,docs]"
