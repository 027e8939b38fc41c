"""mae_loss: the official `forward_loss` (optionally norm-pix) as one op, accumulated in float32."""
from __future__ import annotations

import torch

from . import _checks, reference
from .backend import REFERENCE, TRITON, resolve

_EPS = 1.0e-6


def _use_triton(imgs: torch.Tensor, pred: torch.Tensor) -> bool:
    if resolve(imgs.device, has_extension_path=False) != TRITON:
        return False
    if accumulation_dtype(imgs, pred) == torch.float64:
        return False
    from .kernels.loss import supported

    return supported(pred)


def accumulation_dtype(imgs: torch.Tensor, pred: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (as gradcheck needs)."""
    return torch.promote_types(torch.float32, torch.promote_types(imgs.dtype, pred.dtype))


def _targets(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool,
             dtype: torch.dtype) -> torch.Tensor:
    target = reference.patchify(imgs, patch_size).to(dtype)
    if norm_pix_loss:
        var, mean = torch.var_mean(target, dim=-1, keepdim=True)
        target = (target - mean) / (var + _EPS).sqrt()
    return target


@torch.library.custom_op("mae_kernels::mae_loss", mutates_args=())
def _mae_loss_op(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                 norm_pix_loss: bool) -> torch.Tensor:
    if _use_triton(imgs, pred):
        from .kernels.loss import mae_loss_triton

        return mae_loss_triton(imgs, pred, mask, patch_size, norm_pix_loss)
    dtype = accumulation_dtype(imgs, pred)
    target = _targets(imgs, patch_size, norm_pix_loss, dtype)
    per_patch = (pred.to(dtype) - target).square().mean(dim=-1)
    mask = mask.to(dtype)
    return (per_patch * mask).sum() / mask.sum()


@_mae_loss_op.register_fake
def _(imgs, pred, mask, patch_size, norm_pix_loss):
    return pred.new_empty((), dtype=accumulation_dtype(imgs, pred))


@torch.library.custom_op("mae_kernels::mae_loss_backward", mutates_args=())
def _mae_loss_backward_op(grad: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor,
                          mask: torch.Tensor, patch_size: int,
                          norm_pix_loss: bool) -> torch.Tensor:
    """d loss / d pred, in pred's dtype; zeros on kept patches."""
    if _use_triton(imgs, pred):
        from .kernels.loss import mae_loss_backward_triton

        return mae_loss_backward_triton(grad, imgs, pred, mask, patch_size, norm_pix_loss)
    dtype = accumulation_dtype(imgs, pred)
    target = _targets(imgs, patch_size, norm_pix_loss, dtype)
    mask = mask.to(dtype)
    scale = grad.to(dtype) * 2.0 / (mask.sum() * pred.shape[-1])
    return ((pred.to(dtype) - target) * (mask * scale).unsqueeze(-1)).to(pred.dtype)


@_mae_loss_backward_op.register_fake
def _(grad, imgs, pred, mask, patch_size, norm_pix_loss):
    return torch.empty_like(pred)


def _setup(ctx, inputs, output):
    imgs, pred, mask, patch_size, norm_pix_loss = inputs
    ctx.save_for_backward(imgs, pred, mask)
    ctx.patch_size = patch_size
    ctx.norm_pix_loss = norm_pix_loss


def _backward(ctx, grad):
    imgs, pred, mask = ctx.saved_tensors
    grad_pred = _mae_loss_backward_op(grad, imgs, pred, mask, ctx.patch_size, ctx.norm_pix_loss)
    return None, grad_pred, None, None, None


_mae_loss_op.register_autograd(_backward, setup_context=_setup)


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = True) -> torch.Tensor:
    """The official `forward_loss`: mean squared error per patch, averaged over removed patches.

    imgs (B, C, H, W), pred (B, L, p*p*C), mask (B, L) with 1 = removed. With `norm_pix_loss`
    each target patch is normalised by its mean and unbiased variance. Returns a float32 scalar
    (float64 for float64 inputs); the gradient flows to `pred`.
    """
    _checks.tensor("imgs", imgs, 4, floating=True)
    _checks.tensor("pred", pred, 3, floating=True)
    _checks.tensor("mask", mask, 2)
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be a real tensor, got {mask.dtype}")
    if not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
    _checks.same_device(imgs=imgs, pred=pred, mask=mask)
    h, w = _checks.patch_grid("imgs", imgs, patch_size)
    B, C = imgs.shape[:2]
    expected = (B, h * w, patch_size * patch_size * C)
    if tuple(pred.shape) != expected:
        raise ValueError(f"pred must have shape {expected} for these imgs, got {tuple(pred.shape)}")
    if tuple(mask.shape) != expected[:2]:
        raise ValueError(f"mask must have shape {expected[:2]}, got {tuple(mask.shape)}")
    if resolve(imgs.device, has_extension_path=False) == REFERENCE:
        return reference.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss)
    return _mae_loss_op(imgs, pred, mask, patch_size, norm_pix_loss)
