"""random_masking in Triton: sort each noise row, write ids_restore / mask / ids_keep, and gather
the kept tokens straight from x, in one kernel.

Each program sorts one row and gathers one slice of D (up to COLUMNS_PER_PROGRAM columns, in
tiles of BLOCK_D), so the grid has enough programs to fill the GPU while each sort is amortised
over a few hundred columns. Keys pack the order-preserving bits of the float32 noise above
the token index, so one unsigned sort is stable and orders negatives, zeros and NaN (last) as
torch.argsort does. Rows longer than MAX_FUSED_L, or float64 noise (whose order float32 bits can
not hold), sort with torch.sort and then gather with the row kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masking import masking_from_order

MAX_FUSED_L = 4096
TILE_ELEMENTS = 8192  # (padded L) x BLOCK_D values gathered per tile
COLUMNS_PER_PROGRAM = 256


@triton.jit
def _sortable_bits(noise):
    """float32 -> uint32 whose unsigned order is the float order: -0.0 ties with 0.0, and every
    NaN maps to the top, as in torch.sort."""
    bits = tl.where(noise == 0.0, 0.0, noise).to(tl.uint32, bitcast=True)
    flipped = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    return tl.where(noise != noise, 0xFFFFFFFF, flipped)


@triton.jit
def _random_masking_kernel(x_ptr, noise_ptr, out_ptr, mask_ptr, ids_restore_ptr, ids_keep_ptr,
                           L, K, D, stride_xb, stride_xl, stride_nb,
                           BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, D_TILES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d_block = tl.program_id(1)
    pos = tl.arange(0, BLOCK_L)
    in_row = pos < L
    noise = tl.load(noise_ptr + b * stride_nb + pos, mask=in_row, other=0.0).to(tl.float32)
    bits = tl.where(in_row, _sortable_bits(noise), 0xFFFFFFFF).to(tl.uint64)
    keys = tl.sort((bits << 32) | pos.to(tl.uint64))
    ids_shuffle = (keys & 0xFFFFFFFF).to(tl.int64)  # ids_shuffle[j]: the token of rank j
    keep = pos < K

    if d_block == 0:
        row = b * L
        tl.store(ids_restore_ptr + row + ids_shuffle, pos.to(tl.int64), mask=in_row)
        tl.store(mask_ptr + row + ids_shuffle, (pos >= K).to(mask_ptr.dtype.element_ty),
                 mask=in_row)
        tl.store(ids_keep_ptr + b * K + pos, ids_shuffle, mask=keep)

    src_rows = x_ptr + b * stride_xb + ids_shuffle[:, None] * stride_xl
    dst_rows = out_ptr + (b * K + pos).to(tl.int64)[:, None] * D
    for tile_index in range(D_TILES):
        cols = (d_block * D_TILES + tile_index) * BLOCK_D + tl.arange(0, BLOCK_D)
        tile = keep[:, None] & (cols < D)[None, :]
        values = tl.load(src_rows + cols[None, :], mask=tile)
        tl.store(dst_rows + cols[None, :], values, mask=tile)


def random_masking_triton(x: torch.Tensor, noise: torch.Tensor, len_keep: int,
                          mask_dtype: torch.dtype):
    B, L, D = x.shape
    if L > MAX_FUSED_L or noise.dtype == torch.float64 or not noise.is_floating_point():
        ids_shuffle = torch.sort(noise, dim=1, stable=True).indices
        return masking_from_order(x, ids_shuffle, len_keep, mask_dtype)
    if x.stride(2) != 1:
        x = x.contiguous()
    if noise.stride(1) != 1:
        noise = noise.contiguous()
    out = x.new_empty(B, len_keep, D)
    mask = torch.empty(B, L, dtype=mask_dtype, device=x.device)
    ids_restore = torch.empty(B, L, dtype=torch.int64, device=x.device)
    ids_keep = torch.empty(B, len_keep, dtype=torch.int64, device=x.device)
    if B == 0:
        return out, mask, ids_restore, ids_keep
    block_l = triton.next_power_of_2(L)
    block_d = max(1, min(triton.next_power_of_2(max(D, 1)), TILE_ELEMENTS // block_l))
    d_tiles = max(1, min(COLUMNS_PER_PROGRAM // block_d, triton.cdiv(D, block_d)))
    grid = (B, max(1, triton.cdiv(D, block_d * d_tiles)))
    _random_masking_kernel[grid](
        x, noise, out, mask, ids_restore, ids_keep, L, len_keep, D,
        x.stride(0), x.stride(1), noise.stride(0), BLOCK_L=block_l, BLOCK_D=block_d,
        D_TILES=d_tiles,
    )
    return out, mask, ids_restore, ids_keep
