"""patchify / unpatchify, for images (B, C, H, W) and videos (B, C, T, H, W): patch tokens
(B, L, t*p*p*C), each op the other's backward. Layout: tokens frame-major (tubelet index, then
row-major over the patch grid); inside a patch (frame, row, col, channel), channel fastest: the
official `einsum('nchpwq->nhwpqc')` for images, and VideoMAE's tubelet order for videos
(`b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)`). An image is a one-frame video with
tubelet 1, so one op pair serves both.

Triton (CUDA): one pass each, one program per (video, frame, pixel row). Pixel row y of frame f
holds row r = y % p of every patch (f // t, y // p, j): in the patch tensor, one run of p*C
contiguous values per patch column j. Each program walks a (patch column, run) tile, so the
patch side moves in whole 16-byte vectors and the image side reads whole sectors of C image
rows. The same kernel runs both ways, so the two layouts cannot drift apart.
CPU: the reference's einsum, copied out.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton

TILE_ELEMENTS = 2048


@triton.jit
def _patch_rows_kernel(img_ptr, patches_ptr, T, H, C, p, tubelet, grid_w,
                       s_b, s_c, s_t, s_h, s_w,
                       TO_PATCHES: tl.constexpr, BLOCK_J: tl.constexpr, RUN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b * T + f) * H + y
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    n = tl.arange(0, RUN)  # (pixel col c, channel ch), channel fastest
    b, f, y = row // (T * H), (row // H) % T, row % H
    frame_tokens = (H // p) * grid_w
    i, r = y // p, y % p
    run_len = p * C
    c, ch = n // C, n % C
    valid = (j < grid_w)[:, None] & (n < run_len)[None, :]
    token = (b * (T // tubelet) + f // tubelet) * frame_tokens + i * grid_w + j
    inside = (f % tubelet) * (p * run_len) + r * run_len  # this row's run within its patch
    patch_offset = (token * (tubelet * p * run_len) + inside)[:, None] + n[None, :]
    # 64-bit products: a stride times a channel or a column passes 2^31 in large or permuted
    # inputs (the row terms are 64-bit through `row`)
    img_offset = ((b * s_b + f * s_t + y * s_h) + (ch.to(tl.int64) * s_c)[None, :]
                  + ((j * p)[:, None] + c[None, :]).to(tl.int64) * s_w)
    if TO_PATCHES:
        tl.store(patches_ptr + patch_offset, tl.load(img_ptr + img_offset, mask=valid), mask=valid)
    else:
        tl.store(img_ptr + img_offset, tl.load(patches_ptr + patch_offset, mask=valid), mask=valid)


def _launch(video, patches, tubelet: int, patch_size: int, to_patches: bool):
    B, C, T, H, W = video.shape
    if video.numel() == 0:
        return
    grid_w = W // patch_size
    run = triton.next_power_of_2(patch_size * C)
    block_j = min(triton.next_power_of_2(grid_w), max(1, TILE_ELEMENTS // run))
    grid = (B * T * H, triton.cdiv(grid_w, block_j))
    with torch.cuda.device_of(video):
        wrap_triton(_patch_rows_kernel)[grid](
            video, patches, T, H, C, patch_size, tubelet, grid_w, *video.stride(),
            TO_PATCHES=to_patches, BLOCK_J=block_j, RUN=run,
        )


def _patchify_torch(video: torch.Tensor, tubelet: int, patch_size: int) -> torch.Tensor:
    # an op never returns a view of its input
    return reference.patchify3d(video, (tubelet, patch_size, patch_size)).clone(
        memory_format=torch.contiguous_format)


def _patchify_triton(video: torch.Tensor, tubelet: int, patch_size: int) -> torch.Tensor:
    B, C, T, H, W = video.shape
    p = patch_size
    out = video.new_empty(B, (T // tubelet) * (H // p) * (W // p), tubelet * p * p * C)
    _launch(video, out, tubelet, p, to_patches=True)
    return out


patchify_op = device_op("patchify", _patchify_triton, _patchify_torch)


def _unpatchify_torch(x: torch.Tensor, tubelet: int, patch_size: int, frames: int, h: int,
                      w: int, channels: int) -> torch.Tensor:
    return reference.unpatchify3d(x, (tubelet, patch_size, patch_size), (frames, h, w),
                                  channels).clone(memory_format=torch.contiguous_format)


def _unpatchify_triton(x: torch.Tensor, tubelet: int, patch_size: int, frames: int, h: int,
                       w: int, channels: int) -> torch.Tensor:
    p = patch_size
    video = x.new_empty(x.shape[0], channels, frames * tubelet, h * p, w * p)
    _launch(video, x.contiguous(), tubelet, p, to_patches=False)
    return video


unpatchify_op = device_op("unpatchify", _unpatchify_triton, _unpatchify_torch)


def _patchify_setup(ctx, inputs, output):
    video, tubelet, patch_size = inputs
    ctx.geometry = (tubelet, patch_size, video.shape[2] // tubelet, video.shape[3] // patch_size,
                    video.shape[4] // patch_size, video.shape[1])


def _patchify_backward(ctx, grad):
    return unpatchify_op(grad, *ctx.geometry), None, None


def _unpatchify_setup(ctx, inputs, output):
    ctx.tubelet, ctx.patch_size = inputs[1], inputs[2]


def _unpatchify_backward(ctx, grad):
    return patchify_op(grad, ctx.tubelet, ctx.patch_size), None, None, None, None, None, None


patchify_op.register_autograd(_patchify_backward, setup_context=_patchify_setup)
unpatchify_op.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), the official `einsum('nchpwq->nhwpqc')` layout."""
    _checks.tensor("imgs", imgs, 4, floating=True)
    _checks.patch_grid("imgs", imgs, patch_size)
    if USE_REFERENCE:
        return reference.patchify(imgs, patch_size)
    return patchify_op(imgs.unsqueeze(2), 1, patch_size)


