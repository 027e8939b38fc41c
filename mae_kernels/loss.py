"""mae_loss: the official `forward_loss` (optionally norm-pix) as one op, accumulated in float32
(float64 for float64 inputs); for videos (B, C, T, H, W) VideoMAE's loss over tubelets (t, p, p),
the targets laid out as `patchify3d` lays them out. An image is a one-frame video with tubelet 1
and MAE's target rule; a video has VideoMAE's (`videomae`: per channel within each tubelet, the
data's normalisation `unnormalize` (2, C) = (mean, std) undone first).

Every path reads the removed patches only (mask != 0): a NaN or inf in a kept patch of `pred`
(or of the images) does not reach the loss or its gradient, so a non-finite loss means the
same on every device. The official code multiplies by the mask and would return NaN there.
With `ids` (B, N) (CrossMAE: `ids_pred`) `pred` (B, N, E) holds the predicted patches only,
row n of sample b predicting patch ids[b, n], `mask` (B, N) weighting the rows: only those
patches of the image are read.

Triton (CUDA): reads the image directly (no patchify tensor), normalises each removed patch on
the fly, reads `pred` only where the mask is non-zero and reduces per program; the backward
recomputes the targets and writes grad_pred in one pass.
CPU: the reference's targets, the errors of the removed patches, the gradient in closed form.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton
from .tokens import gather_op

TILE_ELEMENTS = 4096  # patches x padded patch values per program
MAX_PATCH_ELEMENTS = 16384


@triton.jit
def _patch_errors(imgs_ptr, pred_ptr, mask_ptr, affine_ptr, ids_ptr, pid, n_patches, L,
                  frame_tokens, grid_w, s_ib, s_ic, s_it, s_ih, s_iw, E, C, p, tubelet,
                  NORM: tl.constexpr, VIDEOMAE: tl.constexpr, UNNORM: tl.constexpr,
                  GATHER: tl.constexpr, F64: tl.constexpr, BLOCK_N: tl.constexpr,
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
    b = n // L
    if GATHER:  # row n of pred predicts patch ids[n] (the predicted subset)
        token = tl.load(ids_ptr + n, mask=n < n_patches, other=0)
    else:
        token = n % L
    f, i, j = token // frame_tokens, (token % frame_tokens) // grid_w, token % grid_w
    dt, r, c, ch = e // (p * p * C), (e // (p * C)) % p, (e // C) % p, e % C
    # 64-bit products: a stride times a coordinate passes 2^31 in large or permuted inputs
    # (the patch terms are 64-bit through `n`)
    within = (ch.to(tl.int64) * s_ic + dt.to(tl.int64) * s_it + r.to(tl.int64) * s_ih
              + c.to(tl.int64) * s_iw)
    pixel = (b * s_ib + (f * tubelet) * s_it + (i * p) * s_ih + (j * p) * s_iw)[:, None] \
        + within[None, :]
    target = tl.load(imgs_ptr + pixel, mask=tile, other=0.0).to(acc_type)
    if UNNORM:  # x * std + mean per channel: the pixels before the loader normalised them
        scale = tl.load(affine_ptr + C + ch, mask=valid_e, other=0.0).to(acc_type)
        shift = tl.load(affine_ptr + ch, mask=valid_e, other=0.0).to(acc_type)
        target = tl.where(tile, target * scale[None, :] + shift[None, :], 0.0)
    if NORM:
        if VIDEOMAE:  # per channel: E // C values each, std + eps
            per_channel = E // C
            # NOTE: `while`, not range(C): triton 3.6's interpreter turns range of a scalar
            # argument (a 1-element array there) into int(), which NumPy >= 2.3 rejects
            mean = tl.zeros((BLOCK_N, BLOCK_E), acc_type)
            k = 0
            while k < C:
                sel = ch[None, :] == k
                m = tl.sum(tl.where(sel, target, 0.0), axis=1) / per_channel
                mean = tl.where(sel, m[:, None], mean)
                k += 1
            centred = tl.where(tile, target - mean, 0.0)
            std = tl.full((BLOCK_N, BLOCK_E), 1.0, acc_type)
            k = 0
            while k < C:
                sel = ch[None, :] == k
                var = tl.sum(tl.where(sel, centred * centred, 0.0), axis=1) / (per_channel - 1)
                std = tl.where(sel, (tl.sqrt(var) + 1.0e-6)[:, None], std)
                k += 1
            target = centred / std
        else:  # per patch, eps inside the root
            mean = tl.sum(target, axis=1) / E
            centred = tl.where(tile, target - mean[:, None], 0.0)
            var = tl.sum(centred * centred, axis=1) / (E - 1)
            target = centred / tl.sqrt(var + 1.0e-6)[:, None]
    pred = tl.load(pred_ptr + n[:, None] * E + e[None, :], mask=tile, other=0.0).to(acc_type)
    return tl.where(tile, pred - target, 0.0), weight, n, e, valid_e


@triton.jit
def _loss_forward_kernel(imgs_ptr, pred_ptr, mask_ptr, affine_ptr, ids_ptr, num_ptr, den_ptr,
                         n_patches, L, frame_tokens, grid_w, s_ib, s_ic, s_it, s_ih, s_iw, E, C,
                         p, tubelet, NORM: tl.constexpr, VIDEOMAE: tl.constexpr,
                         UNNORM: tl.constexpr, GATHER: tl.constexpr, F64: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    diff, weight, _, _, _ = _patch_errors(imgs_ptr, pred_ptr, mask_ptr, affine_ptr, ids_ptr, pid,
                                          n_patches, L, frame_tokens, grid_w, s_ib, s_ic, s_it,
                                          s_ih, s_iw, E, C, p, tubelet, NORM, VIDEOMAE, UNNORM,
                                          GATHER, F64, BLOCK_N, BLOCK_E)
    per_patch = tl.sum(diff * diff, axis=1) / E
    tl.store(num_ptr + pid, tl.sum(per_patch * weight, axis=0))
    tl.store(den_ptr + pid, tl.sum(weight, axis=0))


@triton.jit
def _loss_backward_kernel(imgs_ptr, pred_ptr, mask_ptr, affine_ptr, ids_ptr, scale_ptr,
                          grad_pred_ptr, n_patches, L, frame_tokens, grid_w, s_ib, s_ic, s_it,
                          s_ih, s_iw, E, C, p, tubelet, NORM: tl.constexpr,
                          VIDEOMAE: tl.constexpr, UNNORM: tl.constexpr, GATHER: tl.constexpr,
                          F64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    diff, weight, n, e, valid_e = _patch_errors(imgs_ptr, pred_ptr, mask_ptr, affine_ptr, ids_ptr,
                                                tl.program_id(0), n_patches, L, frame_tokens,
                                                grid_w, s_ib, s_ic, s_it, s_ih, s_iw, E, C, p,
                                                tubelet, NORM, VIDEOMAE, UNNORM, GATHER, F64,
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


def _launch(kernel, videos, pred, mask, tubelet, patch_size, norm_pix_loss, videomae,
            unnormalize, ids, *outputs):
    block_n, block_e, programs = _blocks(pred)
    if programs == 0:
        return
    B, C, T, H, W = videos.shape
    L, E = pred.shape[1], pred.shape[2]
    dtype = reference.loss_dtype(videos, pred)
    # without un-normalising the kernel never reads `affine`: any pointer will do
    affine = mask if unnormalize is None else unnormalize.to(dtype).contiguous()
    with torch.cuda.device_of(pred):
        wrap_triton(kernel)[(programs,)](
            videos, pred, mask, affine, mask if ids is None else ids.contiguous(), *outputs,
            B * L, L,
            (H // patch_size) * (W // patch_size), W // patch_size, *videos.stride(), E, C,
            patch_size, tubelet, NORM=norm_pix_loss, VIDEOMAE=videomae,
            UNNORM=unnormalize is not None, GATHER=ids is not None, F64=dtype == torch.float64,
            BLOCK_N=block_n, BLOCK_E=block_e,
        )


def _removed_errors(videos, pred, mask, tubelet, patch_size, norm_pix_loss, videomae,
                    unnormalize, ids=None):
    """(pred - target on the removed patches, zero on the kept ones; mask; accumulation dtype).
    The kept patches are never read, as in the Triton kernel."""
    dtype = reference.loss_dtype(videos, pred)
    mean, std = (None, None) if unnormalize is None else unnormalize
    target = reference.videomae_targets(videos, tubelet, patch_size, norm_pix_loss and videomae,
                                        dtype, mean, std)
    if ids is not None:  # pred's rows: the patches ids names
        target = gather_op(target, ids)
    if norm_pix_loss and not videomae:  # MAE's rule over (one-frame) tubelets
        target = reference.norm_pix(target)
    return _removed_diff(pred, target, mask, dtype), mask.to(dtype), dtype


def _removed_diff(pred, target, mask, dtype):
    return torch.where((mask != 0).unsqueeze(-1), pred.to(dtype) - target, 0.0)


def _mean_squared(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MAE reduction: the mean over each patch, then the mask-weighted mean of patches."""
    return ((diff * diff).mean(dim=-1) * mask).sum() / mask.sum()


