"""patchify / unpatchify in Triton: one pass each, one program per (image, pixel row).

Pixel row y of image b holds row r = y % p of every patch (y // p, j): in the patch tensor, one
run of p*C contiguous values per patch column j. Each program walks a (patch column, run) tile,
so the patch side moves in whole 16-byte vectors and the image side reads whole sectors of C
image rows. The same kernel runs both ways, so the two layouts cannot drift apart.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    _patch_rows_kernel[grid](img, patches, H, C, patch_size, grid_w, *img.stride(),
                             TO_PATCHES=to_patches, BLOCK_J=block_j, RUN=run)


def patchify_triton(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    B, C, H, W = imgs.shape
    p = patch_size
    out = imgs.new_empty(B, (H // p) * (W // p), p * p * C)
    _launch(imgs, out, p, to_patches=True)
    return out


def unpatchify_triton(x: torch.Tensor, patch_size: int, h: int, w: int,
                      channels: int) -> torch.Tensor:
    p = patch_size
    img = x.new_empty(x.shape[0], channels, h * p, w * p)
    _launch(img, x.contiguous(), p, to_patches=False)
    return img