def patchify3d(videos: torch.Tensor, tubelet_size) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, (T/t)*(H/p)*(W/p), t*p*p*C) for tubelet_size (t, p, p): tokens
    frame-major, each tubelet (frame, row, col, channel) with the channel fastest."""
    _checks.tensor("videos", videos, 5, floating=True)
    t, p = _checks.tubelet("videos", videos, tubelet_size)
    if USE_REFERENCE:
        return reference.patchify3d(videos, (t, p, p))
    return patchify_op(videos, t, p)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None,
               channels: int = 3) -> torch.Tensor:
    """The exact inverse of `patchify`; a square grid when `grid` is None."""
    _checks.tensor("x", x, 3, floating=True)
    _checks.integer("patch_size", patch_size, 1)
    _checks.integer("channels", channels, 1)
    L = x.shape[1]
    if grid is None:
        side = round(L**0.5)
        if side * side != L:
            raise ValueError(f"x has {L} patches, not a square grid: pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    _checks.integer("grid[0]", h, 1)
    _checks.integer("grid[1]", w, 1)
    _check_patches(x, (1, h, w), 1, patch_size, channels)
    if USE_REFERENCE:
        return reference.unpatchify(x, patch_size, (h, w), channels)
    return unpatchify_op(x, 1, patch_size, 1, h, w, channels).squeeze(2)


def unpatchify3d(x: torch.Tensor, tubelet_size, grid: tuple[int, int, int],
                 channels: int = 3) -> torch.Tensor:
    """The exact inverse of `patchify3d`: grid = (T/t, H/p, W/p) tubelets."""
    _checks.tensor("x", x, 3, floating=True)
    _checks.integer("channels", channels, 1)
    t, p = _checks.tubelet_size(tubelet_size)
    if not isinstance(grid, (tuple, list)) or len(grid) != 3:
        raise TypeError(f"grid must be (frames, rows, columns) of tubelets, got {grid!r}")
    _check_patches(x, grid, t, p, channels)
    if USE_REFERENCE:
        return reference.unpatchify3d(x, (t, p, p), tuple(grid), channels)
    return unpatchify_op(x, t, p, *grid, channels)


def _check_patches(x: torch.Tensor, grid, tubelet: int, patch_size: int, channels: int) -> None:
    """x (B, L, E) holds the tubelets of `grid` (frames, rows, columns)."""
    for k, side in enumerate(grid):
        _checks.integer(f"grid[{k}]", side, 1)
    frames, h, w = grid
    if frames * h * w != x.shape[1]:
        grid_text = (h, w) if frames == 1 and tubelet == 1 else tuple(grid)  # unpatchify's
        raise ValueError(f"grid {grid_text} holds {frames * h * w} patches but x has "
                         f"{x.shape[1]}")
    if x.shape[2] != tubelet * patch_size * patch_size * channels:
        what = "patch_size**2 * channels" if tubelet == 1 else "t * p * p * channels"
        raise ValueError(f"x has {x.shape[2]} values per patch, expected {what} = "
                         f"{tubelet * patch_size * patch_size * channels}")