def _mae_loss_torch(videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, tubelet: int,
                    patch_size: int, norm_pix_loss: bool, videomae: bool = False,
                    unnormalize: torch.Tensor | None = None,
                    ids: torch.Tensor | None = None) -> torch.Tensor:
    diff, mask, _ = _removed_errors(videos, pred, mask, tubelet, patch_size, norm_pix_loss,
                                    videomae, unnormalize, ids)
    return _mean_squared(diff, mask)


def _mae_loss_triton(videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, tubelet: int,
                     patch_size: int, norm_pix_loss: bool, videomae: bool = False,
                     unnormalize: torch.Tensor | None = None,
                     ids: torch.Tensor | None = None) -> torch.Tensor:
    if triton.next_power_of_2(pred.shape[-1]) > MAX_PATCH_ELEMENTS:
        return _mae_loss_torch(videos, pred, mask, tubelet, patch_size, norm_pix_loss, videomae,
                               unnormalize, ids)
    pred, mask = pred.contiguous(), mask.contiguous()
    programs = _blocks(pred)[2]
    acc = dict(dtype=reference.loss_dtype(videos, pred), device=pred.device)
    num, den = torch.zeros(programs, **acc), torch.zeros(programs, **acc)
    _launch(_loss_forward_kernel, videos, pred, mask, tubelet, patch_size, norm_pix_loss,
            videomae, unnormalize, ids, num, den)
    return num.sum() / den.sum()


