"""patchify / unpatchify in Triton: one pass each, one program per (image, pixel row).

A pixel row y of image b holds, for every patch column j, row r = y % p of patch (y // p, j):
read as C contiguous image rows, written as runs of p*C contiguous patch values. The same
kernel runs both ways, so the two layouts can never drift apart.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096


@triton.jit
def _patch_rows_kernel(img_ptr, patches_ptr, H, W, C, p, grid_w, s_b, s_c, s_h, s_w,
                       TO_PATCHES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * H + y
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = n < W * C
    b, y = row // H, row % H
    i, r = y // p, y % p
    # n enumerates (patch col j, pixel col c, channel ch) in patch-token order
    j, c, ch = n // (p * C), (n // C) % p, n % C
    L = (H // p) * grid_w
    E = p * p * C
    token = b * L + i * grid_w + j
    patch_offset = token * E + (r * p + c) * C + ch
    img_offset = b * s_b + ch * s_c + y * s_h + (j * p + c) * s_w
    if TO_PATCHES:
        tl.store(patches_ptr + patch_offset, tl.load(img_ptr + img_offset, mask=valid), mask=valid)
    else:
        tl.store(img_ptr + img_offset, tl.load(patches_ptr + patch_offset, mask=valid), mask=valid)


def _launch(img, patches, patch_size, to_patches: bool):
    B, C, H, W = img.shape
    if img.numel() == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(W * C))
    grid = (B * H, triton.cdiv(W * C, block))
    _patch_rows_kernel[grid](img, patches, H, W, C, patch_size, W // patch_size, *img.stride(),
                             TO_PATCHES=to_patches, BLOCK=block)


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
