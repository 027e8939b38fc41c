"""hog_targets: MaskFeat's HOG features per patch, the targets of `mae_loss(target="hog")`.

As the MaskFeat model builds them (SlowFast's `HOGLayerC(nbins=9, pool=8)`: no Gaussian window),
per channel: reflect padding by one pixel; the Sobel filters gx = [[1, 0, -1], [2, 0, -2],
[1, 0, -1]] (left minus right) and gy its transpose (top minus bottom); magnitude sqrt(gx^2 +
gy^2); bin floor(atan2(gx, gy) / pi * bins) mod bins, so opposite gradients share a bin (hard
binning, each pixel votes its whole magnitude); the votes summed per `cell` x `cell` cell, and
each cell's histogram L2-normalised over its bins (F.normalize: v / max(|v|, 1e-12)). A
patch's feature is laid out as MaskFeat's `_get_hog_label_2d` lays it out: (channel, bin, cell
row, cell col). The reference (`mae_kernels.reference.hog_targets`) computes the arctangent.

Triton (CUDA): one program per patch, only for patches whose mask entry is non-zero (the others
stay zero); each cell's pixels read with their reflected neighbours straight from the image.
The interpreter has no arctangent, so the bin is found without one: with (u, v) = (gy, gx)
turned into the upper half-plane (v > 0, or v = 0 and u >= 0), the bin is the number of
boundaries k * pi / bins, k = 1..bins-1, whose cross product with (u, v) is >= 0. That is
floor(atan2(gx, gy) / pi * bins) mod bins exactly, up to float rounding at a boundary.
CPU: the reference.
"""
from __future__ import annotations

import math

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton


@triton.jit
def _cell_histogram(base, y0, x0, H, W, s_h, s_w, cos_ptr, sin_ptr, bins,
                    CELL: tl.constexpr, PIXELS: tl.constexpr, BINS: tl.constexpr):
    """The L2-normalised orientation histogram (BINS lanes, `bins` used) of the cell at
    (y0, x0)."""
    pix = tl.arange(0, PIXELS)
    valid = pix < CELL * CELL
    y = y0 + pix // CELL
    x = x0 + pix % CELL
    # reflect padding: the neighbour beyond an edge is the pixel one inside it
    up = tl.where(y == 0, 1, y - 1) * s_h
    mid = y * s_h
    down = tl.where(y == H - 1, H - 2, y + 1) * s_h
    left = tl.where(x == 0, 1, x - 1) * s_w
    col = x * s_w
    right = tl.where(x == W - 1, W - 2, x + 1) * s_w
    up_left = tl.load(base + up + left, mask=valid, other=0.0).to(tl.float32)
    up_mid = tl.load(base + up + col, mask=valid, other=0.0).to(tl.float32)
    up_right = tl.load(base + up + right, mask=valid, other=0.0).to(tl.float32)
    mid_left = tl.load(base + mid + left, mask=valid, other=0.0).to(tl.float32)
    mid_right = tl.load(base + mid + right, mask=valid, other=0.0).to(tl.float32)
    down_left = tl.load(base + down + left, mask=valid, other=0.0).to(tl.float32)
    down_mid = tl.load(base + down + col, mask=valid, other=0.0).to(tl.float32)
    down_right = tl.load(base + down + right, mask=valid, other=0.0).to(tl.float32)
    # the reference's arithmetic, term for term
    gx = (up_left - up_right) + 2.0 * (mid_left - mid_right) + (down_left - down_right)
    gy = (up_left + 2.0 * up_mid + up_right) - (down_left + 2.0 * down_mid + down_right)
    magnitude = tl.sqrt(gx * gx + gy * gy)
    flip = (gx < 0.0) | ((gx == 0.0) & (gy < 0.0))  # atan2(gx, gy) < 0, or = pi: mod bins
    u = tl.where(flip, -gy, gy)
    v = tl.where(flip, -gx, gx)
    index = tl.zeros((PIXELS,), dtype=tl.int32)
    # NOTE: `while` loops over runtime bounds here: triton 3.6's interpreter turns range(n) of
    # a scalar argument (a 1-element array there) into int(), which NumPy >= 2.3 rejects
    k = 1
    while k < bins:  # past boundary k when the cross product is >= 0
        cross = tl.load(cos_ptr + k) * v - tl.load(sin_ptr + k) * u
        index += (cross >= 0.0).to(tl.int32)
        k += 1
    votes = tl.where((index[:, None] == tl.arange(0, BINS)[None, :]) & valid[:, None],
                     magnitude[:, None], 0.0)
    hist = tl.sum(votes, axis=0)
    return hist / tl.maximum(tl.sqrt(tl.sum(hist * hist, axis=0)), 1.0e-12)


