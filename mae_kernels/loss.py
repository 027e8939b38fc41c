"""mae_loss: the official `forward_loss` (optionally norm-pix) as one op, accumulated in float32
(float64 for float64 inputs); for videos (B, C, T, H, W) over tubelets (t, p, p), the targets
laid out as `patchify3d` lays them out. An image is a one-frame video with tubelet 1.

Triton (CUDA): reads the image directly (no patchify tensor), normalises each removed patch on
the fly (mean, unbiased variance), reads `pred` only where the mask is non-zero and reduces per
program; the backward recomputes the targets and writes grad_pred in one pass.
CPU: the reference forward, and its gradient in closed form.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton

TILE_ELEMENTS = 4096  # patches x padded patch values per program
MAX_PATCH_ELEMENTS = 16384


@triton.jit
def _patch_errors(imgs_ptr, pred_ptr, mask_ptr, pid, n_patches, L, frame_tokens, grid_w,
                  s_ib, s_ic, s_it, s_ih, s_iw, E, C, p, tubelet,
                  NORM: tl.constexpr, F64: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    """(pred - target) for BLOCK_N patches, with their mask weights; zero where the weight is 0."""
    acc_type = tl.float64 if F64 else tl.float32
    n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    weight = tl.load(mask_ptr + n, mask=n < n_patches, other=0.0).to(acc_type)
    active = weight != 0.0
    valid_e = e < E
    tile = active[:, None] & valid_e[None, :]
    # patch n = (b, tubelet f, row i, col j); value e = (frame dt, pixel row r, pixel col c,
    # channel ch), ch fastest
    b, token = n // L, n % L
    f, i, j = token // frame_tokens, (token % frame_tokens) // grid_w, token % grid_w
    dt, r, c, ch = e // (p * p * C), (e // (p * C)) % p, (e // C) % p, e % C
    pixel = (b * s_ib + (f * tubelet) * s_it + (i * p) * s_ih + (j * p) * s_iw)[:, None] \
        + (ch * s_ic + dt * s_it + r * s_ih + c * s_iw)[None, :]
    target = tl.load(imgs_ptr + pixel, mask=tile, other=0.0).to(acc_type)
    if NORM:
        mean = tl.sum(target, axis=1) / E
        centred = tl.where(tile, target - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / (E - 1)
        target = centred / tl.sqrt(var + 1.0e-6)[:, None]
    pred = tl.load(pred_ptr + n[:, None] * E + e[None, :], mask=tile, other=0.0).to(acc_type)
    return tl.where(tile, pred - target, 0.0), weight, n, e, valid_e


@triton.jit
def _loss_forward_kernel(imgs_ptr, pred_ptr, mask_ptr, num_ptr, den_ptr, n_patches, L,
                         frame_tokens, grid_w, s_ib, s_ic, s_it, s_ih, s_iw, E, C, p, tubelet,
                         NORM: tl.constexpr, F64: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    diff, weight, _, _, _ = _patch_errors(imgs_ptr, pred_ptr, mask_ptr, pid, n_patches, L,
                                          frame_tokens, grid_w, s_ib, s_ic, s_it, s_ih, s_iw,
                                          E, C, p, tubelet, NORM, F64, BLOCK_N, BLOCK_E)
    per_patch = tl.sum(diff * diff, axis=1) / E
    tl.store(num_ptr + pid, tl.sum(per_patch * weight, axis=0))
    tl.store(den_ptr + pid, tl.sum(weight, axis=0))


@triton.jit
def _loss_backward_kernel(imgs_ptr, pred_ptr, mask_ptr, scale_ptr, grad_pred_ptr, n_patches, L,
                          frame_tokens, grid_w, s_ib, s_ic, s_it, s_ih, s_iw, E, C, p, tubelet,
                          NORM: tl.constexpr, F64: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_E: tl.constexpr):
    diff, weight, n, e, valid_e = _patch_errors(imgs_ptr, pred_ptr, mask_ptr, tl.program_id(0),
                                                n_patches, L, frame_tokens, grid_w, s_ib, s_ic,
                                                s_it, s_ih, s_iw, E, C, p, tubelet, NORM, F64,
                                                BLOCK_N, BLOCK_E)
    scale = tl.load(scale_ptr)  # grad_out * 2 / (E * mask.sum())
    grad = diff * (weight * scale)[:, None]
    tl.store(grad_pred_ptr + n[:, None] * E + e[None, :], grad.to(grad_pred_ptr.dtype.element_ty),
             mask=(n < n_patches)[:, None] & valid_e[None, :])


def _blocks(pred: torch.Tensor) -> tuple[int, int, int]:
    """(patches per program, padded patch length, programs)."""
    n_patches, E = pred.shape[0] * pred.shape[1], pred.shape[2]
    block_e = triton.next_power_of_2(E)
    block_n = max(1, min(TILE_ELEMENTS // block_e, triton.next_power_of_2(max(n_patches, 1))))
    return block_n, block_e, triton.cdiv(n_patches, block_n)


def _launch(kernel, videos, pred, mask, tubelet, patch_size, norm_pix_loss, *outputs):
    block_n, block_e, programs = _blocks(pred)
    if programs == 0:
        return
    B, C, T, H, W = videos.shape
    L, E = pred.shape[1], pred.shape[2]
    f64 = reference.loss_dtype(videos, pred) == torch.float64
    with torch.cuda.device_of(pred):
        wrap_triton(kernel)[(programs,)](
            videos, pred, mask, *outputs, B * L, L, (H // patch_size) * (W // patch_size),
            W // patch_size, *videos.stride(), E, C, patch_size, tubelet, NORM=norm_pix_loss,
            F64=f64, BLOCK_N=block_n, BLOCK_E=block_e,
        )


def _mae_loss_torch(videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, tubelet: int,
                    patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    return reference.mae_loss(videos, pred, mask, patch_size, norm_pix_loss, tubelet)


def _mae_loss_triton(videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, tubelet: int,
                     patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    if triton.next_power_of_2(pred.shape[-1]) > MAX_PATCH_ELEMENTS:
        return _mae_loss_torch(videos, pred, mask, tubelet, patch_size, norm_pix_loss)
    pred, mask = pred.contiguous(), mask.contiguous()
    programs = _blocks(pred)[2]
    acc = dict(dtype=reference.loss_dtype(videos, pred), device=pred.device)
    num, den = torch.zeros(programs, **acc), torch.zeros(programs, **acc)
    _launch(_loss_forward_kernel, videos, pred, mask, tubelet, patch_size, norm_pix_loss, num,
            den)
    return num.sum() / den.sum()


mae_loss_op = device_op("mae_loss", _mae_loss_triton, _mae_loss_torch)


def _mae_loss_backward_torch(grad: torch.Tensor, videos: torch.Tensor, pred: torch.Tensor,
                             mask: torch.Tensor, tubelet: int, patch_size: int,
                             norm_pix_loss: bool) -> torch.Tensor:
    """d loss / d pred, in pred's dtype and layout (contiguous); zeros on kept patches."""
    dtype = reference.loss_dtype(videos, pred)
    target = reference.loss_targets(videos, patch_size, norm_pix_loss, dtype, tubelet)
    mask = mask.to(dtype)
    scale = grad.to(dtype) * 2.0 / (mask.sum() * pred.shape[-1])
    grad_pred = (pred.to(dtype) - target) * (mask * scale).unsqueeze(-1)
    return grad_pred.to(pred.dtype).contiguous()


