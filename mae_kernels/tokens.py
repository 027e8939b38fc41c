"""gather_tokens / scatter_tokens: the extension's primitives as autograd-aware custom ops.

The schema and the CPU/CUDA kernels live in `csrc/` (TORCH_LIBRARY); this module adds the fake
(meta) implementations and the autograd formulas (each op is the other's backward). Without the
compiled extension the same schema is defined here on top of the reference.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from .backend import HAS_EXTENSION, REFERENCE, TRITON, extension_supports, resolve

if not HAS_EXTENSION:
    _fallback = torch.library.Library("mae_kernels", "DEF")
    _fallback.define("gather_tokens(Tensor x, Tensor index) -> Tensor")
    _fallback.define("scatter_tokens(Tensor src, Tensor index, SymInt length) -> Tensor")
    _fallback.impl("gather_tokens", reference.gather_tokens, "CompositeExplicitAutograd")
    _fallback.impl("scatter_tokens", reference.scatter_tokens, "CompositeExplicitAutograd")


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
    return torch.ops.mae_kernels.scatter_tokens(grad, index, ctx.length), None


def _scatter_setup(ctx, inputs, output):
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return torch.ops.mae_kernels.gather_tokens(grad, index), None, None


torch.library.register_autograd(
    "mae_kernels::gather_tokens", _gather_backward, setup_context=_gather_setup
)
torch.library.register_autograd(
    "mae_kernels::scatter_tokens", _scatter_backward, setup_context=_scatter_setup
)


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
    if resolve(x.device, has_triton_kernel=False) == REFERENCE:
        return reference.gather_tokens(x, index)
    return torch.ops.mae_kernels.gather_tokens(x, index)


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """The adjoint of gather_tokens: (B, length, D) with src[b, k] at index[b, k], zeros elsewhere.

    The rows of `index` must hold distinct positions.
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
    if resolve(src.device, has_triton_kernel=False) == REFERENCE:
        return reference.scatter_tokens(src, index, length)
    return torch.ops.mae_kernels.scatter_tokens(src, index, length)


# Unchecked row copies for use inside other ops' implementations: the Triton kernel when that
# backend runs, else the extension where it has kernels for the device, else the reference.
def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if resolve(x.device) == TRITON:
        from .kernels.rows import gather_rows_triton

        return gather_rows_triton(x, index)
    if extension_supports(x.device):
        return torch.ops.mae_kernels.gather_tokens(x, index)
    return reference.gather_tokens(x, index)


def scatter_rows(src: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    if resolve(src.device) == TRITON:
        from .kernels.rows import scatter_rows_triton

        return scatter_rows_triton(src, index, length)
    if extension_supports(src.device):
        return torch.ops.mae_kernels.scatter_tokens(src, index, length)
    return reference.scatter_tokens(src, index, length)