@triton.jit
def _hog_kernel(img_ptr, mask_ptr, out_ptr, cos_ptr, sin_ptr, L, C, H, W, p, grid_w, bins,
                s_b, s_c, s_h, s_w, CELL: tl.constexpr, PIXELS: tl.constexpr,
                BINS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # b * L + patch
    b, patch = n // L, n % L
    top, left = (patch // grid_w) * p, (patch % grid_w) * p
    cells_w = p // CELL
    cells = cells_w * cells_w
    out = out_ptr + n * (C * bins * cells)
    lanes = tl.arange(0, BINS)
    # (channel c, bin k, cell) lies at c * bins * cells + k * cells + cell
    lane_offsets = lanes * cells
    active = tl.load(mask_ptr + n) != 0
    j = 0
    while j < C * cells:  # (channel, cell) pairs; a kept patch gets zeros and no histogram
        c, cell = j // cells, j % cells
        if active:
            hist = _cell_histogram(img_ptr + b * s_b + c * s_c, top + (cell // cells_w) * CELL,
                                   left + (cell % cells_w) * CELL, H, W, s_h, s_w, cos_ptr,
                                   sin_ptr, bins, CELL, PIXELS, BINS)
        else:
            hist = tl.zeros((BINS,), tl.float32)
        tl.store(out + c * bins * cells + cell + lane_offsets, hist, mask=lanes < bins)
        j += 1


def _boundaries(bins: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (float32) of the orientation bin boundaries k * pi / bins, k = 0..bins-1."""
    angles = torch.arange(bins, dtype=torch.float64) * math.pi / bins
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _hog_cpu(imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, bins: int,
             cell: int) -> torch.Tensor:
    out = reference.hog_targets(imgs, patch_size, bins, cell)
    return torch.where((mask != 0).unsqueeze(-1), out, 0.0)  # kept patches: zero, as Triton's


def _hog_triton(imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, bins: int,
                cell: int) -> torch.Tensor:
    B, C, H, W = imgs.shape
    grid_w = W // patch_size
    L = (H // patch_size) * grid_w
    features = C * bins * (patch_size // cell) ** 2
    out = torch.empty(B, L, features, dtype=torch.float32, device=imgs.device)
    if out.numel() == 0:
        return out
    cos, sin = _boundaries(bins, imgs.device)
    with torch.cuda.device_of(imgs):
        wrap_triton(_hog_kernel)[(B * L,)](
            imgs, mask.contiguous(), out, cos, sin, L, C, H, W, patch_size, grid_w, bins,
            *imgs.stride(), CELL=cell, PIXELS=triton.next_power_of_2(cell * cell),
            BINS=triton.next_power_of_2(bins),
        )
    return out


hog_op = device_op("hog_targets", _hog_triton, _hog_cpu)


def hog_targets(imgs: torch.Tensor, patch_size: int, bins: int = 9, cell: int = 8,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """MaskFeat's HOG features per patch, (B, L, C * bins * (p/cell)^2) float32, laid out
    (channel, bin, cell row, cell col) (see the module's docstring). With `mask` (B, L), only
    the patches where it is non-zero are computed; the others are zero. Not differentiable (a
    target)."""
    _checks.tensor("imgs", imgs, 4, floating=True)
    h, w = _checks.patch_grid("imgs", imgs, patch_size)
    _checks.integer("bins", bins, 2)
    _checks.integer("cell", cell, 1)
    if patch_size % cell:
        raise ValueError(f"cell {cell} must divide patch_size {patch_size}")
    if min(imgs.shape[-2:]) < 2:
        raise ValueError(f"imgs must be at least 2x2 pixels for HOG's reflect padding, got "
                         f"{tuple(imgs.shape[-2:])}")
    B = imgs.shape[0]
    if mask is None:
        mask = torch.ones(B, h * w, device=imgs.device)
    _checks.tensor("mask", mask, 2)
    _checks.same_device(imgs=imgs, mask=mask)
    if tuple(mask.shape) != (B, h * w):
        raise ValueError(f"mask must have shape {(B, h * w)}, got {tuple(mask.shape)}")
    imgs = imgs.detach()
    if USE_REFERENCE:
        return _hog_cpu(imgs, mask, patch_size, bins, cell)
    return hog_op(imgs, mask, patch_size, bins, cell)
