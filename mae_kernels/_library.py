"""How every op is registered: one Triton launcher (`torch.library.triton_op`, the default kernel,
so CUDA tensors run it and `torch.compile` / `torch.export` see into it) and one PyTorch/C++
implementation registered for the CPU device. The dispatcher routes by device; nothing else
chooses.

MAE_KERNELS_BACKEND, read once here, is the one switch for testing from outside:
- ``triton``: CPU tensors run the Triton launchers too (needs TRITON_INTERPRET=1);
- ``reference``: every public op runs `mae_kernels.reference`.
"""
from __future__ import annotations

import importlib.util
import os
import types
from collections.abc import Callable

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

BACKEND = os.environ.get("MAE_KERNELS_BACKEND", "auto")
if BACKEND not in ("auto", "triton", "reference"):
    raise ValueError(f"MAE_KERNELS_BACKEND must be auto, triton or reference, got {BACKEND!r}")
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if BACKEND == "triton" and not (HAS_TRITON and INTERPRETED):
    raise ValueError("MAE_KERNELS_BACKEND=triton runs the Triton kernels on CPU tensors: it needs "
                     "triton installed and TRITON_INTERPRET=1")
USE_REFERENCE = BACKEND == "reference"
TRITON_ON_CPU = BACKEND == "triton"

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # a platform triton does not support: the kernels are defined, never launched
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = None


def wrap_triton(kernel):
    """`torch.library.wrap_triton(kernel)`, so `torch.compile` can trace the launch. Interpreted
    kernels (TRITON_INTERPRET=1) are launched as they are: torch before 2.13 rejects them."""
    return kernel if INTERPRETED else torch.library.wrap_triton(kernel)


def _on_cpu(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)


def device_op(name: str, triton_fn: Callable, cpu_fn: Callable):
    """The custom op `mae_kernels::<name>`: `triton_fn` by default, `cpu_fn` for CPU tensors.

    Without triton (a platform it does not support), `cpu_fn` serves every device: it is
    written with PyTorch ops and the extension's ops only.
    """
    qualname = f"mae_kernels::{name}"
    if not HAS_TRITON:
        op = torch.library.custom_op(qualname, cpu_fn, mutates_args=())
        op.register_fake(cpu_fn)
        return op
    op = torch.library.triton_op(qualname, triton_fn, mutates_args=())
    if INTERPRETED:
        # The interpreter runs kernels even on fake tensors (wrap_triton passes them through), so
        # its fake is cpu_fn traced; opcheck of the Triton path then checks that both agree.
        op.register_fake(cpu_fn)
    if TRITON_ON_CPU:
        return op
    op.register_kernel("cpu", cpu_fn)
    # triton_op makes AOTAutograd trace into the Triton launcher whatever the device; a compiled
    # graph on CPU tensors keeps the op instead, and the dispatcher runs cpu_fn.
    trace_into_triton = op._torch_dispatch_fns[FunctionalTensorMode]

    def rule(mode, func, types, args, kwargs):
        if _on_cpu(args) or _on_cpu(kwargs.values()):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        return trace_into_triton(mode, func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, rule)
    return op