def _mae_loss_backward_triton(grad: torch.Tensor, videos: torch.Tensor, pred: torch.Tensor,
                              mask: torch.Tensor, tubelet: int, patch_size: int,
                              norm_pix_loss: bool) -> torch.Tensor:
    if triton.next_power_of_2(pred.shape[-1]) > MAX_PATCH_ELEMENTS:
        return _mae_loss_backward_torch(grad, videos, pred, mask, tubelet, patch_size,
                                        norm_pix_loss)
    pred, mask = pred.contiguous(), mask.contiguous()
    dtype = reference.loss_dtype(videos, pred)
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    scale = (grad.to(dtype) * 2.0 / (mask.to(dtype).sum() * pred.shape[-1])).reshape(1)
    _launch(_loss_backward_kernel, videos, pred, mask, tubelet, patch_size, norm_pix_loss, scale,
            grad_pred)
    return grad_pred


mae_loss_backward_op = device_op("mae_loss_backward", _mae_loss_backward_triton,
                                 _mae_loss_backward_torch)


def _setup(ctx, inputs, output):
    videos, pred, mask, tubelet, patch_size, norm_pix_loss = inputs
    ctx.save_for_backward(videos, pred, mask)
    ctx.geometry = (tubelet, patch_size, norm_pix_loss)


