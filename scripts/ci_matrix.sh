#!/usr/bin/env bash
# The support matrix beyond the default environment (which `.ci/run` tests first, through the
# README's test command: Python 3.11, torch 2.13.0 CPU, the newest triton). Each row gets a fresh
# virtual environment and a clean copy of the sources, installed the way a user would:
#   newest:   Python 3.11, torch 2.14.1 (CUDA 13.0) + torchvision 0.29.1, triton 3.8 (torch's
#             pin); pip install --no-build-isolation -e ".[test,finetune,video,lightly,decode]"
#             builds the CUDA extension with nvcc and brings timm, PyAV, lightly and TorchCodec,
#             so `mae finetune`, video files, the lightly drop-in and both JPEG decoders (the
#             gpu loader's, on the CPU here) are tested here
#   lowest:   Python 3.10, torch 2.11 (CUDA 13.0), triton 3.6 (torch's pin);
#             plain pip install -e ., the extension compiled on first import
#   plain:    Python 3.11, torch 2.13.0: `pip install torch==2.13.0 && pip install -e .`
#   numpy:    Python 3.11, torch 2.11, triton 3.6, the newest NumPy (>= 2.3 needs Python >= 3.11,
#             so the lowest row cannot have it; the GPU image pairs triton 3.6 with NumPy 2.5):
#             the Triton ops' interpreter tests only, whose kernels NumPy runs under triton 3.6
# Each row runs the CPU suite (slow training tests excepted; newest also runs the fine-tuning
# and video-file tests, lowest runs the op- and model-level tests) and prints its wall time.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${CI_MATRIX_DIR:-$(mktemp -d)}
# A row's venv is 2-6 GB (the CUDA torch builds): each row removes its own when it ends, and a
# folder this script made goes at exit, so repeated runs on one machine don't fill its disk.
[ -n "${CI_MATRIX_DIR:-}" ] || trap 'rm -rf "$WORK"' EXIT
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}  # the toolkit's root, not a wrapper's folder
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

fresh_copy() {  # the committed sources only, no build outputs
  rm -rf "$WORK/$1" && mkdir -p "$WORK/$1"
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK/$1")
  echo "$WORK/$1"
}

venv() {  # venv NAME PYTHON
  "$2" -m venv "$WORK/$1-venv"
  echo "$WORK/$1-venv/bin/python"
}

python_of() {  # the interpreter of a given minor version: pyenv's, else one on PATH
  local v=$1 candidate
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  if command -v "python$v" >/dev/null 2>&1 && "python$v" -c "" 2>/dev/null; then
    command -v "python$v"; return
  fi
  echo "no Python $v found" >&2; exit 1
}

stage() { echo; echo "=== $1 ($(date +%T))"; }

# row NAME PYTHON_MINOR "TORCH_PACKAGES" "PIP_INSTALL_FLAGS" EXTRAS CHECK PYTEST_ARGS...: a fresh
# venv with that Python and torch (torchvision beside it where wanted), this package installed
# with those flags and extras, CHECK run in it (Python code that sees `tokens`, `torch`,
# `triton`), then pytest with PYTEST_ARGS.
row() {
  local name=$1 minor=$2 torch_packages=$3 flags=$4 extras=$5 check=$6
  shift 6
  local start=$SECONDS src py
  src=$(fresh_copy "$name")
  py=$(venv "$name" "$(python_of "$minor")")
  # shellcheck disable=SC2086
  "$py" -m pip install --quiet $torch_packages "setuptools>=77" wheel ninja
  # shellcheck disable=SC2086
  (cd "$src" && "$py" -m pip install --quiet $flags -e ".[$extras]")
  (cd "$src" && "$py" -c "
import torch, triton
from mae_kernels import tokens
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
print('extension', tokens.LIBRARY, 'kernels for', sorted(tokens.KERNEL_DEVICES))
assert tokens.LIBRARY is not None and 'cpu' in tokens.KERNEL_DEVICES
$check")
  (cd "$src" && CI=true "$py" -m pytest -q -p no:cacheprovider -x -n 2 "$@")
  rm -rf "$WORK/$name" "$WORK/$name-venv"
  echo "$name: $((SECONDS - start)) s"
}

stage "newest: torch 2.14.1 + CUDA 13.0, triton 3.8, --no-build-isolation (CUDA extension), timm"
row newest 3.11 "torch==2.14.1 torchvision==0.29.1" --no-build-isolation test,finetune,video,lightly,decode "
import timm, av, lightly
from mae.data import gpu
assert gpu.torchcodec_decoder()[0] is not None, gpu.torchcodec_decoder()[1]
assert gpu.torchvision_decoder()[0] is not None, gpu.torchvision_decoder()[1]
assert torch.__version__.startswith('2.14.1'), 'installing the extra replaced torch'
for op in ('gather_tokens', 'scatter_tokens'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f'mae_kernels::{op}', 'CUDA'), op
assert tokens.LIBRARY.name.startswith('_C'), 'the install did not build the extension'
" tests -m "not slow"

stage "lowest: Python 3.10, torch 2.11 + CUDA 13.0, triton 3.6, plain pip install -e ."
# The ops, their kernels under triton 3.6 (interpreted and compiled for sm_90), the extension
# built on import, the models (eager and compiled). The training loop's and the commands' own
# tests (pure Python on top: resume, DDP, logs, CLI defaults, data, anomaly maps, video
# training, loaders and shards, the loader thread, preemption and cluster behaviour, logging,
# the recipe printout, the docs, the GPU plan's arithmetic) run in .ci/run's default row (torch
# 2.13) and the newest row; what of them needs CUDA (the loader thread's stream hand-off) runs
# on the GPU image's torch 2.11. FSDP2's and the HF/timm interop's own tests run here too,
# against torch 2.11.
row lowest 3.10 torch==2.11.0 "" test "assert triton.__version__.startswith('3.6'), triton.__version__" \
  tests -m "not slow" --ignore=tests/test_training.py --ignore=tests/test_cli.py \
  --ignore=tests/test_anomaly.py --ignore=tests/test_video.py --ignore=tests/test_data.py \
  --ignore=tests/test_preemption.py --ignore=tests/test_shards.py \
  --ignore=tests/test_gpu_loader.py --ignore=tests/test_tracking.py \
  --ignore=tests/test_online_probe.py --ignore=tests/test_recipe.py \
  --ignore=tests/test_small_data.py --ignore=tests/test_prefetch.py \
  --ignore=tests/test_cluster.py --ignore=tests/test_decoder_cli.py \
  --ignore=tests/test_docs.py --ignore=tests/test_gpu_plan.py

stage "plain: pip install torch==2.13.0 && pip install -e ."
row plain 3.11 torch==2.13.0 "" test "" tests/test_ops.py tests/test_dispatch.py

stage "numpy: Python 3.11, torch 2.11, triton 3.6, the newest NumPy: the interpreter tests"
row numpy 3.11 "torch==2.11.0 numpy>=2.3" "" test "
import numpy
assert triton.__version__.startswith('3.6'), triton.__version__
assert tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 3), numpy.__version__
" tests/test_ops.py tests/test_mask_sampling.py tests/test_video_ops.py tests/test_hog.py \
  tests/test_custom_ops.py tests/test_resized_crop.py -m "not slow" -k triton
