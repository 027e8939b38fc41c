"""patchify / unpatchify: images (B, C, H, W) <-> patch tokens (B, L, p*p*C), each the other's
backward. Layout: patches row-major over the grid, (row, col, channel) inside a patch.

Triton (CUDA): one pass each, one program per (image, pixel row). Pixel row y of image b holds
row r = y % p of every patch (y // p, j): in the patch tensor, one run of p*C contiguous values
per patch column j. Each program walks a (patch column, run) tile, so the patch side moves in
whole 16-byte vectors and the image side reads whole sectors of C image rows. The same kernel
runs both ways, so the two layouts cannot drift apart.
CPU: the reference's einsum, copied out.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton

TILE_ELEMENTS = 2048


@triton.jit
def _patch_rows_kernel(img_ptr, patches_ptr, H, C, p, grid_w, s_b, s_c, s_h, s_w,
                       TO_PATCHES: tl.constexpr, BLOCK_J: tl.constexpr, RUN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * H + y
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    n = tl.arange(0, RUN)  # (pixel col c, channel ch), channel fastest
    b, y = row // H, row % H
    i, r = y // p, y % p
    run_len = p * C
    c, ch = n // C, n % C
    valid = (j < grid_w)[:, None] & (n < run_len)[None, :]
    token = b * ((H // p) * grid_w) + i * grid_w + j
    patch_offset = (token * (p * run_len) + r * run_len)[:, None] + n[None, :]
    img_offset = (b * s_b + y * s_h) + (ch * s_c)[None, :] + ((j * p)[:, None] + c[None, :]) * s_w
    if TO_PATCHES:
        tl.store(patches_ptr + patch_offset, tl.load(img_ptr + img_offset, mask=valid), mask=valid)
    else:
        tl.store(img_ptr + img_offset, tl.load(patches_ptr + patch_offset, mask=valid), mask=valid)


def _launch(img, patches, patch_size, to_patches: bool):
    B, C, H, W = img.shape
    if img.numel() == 0:
        return
    grid_w = W // patch_size
    run = triton.next_power_of_2(patch_size * C)
    block_j = min(triton.next_power_of_2(grid_w), max(1, TILE_ELEMENTS // run))
    grid = (B * H, triton.cdiv(grid_w, block_j))
    with torch.cuda.device_of(img):
        wrap_triton(_patch_rows_kernel)[grid](
            img, patches, H, C, patch_size, grid_w, *img.stride(), TO_PATCHES=to_patches,
            BLOCK_J=block_j, RUN=run,
        )


def _patchify_torch(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    # an op never returns a view of its input
    return reference.patchify(imgs, patch_size).clone(memory_format=torch.contiguous_format)


def _patchify_triton(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    B, C, H, W = imgs.shape
    p = patch_size
    out = imgs.new_empty(B, (H // p) * (W // p), p * p * C)
    _launch(imgs, out, p, to_patches=True)
    return out


patchify_op = device_op("patchify", _patchify_triton, _patchify_torch)


def _unpatchify_torch(x: torch.Tensor, patch_size: int, h: int, w: int,
                      channels: int) -> torch.Tensor:
    return reference.unpatchify(x, patch_size, (h, w), channels).clone(
        memory_format=torch.contiguous_format)


def _unpatchify_triton(x: torch.Tensor, patch_size: int, h: int, w: int,
                       channels: int) -> torch.Tensor:
    p = patch_size
    img = x.new_empty(x.shape[0], channels, h * p, w * p)
    _launch(img, x.contiguous(), p, to_patches=False)
    return img


unpatchify_op = device_op("unpatchify", _unpatchify_triton, _unpatchify_torch)


def _patchify_setup(ctx, inputs, output):
    imgs, patch_size = inputs
    ctx.patch_size = patch_size
    ctx.grid = (imgs.shape[2] // patch_size, imgs.shape[3] // patch_size)
    ctx.channels = imgs.shape[1]


def _patchify_backward(ctx, grad):
    h, w = ctx.grid
    return unpatchify_op(grad, ctx.patch_size, h, w, ctx.channels), None


def _unpatchify_setup(ctx, inputs, output):
    ctx.patch_size = inputs[1]


def _unpatchify_backward(ctx, grad):
    return patchify_op(grad, ctx.patch_size), None, None, None, None


patchify_op.register_autograd(_patchify_backward, setup_context=_patchify_setup)
unpatchify_op.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), the official `einsum('nchpwq->nhwpqc')` layout."""
    _checks.tensor("imgs", imgs, 4, floating=True)
    _checks.patch_grid("imgs", imgs, patch_size)
    if USE_REFERENCE:
        return reference.patchify(imgs, patch_size)
    return patchify_op(imgs, patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None,
               channels: int = 3) -> torch.Tensor:
    """The exact inverse of `patchify`; a square grid when `grid` is None."""
    _checks.tensor("x", x, 3, floating=True)
    _checks.integer("patch_size", patch_size, 1)
    _checks.integer("channels", channels, 1)
    B, L, D = x.shape
    if grid is None:
        side = round(L**0.5)
        if side * side != L:
            raise ValueError(f"x has {L} patches, not a square grid: pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    _checks.integer("grid[0]", h, 1)
    _checks.integer("grid[1]", w, 1)
    if h * w != L:
        raise ValueError(f"grid {tuple(grid)} holds {h * w} patches but x has {L}")
    if D != patch_size * patch_size * channels:
        raise ValueError(
            f"x has {D} values per patch, expected patch_size**2 * channels = "
            f"{patch_size * patch_size * channels}"
        )
    if USE_REFERENCE:
        return reference.unpatchify(x, patch_size, (h, w), channels)
    return unpatchify_op(x, patch_size, h, w, channels)
