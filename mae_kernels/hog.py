"""hog_targets: MaskFeat-style HOG features per patch, the targets of `mae_loss(target="hog")`.

Per channel (MaskFeat computes HOG on each of R, G, B and concatenates them): gradients by the
[-1, 0, 1] filters, zero on the image border (scikit-image's `hog`), magnitude sqrt(gx^2 +
gy^2), unsigned orientation in [0, pi) in `bins` equal bins with each pixel voting its whole
magnitude into its bin (hard binning, as MaskFeat's HOG layer and scikit-image do), one
histogram per `cell` x `cell` block of pixels, averaged over its pixels (MaskFeat's average
pooling). A patch's feature is its cells' histograms, (channel, cell row, cell col, bin), L2
normalised over the patch: v / sqrt(|v|^2 + 1e-10) (scikit-image's 'L2' block norm, the block
being the patch). The orientation bin is found without an arctangent, by the sign of the cross
product with each bin boundary's direction, so the kernel and the reference agree up to ties.

Triton (CUDA): one program per patch, only for patches whose mask entry is non-zero (the
others stay zero): two passes over the patch's cells (the norm, then the normalised
histograms), each cell's pixels read with their neighbours straight from the image.
CPU: the reference.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton


@triton.jit
def _cell_histogram(base, y0, x0, H, W, s_h, s_w, cos_ptr, sin_ptr, bins,
                    CELL: tl.constexpr, PIXELS: tl.constexpr, BINS: tl.constexpr):
    """The averaged orientation histogram (BINS lanes, `bins` used) of the cell at (y0, x0)."""
    pix = tl.arange(0, PIXELS)
    valid = pix < CELL * CELL
    y = y0 + pix // CELL
    x = x0 + pix % CELL
    inner_x = valid & (x > 0) & (x < W - 1)
    inner_y = valid & (y > 0) & (y < H - 1)
    row = base + y * s_h
    gx = (tl.load(row + (x + 1) * s_w, mask=inner_x, other=0.0).to(tl.float32)
          - tl.load(row + (x - 1) * s_w, mask=inner_x, other=0.0).to(tl.float32))
    gy = (tl.load(base + (y + 1) * s_h + x * s_w, mask=inner_y, other=0.0).to(tl.float32)
          - tl.load(base + (y - 1) * s_h + x * s_w, mask=inner_y, other=0.0).to(tl.float32))
    magnitude = tl.sqrt(gx * gx + gy * gy)
    flip = (gy < 0.0) | ((gy == 0.0) & (gx < 0.0))  # the unsigned orientation, in [0, pi)
    gx = tl.where(flip, -gx, gx)
    gy = tl.where(flip, -gy, gy)
    index = tl.zeros((PIXELS,), dtype=tl.int32)
    for k in range(1, bins):  # past boundary k when the cross product is >= 0
        cross = tl.load(cos_ptr + k) * gy - tl.load(sin_ptr + k) * gx
        index += (cross >= 0.0).to(tl.int32)
    votes = tl.where((index[:, None] == tl.arange(0, BINS)[None, :]) & valid[:, None],
                     magnitude[:, None], 0.0)
    return tl.sum(votes, axis=0) / (CELL * CELL)


@triton.jit
def _hog_kernel(img_ptr, mask_ptr, out_ptr, cos_ptr, sin_ptr, L, C, H, W, p, grid_w, bins,
                s_b, s_c, s_h, s_w, CELL: tl.constexpr, PIXELS: tl.constexpr,
                BINS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # b * L + patch
    b, patch = n // L, n % L
    top, left = (patch // grid_w) * p, (patch % grid_w) * p
    cells_w = p // CELL
    cells = cells_w * cells_w
    features = C * cells * bins
    lanes = tl.arange(0, BINS)
    active = tl.load(mask_ptr + n) != 0
    work = tl.where(active, C * cells, 0)  # no pass at all for kept patches
    total = tl.sum(tl.zeros((BINS,), tl.float32), axis=0)
    for j in range(work):
        c, cell = j // cells, j % cells
        hist = _cell_histogram(img_ptr + b * s_b + c * s_c, top + (cell // cells_w) * CELL,
                               left + (cell % cells_w) * CELL, H, W, s_h, s_w, cos_ptr,
                               sin_ptr, bins, CELL, PIXELS, BINS)
        total += tl.sum(hist * hist, axis=0)
    scale = 1.0 / tl.sqrt(total + 1e-10)
    for j in range(work):
        c, cell = j // cells, j % cells
        hist = _cell_histogram(img_ptr + b * s_b + c * s_c, top + (cell // cells_w) * CELL,
                               left + (cell % cells_w) * CELL, H, W, s_h, s_w, cos_ptr,
                               sin_ptr, bins, CELL, PIXELS, BINS)
        tl.store(out_ptr + n * features + j * bins + lanes, hist * scale, mask=lanes < bins)
    for j in range(tl.where(active, 0, C * cells)):  # zeros for a kept patch
        tl.store(out_ptr + n * features + j * bins + lanes, tl.zeros((BINS,), tl.float32),
                 mask=lanes < bins)


def _hog_cpu(imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, bins: int,
             cell: int) -> torch.Tensor:
    out = reference.hog_targets(imgs, patch_size, bins, cell)
    return out * (mask != 0).unsqueeze(-1)


def _hog_triton(imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, bins: int,
                cell: int) -> torch.Tensor:
    B, C, H, W = imgs.shape
    grid_w = W // patch_size
    L = (H // patch_size) * grid_w
    features = C * (patch_size // cell) ** 2 * bins
    out = torch.empty(B, L, features, dtype=torch.float32, device=imgs.device)
    if out.numel() == 0:
        return out
    cos, sin = reference.hog_boundaries(bins, imgs.device)
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
    """HOG features per patch, (B, L, C * (p/cell)^2 * bins) float32 (see the module's
    docstring for each choice). With `mask` (B, L), only the patches where it is non-zero are
    computed; the others are zero. Not differentiable (a target)."""
    _checks.tensor("imgs", imgs, 4, floating=True)
    h, w = _checks.patch_grid("imgs", imgs, patch_size)
    _checks.integer("bins", bins, 2)
    _checks.integer("cell", cell, 1)
    if patch_size % cell:
        raise ValueError(f"cell {cell} must divide patch_size {patch_size}")
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

