"""Which implementation runs an op: the reference, the C++/CUDA extension, or Triton.

`auto` (the default) picks Triton for CUDA tensors and the C++ extension for CPU tensors, and
the reference wherever the chosen one is unavailable. `MAE_KERNELS_BACKEND` or `use_backend()`
forces one:

- ``reference``: plain PyTorch (`mae_kernels.reference`);
- ``cpp`` / ``cuda``: the compiled extension (its CPU or CUDA kernels, by the tensors' device),
  with plain PyTorch for the work it does not cover (sorting, reductions);
- ``triton``: the fused Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")

# The implementation families an op can dispatch to.
REFERENCE, EXTENSION, TRITON = "reference", "extension", "triton"

_state = threading.local()


def _load_extension() -> bool:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.mae_kernels.*)
    except ImportError as exc:
        warnings.warn(
            f"mae_kernels: the compiled extension is unavailable ({exc}); "
            "gather_tokens/scatter_tokens fall back to plain PyTorch. "
            "Rebuild with: pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


HAS_EXTENSION = _load_extension()
HAS_TRITON = importlib.util.find_spec("triton") is not None


# The device types the compiled extension has kernels for (a CPU-only build has none for CUDA).
EXTENSION_DEVICES = frozenset(
    device
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if HAS_EXTENSION
    and torch._C._dispatch_has_kernel_for_dispatch_key("mae_kernels::gather_tokens", key)
)


def extension_supports(device: torch.device) -> bool:
    return device.type in EXTENSION_DEVICES


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The forced backend: the innermost `use_backend`, else MAE_KERNELS_BACKEND, else 'auto'."""
    forced = getattr(_state, "backend", None)
    if forced is not None:
        return forced
    return _check_name(os.environ.get("MAE_KERNELS_BACKEND", "auto"))


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the ops called inside the block (per thread)."""
    previous = getattr(_state, "backend", None)
    _state.backend = _check_name(name)
    try:
        yield
    finally:
        _state.backend = previous


def resolve(device: torch.device, *, has_triton_kernel: bool = True,
            has_extension_path: bool = True) -> str:
    """The implementation family that runs an op on `device` under the current backend."""
    name = current_backend()
    if name == "reference":
        return REFERENCE
    if name == "triton":
        if not has_triton_kernel:
            return EXTENSION if has_extension_path and extension_supports(device) else REFERENCE
        if not HAS_TRITON:
            raise RuntimeError("backend 'triton' was requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for {device.type} "
                "tensors"
            )
        return TRITON
    extension = has_extension_path and extension_supports(device)
    if name in ("cpp", "cuda"):
        return EXTENSION if extension else REFERENCE
    # auto
    if device.type == "cuda" and HAS_TRITON and has_triton_kernel:
        return TRITON
    return EXTENSION if extension else REFERENCE