mae_loss_op = device_op("mae_loss", _mae_loss_triton, _mae_loss_torch)


def _mae_loss_backward_torch(grad: torch.Tensor, videos: torch.Tensor, pred: torch.Tensor,
                             mask: torch.Tensor, tubelet: int, patch_size: int,
                             norm_pix_loss: bool, videomae: bool = False,
                             unnormalize: torch.Tensor | None = None,
                             ids: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d pred, in pred's dtype and layout (contiguous); zeros on kept patches."""
    diff, mask, dtype = _removed_errors(videos, pred, mask, tubelet, patch_size, norm_pix_loss,
                                        videomae, unnormalize, ids)
    scale = grad.to(dtype) * 2.0 / (mask.sum() * pred.shape[-1])
    return (diff * (mask * scale).unsqueeze(-1)).to(pred.dtype).contiguous()


def _mae_loss_backward_triton(grad: torch.Tensor, videos: torch.Tensor, pred: torch.Tensor,
                              mask: torch.Tensor, tubelet: int, patch_size: int,
                              norm_pix_loss: bool, videomae: bool = False,
                              unnormalize: torch.Tensor | None = None,
                              ids: torch.Tensor | None = None) -> torch.Tensor:
    if triton.next_power_of_2(pred.shape[-1]) > MAX_PATCH_ELEMENTS:
        return _mae_loss_backward_torch(grad, videos, pred, mask, tubelet, patch_size,
                                        norm_pix_loss, videomae, unnormalize, ids)
    pred, mask = pred.contiguous(), mask.contiguous()
    dtype = reference.loss_dtype(videos, pred)
    grad_pred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    scale = (grad.to(dtype) * 2.0 / (mask.to(dtype).sum() * pred.shape[-1])).reshape(1)
    _launch(_loss_backward_kernel, videos, pred, mask, tubelet, patch_size, norm_pix_loss,
            videomae, unnormalize, ids, scale, grad_pred)
    return grad_pred


mae_loss_backward_op = device_op("mae_loss_backward", _mae_loss_backward_triton,
                                 _mae_loss_backward_torch)


def _setup(ctx, inputs, output):
    videos, pred, mask, tubelet, patch_size, norm_pix_loss, videomae, unnormalize, ids = inputs
    ctx.save_for_backward(videos, pred, mask, unnormalize, ids)
    ctx.geometry = (tubelet, patch_size, norm_pix_loss, videomae)


def _backward(ctx, grad):
    videos, pred, mask, unnormalize, ids = ctx.saved_tensors
    grad_pred = mae_loss_backward_op(grad, videos, pred, mask, *ctx.geometry, unnormalize, ids)
    return None, grad_pred, None, None, None, None, None, None, None


mae_loss_op.register_autograd(_backward, setup_context=_setup)


TARGETS = ("pixel", "norm_pix", "hog")


def _per_channel(imgs: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor | None:
    """`mean` and `std` as the op's (2, C) `unnormalize`, checked; None when not given."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError(f"mean and std come together (the data's normalisation), got only "
                         f"{'mean' if std is None else 'std'}")
    if imgs.dim() != 5:
        raise ValueError("mean and std un-normalise video targets, as VideoMAE does; image MAE's "
                         f"targets are the images as given (imgs has shape {tuple(imgs.shape)})")
    C = imgs.shape[1]
    rows = []
    for name, value in (("mean", mean), ("std", std)):
        try:
            row = torch.as_tensor(value, dtype=dtype, device=imgs.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be {C} numbers (one per channel) or a tensor, got "
                            f"{type(value).__name__}") from exc
        if tuple(row.shape) != (C,):
            raise ValueError(f"{name} must hold one value per channel ({C}), got shape "
                             f"{tuple(row.shape)}")
        rows.append(row)
    return torch.stack(rows)


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool | None = None, tubelet_size: int = 1,
             target: str | None = None, *, mean=None, std=None,
             ids_pred: torch.Tensor | None = None) -> torch.Tensor:
    """The official `forward_loss`: mean squared error per patch, averaged over removed patches.

    imgs (B, C, H, W), pred (B, L, p*p*C), mask (B, L) with 1 = removed. With `norm_pix_loss`
    (default True) each target patch is normalised by its mean and unbiased variance, eps
    inside the root (MAE). For videos, imgs is (B, C, T, H, W) and each patch a tubelet of
    `tubelet_size` frames (pred (B, L, t*p*p*C), tokens as `patchify3d` orders them), and the
    target is VideoMAE's: the video un-normalised by the data's per-channel `mean` and `std`
    (VideoMAE: ImageNet's; None: taken as it is), with `norm_pix_loss` (its `normlize_target`)
    each channel of a tubelet normalised by its mean and unbiased std, `(x - mean) / (std +
    1e-6)`. `target` "pixel" / "norm_pix" says the same explicitly; "hog" compares pred (B, L,
    C * 9 * (p/8)^2) with MaskFeat's `hog_targets` of the removed patches (only those are
    computed; images only, no norm_pix_loss, tubelet_size, mean or std).

    Only removed patches are read: unlike the official code (which multiplies by the mask), a
    NaN in a kept patch of `pred` does not reach the loss. Returns a float32 scalar (float64 for
    float64 inputs); the gradient flows to `pred`.

    The predicted subset (CrossMAE's `forward_loss`): with `ids_pred` (B, N) int64, pred
    (B, N, p*p*C) holds the predictions of patches ids_pred[b, :] only and the loss is the mean
    over those rows (`mask` None; or (B, N) weights of the rows); only those patches of imgs
    are read. Images only, pixel targets.
    """
    if norm_pix_loss is not None and not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
    if target is not None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target == "hog":
            _not_for_hog(norm_pix_loss, tubelet_size, mean, std, ids_pred)
            return _hog_loss(imgs, pred, mask, patch_size)
        if norm_pix_loss is not None and norm_pix_loss != (target == "norm_pix"):
            raise ValueError(f"norm_pix_loss={norm_pix_loss} contradicts target={target!r}")
        norm_pix_loss = target == "norm_pix"
    norm_pix_loss = True if norm_pix_loss is None else norm_pix_loss
    _checks.tensor("imgs", imgs, floating=True)
    if imgs.dim() not in (4, 5):
        raise ValueError(f"imgs must be images (B, C, H, W) or videos (B, C, T, H, W), got shape "
                         f"{tuple(imgs.shape)}")
    _checks.tensor("pred", pred, 3, floating=True)
    if ids_pred is not None:
        return _predicted_loss(imgs, pred, mask, patch_size, norm_pix_loss, tubelet_size, mean,
                               std, ids_pred)
    _checks.tensor("mask", mask, 2)
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be a real tensor, got {mask.dtype}")
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
    unnormalize = _per_channel(imgs, mean, std, reference.loss_dtype(imgs, pred))
    if USE_REFERENCE:
        return reference.mae_loss(imgs, pred, mask, patch_size, norm_pix_loss, tubelet_size,
                                  *((None, None) if unnormalize is None else unnormalize))
    return mae_loss_op(videos, pred, mask, tubelet_size, patch_size, norm_pix_loss,
                       imgs.dim() == 5, unnormalize)


def _predicted_loss(imgs, pred, mask, patch_size, norm_pix_loss, tubelet_size, mean, std,
                    ids_pred) -> torch.Tensor:
    """`mae_loss` over the predicted patches ids_pred only (see its doc)."""
    if imgs.dim() != 4 or tubelet_size != 1 or mean is not None or std is not None:
        raise ValueError(f"ids_pred (the predicted subset, CrossMAE) takes images (B, C, H, W) "
                         f"and no tubelet_size, mean or std; imgs has shape "
                         f"{tuple(imgs.shape)}")
    _checks.tensor("ids_pred", ids_pred, 2, dtype=torch.int64)
    B, N = ids_pred.shape
    if mask is None:
        mask = torch.ones(B, N, device=pred.device)
    _checks.tensor("mask", mask, 2)
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be a real tensor, got {mask.dtype}")
    _checks.same_device(imgs=imgs, pred=pred, mask=mask, ids_pred=ids_pred)
    h, w = _checks.patch_grid("imgs", imgs, patch_size)
    expected = (B, N, patch_size * patch_size * imgs.shape[1])
    if imgs.shape[0] != B:
        raise ValueError(f"ids_pred has batch size {B} but imgs has {imgs.shape[0]}")
    if tuple(pred.shape) != expected:
        raise ValueError(f"pred must have shape {expected} (a row per ids_pred entry), got "
                         f"{tuple(pred.shape)}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"mask must have shape {(B, N)} (a weight per ids_pred entry), got "
                         f"{tuple(mask.shape)}")
    _checks.index_range("ids_pred", ids_pred, h * w)
    if USE_REFERENCE:
        return reference.predicted_loss(imgs, pred, ids_pred, patch_size, norm_pix_loss, mask)
    return mae_loss_op(imgs.unsqueeze(2), pred, mask, 1, patch_size, norm_pix_loss, False, None,
                       ids_pred)


def _not_for_hog(norm_pix_loss, tubelet_size, mean, std, ids_pred) -> None:
    """HOG targets are MaskFeat's, of images: the pixel-target arguments would be ignored."""
    given = [name for name, unused in (("norm_pix_loss", norm_pix_loss is not None),
                                       ("tubelet_size", tubelet_size != 1),
                                       ("mean", mean is not None), ("std", std is not None),
                                       ("ids_pred", ids_pred is not None))
             if unused]
    if given:
        raise ValueError(f"target='hog' (MaskFeat's HOG of images) takes no "
                         f"{', '.join(given)}: it would be ignored")


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
    dtype = torch.promote_types(torch.float32, pred.dtype)
    return _mean_squared(_removed_diff(pred, target, mask, dtype), mask.to(dtype))
