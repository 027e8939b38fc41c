"""gather_tokens / scatter_tokens: the C++/CUDA extension's primitives as autograd-aware ops.

The schema and the CPU and CUDA kernels live in csrc/ (TORCH_LIBRARY); this module loads the
library, adds the fakes and the autograd formulas (each op is the other's backward), and the
checked public functions. Where the library is unavailable, or was built without CUDA kernels,
the reference stands in for the missing kernels.
"""
from __future__ import annotations

import warnings

import torch

from . import _checks, reference
from ._extension import load_extension
from ._library import USE_REFERENCE

LIBRARY = load_extension()
if LIBRARY is None:
    _fallback = torch.library.Library("mae_kernels", "DEF")
    _fallback.define("gather_tokens(Tensor x, Tensor index) -> Tensor")
    _fallback.define("scatter_tokens(Tensor src, Tensor index, SymInt length) -> Tensor")
    _fallback.impl("gather_tokens", reference.gather_tokens, "CompositeExplicitAutograd")
    _fallback.impl("scatter_tokens", reference.scatter_tokens, "CompositeExplicitAutograd")
    KERNEL_DEVICES = frozenset()
else:
    KERNEL_DEVICES = frozenset(
        device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("mae_kernels::gather_tokens", key)
    )
    if "cuda" not in KERNEL_DEVICES and torch.cuda.is_available():
        warnings.warn("mae_kernels: the extension was built without CUDA kernels (no nvcc, or "
                      "MAE_KERNELS_NO_CUDA=1); gather/scatter on CUDA tensors run plain PyTorch",
                      RuntimeWarning, stacklevel=2)
        _cuda_fallback = torch.library.Library("mae_kernels", "IMPL")
        _cuda_fallback.impl("gather_tokens", reference.gather_tokens, "CUDA")
        _cuda_fallback.impl("scatter_tokens", reference.scatter_tokens, "CUDA")

gather_op = torch.ops.mae_kernels.gather_tokens.default
scatter_op = torch.ops.mae_kernels.scatter_tokens.default


@torch.library.register_fake("mae_kernels::gather_tokens")
def _gather_fake(x, index):
    return x.new_empty(x.shape[0], index.shape[1], x.shape[2])


@torch.library.register_fake("mae_kernels::scatter_tokens")
def _scatter_fake(src, index, length):
    return src.new_empty(src.shape[0], length, src.shape[2])


def _gather_setup(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.length = x.shape[1]


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return scatter_op(grad, index, ctx.length), None


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return gather_op(grad, index), None, None


torch.library.register_autograd("mae_kernels::gather_tokens", _gather_backward,
                                setup_context=_gather_setup)
torch.library.register_autograd("mae_kernels::scatter_tokens", _scatter_backward,
                                setup_context=_scatter_setup)


def _check_tokens(data_name: str, data, index) -> None:
    _checks.tensor(data_name, data, 3, floating=True)
    _checks.tensor("index", index, 2, dtype=torch.int64)
    _checks.same_device(**{data_name: data, "index": index})
    if index.shape[0] != data.shape[0]:
        raise ValueError(
            f"index has batch size {index.shape[0]} but {data_name} has {data.shape[0]}"
        )


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, k] = x[b, index[b, k]] for x (B, L, D) and index (B, K) int64."""
    _check_tokens("x", x, index)
    _checks.index_range("index", index, x.shape[1])
    if USE_REFERENCE:
        return reference.gather_tokens(x, index)
    return gather_op(x, index)


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """The adjoint of gather_tokens: (B, length, D) with src[b, k] at index[b, k], zeros elsewhere.

    The rows of `index` must hold distinct positions (checked with the index range).
    """
    _check_tokens("src", src, index)
    _checks.integer("length", length, 0)
    if index.shape[1] != src.shape[1]:
        raise ValueError(f"index has {index.shape[1]} tokens per row but src has {src.shape[1]}")
    if length < index.shape[1]:
        raise ValueError(
            f"length ({length}) must be at least the number of tokens in src ({src.shape[1]})"
        )
    _checks.index_range("index", index, length)
    _checks.distinct("index", index, length)
    if USE_REFERENCE:
        return reference.scatter_tokens(src, index, length)
    return scatter_op(src, index, length)
