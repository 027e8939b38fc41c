"""`--deterministic`: the same run gives the same bits on a GPU too, as it does on the CPU.

On the CPU every op mae trains with is deterministic already. On CUDA some are not by default:
the backward of attention and convolution may accumulate with atomics, cuBLAS may split a
product differently by workspace, and cuDNN's benchmark picks algorithms by timing. With the
flag a run sets PyTorch's deterministic algorithms (an op without a deterministic CUDA kernel
then raises an error naming it, never drifts silently), `CUBLAS_WORKSPACE_CONFIG=:4096:8` (set
before the first cuBLAS call, as the run starts) and cuDNN's deterministic mode without
benchmarking. NCCL's reductions follow the same order from run to run on the same GPUs and
NCCL settings; another GPU count or topology reduces in another order.
"""
from __future__ import annotations

import contextlib
import os

import torch

# the cuBLAS workspace settings under which its results are reproducible (CUDA's docs)
CUBLAS_CONFIGS = (":4096:8", ":16:8")
CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"


def problem(args) -> str | None:
    """The error for a CUBLAS_WORKSPACE_CONFIG that --deterministic cannot run under, or None."""
    value = os.environ.get(CUBLAS_VARIABLE)
    if getattr(args, "deterministic", False) and value not in (None, *CUBLAS_CONFIGS):
        return (f"--deterministic: {CUBLAS_VARIABLE}={value} does not make cuBLAS "
                f"deterministic; unset it or set {' or '.join(CUBLAS_CONFIGS)}")
    return None


@contextlib.contextmanager
def deterministic(enabled: bool):
    """PyTorch's deterministic algorithms, cuBLAS's workspace and cuDNN's flags while the run
    lasts (what they were is restored after it); nothing when not `enabled`."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
              cudnn.benchmark, os.environ.get(CUBLAS_VARIABLE))
    os.environ.setdefault(CUBLAS_VARIABLE, CUBLAS_CONFIGS[0])
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        algorithms, warn_only, cudnn.deterministic, cudnn.benchmark, workspace = before
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        if workspace is None:
            os.environ.pop(CUBLAS_VARIABLE, None)