def _backward(ctx, grad):
    videos, pred, mask = ctx.saved_tensors
    grad_pred = mae_loss_backward_op(grad, videos, pred, mask, *ctx.geometry)
    return None, grad_pred, None, None, None, None


mae_loss_op.register_autograd(_backward, setup_context=_setup)


TARGETS = ("pixel", "norm_pix", "hog")


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = True, tubelet_size: int = 1,
             target: str | None = None) -> torch.Tensor:
    """The official `forward_loss`: mean squared error per patch, averaged over removed patches.

    imgs (B, C, H, W), pred (B, L, p*p*C), mask (B, L) with 1 = removed. For videos, imgs is
    (B, C, T, H, W) and each patch a tubelet of `tubelet_size` frames (pred (B, L, t*p*p*C),
    tokens as `patchify3d` orders them). With `norm_pix_loss` each target patch is normalised
    by its mean and unbiased variance. `target` "pixel" / "norm_pix" says the same explicitly;
    "hog" compares pred (B, L, C * (p/8)^2 * 9) with `hog_targets` of the removed patches
    (only those are computed; images only). Returns a float32 scalar (float64 for float64
    inputs); the gradient flows to `pred`.
    """
    if target is not None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target == "hog":
            return _hog_loss(imgs, pred, mask, patch_size)
        norm_pix_loss = target == "norm_pix"
    _checks.tensor("imgs", imgs, floating=True)
    if imgs.dim() not in (4, 5):
        raise ValueError(f"imgs must be images (B, C, H, W) or videos (B, C, T, H, W), got shape "
                         f"{tuple(imgs.shape)}")
    _checks.tensor("pred", pred, 3, floating=True)
    _checks.tensor("mask", mask, 2)
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be a real tensor, got {mask.dtype}")
    if not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
    _checks.same_device(imgs=imgs, pred=pred, mask=mask)
    _checks.integer("tubelet_size", tubelet_size, 1)
    videos = imgs if imgs.dim() == 5 else imgs.unsqueeze(2)
    if imgs.dim() == 4 and tubelet_size != 1:
        raise ValueError(f"tubelet_size {tubelet_size} needs videos (B, C, T, H, W); imgs has "
                         f"shape {tuple(imgs.shape)}")
    h, w = _checks.patch_grid("imgs", imgs, patch_size)
    B, C, T = videos.shape[:3]
    if T % tubelet_size:
        raise ValueError(f"tubelet_size {tubelet_size} does not divide the {T} frames of imgs")
    expected = (B, (T // tubelet_size) * h * w, tubelet_size * patch_size * patch_size * C)
    if tuple(pred.shape) != expected:
        raise ValueError(f"pred must have shape {expected} for these imgs, got {tuple(pred.shape)}")
    if tuple(mask.shape) != expected[:2]:
        raise ValueError(f"mask must have shape {expected[:2]}, got {tuple(mask.shape)}")
    if USE_REFERENCE:
        return reference.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss, tubelet_size)
    return mae_loss_op(videos, pred, mask, tubelet_size, patch_size, norm_pix_loss)


def _hog_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
              patch_size: int) -> torch.Tensor:
    from .hog import hog_targets

    _checks.tensor("imgs", imgs, 4, floating=True)
    _checks.tensor("pred", pred, 3, floating=True)
    _checks.tensor("mask", mask, 2)
    target = hog_targets(imgs, patch_size, mask=mask)  # checks imgs, patch_size and mask
    if pred.shape != target.shape:
        raise ValueError(f"pred must have shape {tuple(target.shape)} for HOG targets of these "
                         f"imgs, got {tuple(pred.shape)}")
    return reference.masked_mse(pred, target, mask, torch.promote_types(torch.float32, pred.dtype))
