"""mae_loss in Triton: reads the image directly (no patchify tensor), normalises each removed
patch on the fly (mean, unbiased variance), reads `pred` only where the mask is non-zero, and
reduces in float32. The backward pass recomputes the targets and writes grad_pred in one pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 4096  # patches x padded patch values per program
MAX_PATCH_ELEMENTS = 16384


@triton.jit
def _patch_errors(imgs_ptr, pred_ptr, mask_ptr, pid, n_patches, L, grid_w,
                  s_ib, s_ic, s_ih, s_iw, E, C, p,
                  NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """(pred - target) for BLOCK_N patches, with their mask weights; zero where the weight is 0."""
    n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    weight = tl.load(mask_ptr + n, mask=n < n_patches, other=0.0).to(tl.float32)
    active = weight != 0.0
    valid_e = e < E
    tile = active[:, None] & valid_e[None, :]
    # patch n = (b, row i, col j); value e = (pixel row r, pixel col c, channel ch), ch fastest
    b, l = n // L, n % L
    i, j = l // grid_w, l % grid_w
    r, c, ch = e // (p * C), (e // C) % p, e % C
    pixel = (b * s_ib + (i * p) * s_ih + (j * p) * s_iw)[:, None] \
        + (ch * s_ic + r * s_ih + c * s_iw)[None, :]
    target = tl.load(imgs_ptr + pixel, mask=tile, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(target, axis=1) / E
        centred = tl.where(tile, target - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / (E - 1)
        target = centred / tl.sqrt(var + 1.0e-6)[:, None]
    pred = tl.load(pred_ptr + n[:, None] * E + e[None, :], mask=tile, other=0.0).to(tl.float32)
    return tl.where(tile, pred - target, 0.0), weight, n, e, valid_e


@triton.jit
def _loss_forward_kernel(imgs_ptr, pred_ptr, mask_ptr, num_ptr, den_ptr, n_patches, L, grid_w,
                         s_ib, s_ic, s_ih, s_iw, E, C, p,
                         NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    diff, weight, _, _, _ = _patch_errors(imgs_ptr, pred_ptr, mask_ptr, pid, n_patches, L,
                                          grid_w, s_ib, s_ic, s_ih, s_iw, E, C, p,
                                          NORM, BLOCK_N, BLOCK_E)
    per_patch = tl.sum(diff * diff, axis=1) / E
    tl.store(num_ptr + pid, tl.sum(per_patch * weight, axis=0))
    tl.store(den_ptr + pid, tl.sum(weight, axis=0))


@triton.jit
def _loss_backward_kernel(imgs_ptr, pred_ptr, mask_ptr, scale_ptr, grad_pred_ptr, n_patches, L,
                          grid_w, s_ib, s_ic, s_ih, s_iw, E, C, p,
                          NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    diff, weight, n, e, valid_e = _patch_errors(imgs_ptr, pred_ptr, mask_ptr, tl.program_id(0),
                                                n_patches, L, grid_w, s_ib, s_ic, s_ih, s_iw,
                                                E, C, p, NORM, BLOCK_N, BLOCK_E)
    scale = tl.load(scale_ptr)  # grad_out * 2 / (E * mask.sum())
    grad = diff * (weight * scale)[:, None]
    tl.store(grad_pred_ptr + n[:, None] * E + e[None, :], grad.to(grad_pred_ptr.dtype.element_ty),
             mask=(n < n_patches)[:, None] & valid_e[None, :])


def supported(pred: torch.Tensor) -> bool:
    return triton.next_power_of_2(pred.shape[-1]) <= MAX_PATCH_ELEMENTS


def _blocks(pred: torch.Tensor) -> tuple[int, int, int]:
    """(patches per program, padded patch length, programs)."""
    n_patches, E = pred.shape[0] * pred.shape[1], pred.shape[2]
    block_e = triton.next_power_of_2(E)
    block_n = max(1, min(TILE_ELEMENTS // block_e, triton.next_power_of_2(max(n_patches, 1))))
    return block_n, block_e, triton.cdiv(n_patches, block_n)


def _launch(kernel, imgs, pred, mask, patch_size, norm_pix_loss, *outputs):
    block_n, block_e, programs = _blocks(pred)
    if programs == 0:
        return
    B, C, H, W = imgs.shape
    L, E = pred.shape[1], pred.shape[2]
    kernel[(programs,)](imgs, pred, mask, *outputs, B * L, L, W // patch_size, *imgs.stride(),
                        E, C, patch_size, NORM=norm_pix_loss, BLOCK_N=block_n, BLOCK_E=block_e)


def mae_loss_triton(imgs, pred, mask, patch_size, norm_pix_loss):
    pred, mask = pred.contiguous(), mask.contiguous()
    programs = _blocks(pred)[2]
    num = torch.empty(programs, dtype=torch.float32, device=pred.device)
    den = torch.empty(programs, dtype=torch.float32, device=pred.device)
    _launch(_loss_forward_kernel, imgs, pred, mask, patch_size, norm_pix_loss, num, den)
    return num.sum() / den.sum()


def mae_loss_backward_triton(grad, imgs, pred, mask, patch_size, norm_pix_loss):
    pred, mask = pred.contiguous(), mask.contiguous()
    grad_pred = torch.empty_like(pred)
    scale = (grad.float() * 2.0 / (mask.float().sum() * pred.shape[-1])).reshape(1)
    _launch(_loss_backward_kernel, imgs, pred, mask, patch_size, norm_pix_loss, scale, grad_pred)
    return grad_pred
