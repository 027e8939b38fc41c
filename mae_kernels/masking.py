"""random_masking: per-sample random masking by a stable argsort of noise (the official MAE method).

The custom op also returns `ids_keep` (the kept positions, in keep order), which its backward
uses to scatter the gradient back without a second sort.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from .backend import REFERENCE, TRITON, resolve
from .tokens import gather_rows, scatter_rows


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv[b, perm[b, i]] = i: argsort of a permutation, in one scatter instead of a sort."""
    positions = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, positions)


def masking_from_order(x: torch.Tensor, ids_shuffle: torch.Tensor, len_keep: int,
                       mask_dtype: torch.dtype):
    """Everything random_masking returns, given the sorted order of the noise."""
    ids_restore = inverse_permutation(ids_shuffle)
    ids_keep = ids_shuffle[:, :len_keep].contiguous()
    mask = (ids_restore >= len_keep).to(mask_dtype)
    return gather_rows(x, ids_keep), mask, ids_restore, ids_keep


@torch.library.custom_op("mae_kernels::random_masking", mutates_args=())
def _random_masking_op(x: torch.Tensor, noise: torch.Tensor, len_keep: int,
                       mask_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    if resolve(x.device) == TRITON:
        from .kernels.masking import random_masking_triton

        return random_masking_triton(x, noise, len_keep, mask_dtype)
    ids_shuffle = torch.sort(noise, dim=1, stable=True).indices
    return masking_from_order(x, ids_shuffle, len_keep, mask_dtype)


@_random_masking_op.register_fake
def _(x, noise, len_keep, mask_dtype):
    B, L, D = x.shape
    return (
        x.new_empty(B, len_keep, D),
        x.new_empty(B, L, dtype=mask_dtype),
        x.new_empty(B, L, dtype=torch.int64),
        x.new_empty(B, len_keep, dtype=torch.int64),
    )


@torch.library.custom_op("mae_kernels::random_masking_backward", mutates_args=())
def _random_masking_backward_op(grad_x_masked: torch.Tensor, ids_keep: torch.Tensor,
                                length: int) -> torch.Tensor:
    return scatter_rows(grad_x_masked, ids_keep, length)


@_random_masking_backward_op.register_fake
def _(grad_x_masked, ids_keep, length):
    B, _, D = grad_x_masked.shape
    return grad_x_masked.new_empty(B, length, D)


def _setup(ctx, inputs, output):
    ctx.length = inputs[0].shape[1]
    ctx.save_for_backward(output[3])


def _backward(ctx, grad_x_masked, _grad_mask, _grad_ids_restore, _grad_ids_keep):
    (ids_keep,) = ctx.saved_tensors
    grad_x = _random_masking_backward_op(grad_x_masked.contiguous(), ids_keep, ctx.length)
    return grad_x, None, None, None


_random_masking_op.register_autograd(_backward, setup_context=_setup)


def keep_count(num_tokens: int, mask_ratio: float) -> int:
    """The official `len_keep = int(L * (1 - mask_ratio))`, checked to keep at least one token."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    len_keep = int(num_tokens * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} keeps no token of {num_tokens}: int(L * (1 - mask_ratio)) = 0"
        )
    return len_keep


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Drop-in for the official `MaskedAutoencoderViT.random_masking`.

    x: (B, L, D). Returns (x_masked (B, len_keep, D), mask (B, L) with 1 = removed, ids_restore
    (B, L) int64). Keeps the tokens with the smallest noise, in ascending noise order; ties keep
    the lower index. Without `noise`, draws `torch.rand(B, L, device=x.device)` exactly as the
    reference does, so seeded runs match it bit for bit.
    """
    return random_masking_with_ids(x, mask_ratio, noise)[:3]


def random_masking_with_ids(x: torch.Tensor, mask_ratio: float,
                            noise: torch.Tensor | None = None):
    """`random_masking`, plus ids_keep (B, len_keep): the kept positions, in keep order."""
    _checks.tensor("x", x, 3, floating=True)
    B, L, _ = x.shape
    len_keep = keep_count(L, mask_ratio)
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    else:
        _checks.tensor("noise", noise, 2)
        _checks.same_device(x=x, noise=noise)
        if tuple(noise.shape) != (B, L):
            raise ValueError(f"noise must have shape {(B, L)}, got {tuple(noise.shape)}")
        if noise.dtype.is_complex or noise.dtype == torch.bool:
            raise TypeError(f"noise must be a real tensor, got {noise.dtype}")
    if resolve(x.device) == REFERENCE:
        ids_keep = torch.argsort(noise, dim=1, stable=True)[:, :len_keep]
        return (*reference.random_masking(x, mask_ratio, noise), ids_keep)
    return _random_masking_op(x, noise, len_keep, torch.get_default_dtype())
