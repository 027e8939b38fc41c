"""random_masking: per-sample random masking by a stable argsort of noise (the official method).

The op also returns `ids_keep` (the kept positions, in keep order); its backward scatters the
gradient back through it with the extension's `scatter_tokens`, without a second sort.

Triton (CUDA): one kernel sorts each noise row, writes ids_restore / mask / ids_keep and gathers
the kept tokens straight from x. Each program sorts one row and gathers one slice of D (up to
COLUMNS_PER_PROGRAM columns, in tiles of BLOCK_D), so the grid fills the GPU while each sort is
amortised over a few hundred columns. Keys pack the order-preserving bits of the float32 noise
above the token index, so one unsigned sort is stable and orders negatives, zeros and NaN (last)
as torch.argsort does. Rows longer than MAX_FUSED_L, or noise whose order float32 cannot hold
(float64, integers), sort with torch.sort and gather with the extension.
CPU: torch.sort, then the extension's gather.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton
from .tokens import gather_op, scatter_op

MAX_FUSED_L = 4096
TILE_ELEMENTS = 8192  # (padded L) x BLOCK_D values gathered per tile
COLUMNS_PER_PROGRAM = 256


@triton.jit
def _sortable_bits(noise):
    """float32 -> uint32 whose unsigned order is the float order: -0.0 ties with 0.0, and every
    NaN maps to the top, as in torch.sort."""
    bits = tl.where(noise == 0.0, 0.0, noise).to(tl.uint32, bitcast=True)
    # NOTE: `bits ^ 0xFFFFFFFF`, not `~bits`: the interpreters of triton 3.6-3.8 build `~` on
    # uint32 from the constant -1, which NumPy 2 rejects (OverflowError); compiled code is the same.
    flipped = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
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


def _from_order(x, ids_shuffle, len_keep: int, mask_dtype: torch.dtype):
    """Everything the op returns, given the sorted order of the noise."""
    positions = torch.arange(ids_shuffle.shape[1], device=x.device).expand_as(ids_shuffle)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
    ids_keep = ids_shuffle[:, :len_keep].contiguous()
    mask = (ids_restore >= len_keep).to(mask_dtype)
    return gather_op(x, ids_keep), mask, ids_restore, ids_keep


def _random_masking_cpu(x: torch.Tensor, noise: torch.Tensor, len_keep: int,
                        mask_dtype: torch.dtype):
    return _from_order(x, torch.sort(noise, dim=1, stable=True).indices, len_keep, mask_dtype)


def _random_masking_triton(x: torch.Tensor, noise: torch.Tensor, len_keep: int,
                           mask_dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, D = x.shape
    if L > MAX_FUSED_L or noise.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return _random_masking_cpu(x, noise, len_keep, mask_dtype)
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
    with torch.cuda.device_of(x):
        wrap_triton(_random_masking_kernel)[grid](
            x, noise, out, mask, ids_restore, ids_keep, L, len_keep, D,
            x.stride(0), x.stride(1), noise.stride(0), BLOCK_L=block_l, BLOCK_D=block_d,
            D_TILES=d_tiles,
        )
    return out, mask, ids_restore, ids_keep


random_masking_op = device_op("random_masking", _random_masking_triton, _random_masking_cpu)


def _setup(ctx, inputs, output):
    ctx.length = inputs[0].shape[1]
    ctx.save_for_backward(output[3])


def _backward(ctx, grad_x_masked, _grad_mask, _grad_ids_restore, _grad_ids_keep):
    (ids_keep,) = ctx.saved_tensors
    return scatter_op(grad_x_masked.contiguous(), ids_keep, ctx.length), None, None, None


random_masking_op.register_autograd(_backward, setup_context=_setup)


def keep_count(num_tokens: int, mask_ratio) -> int:
    """The official `len_keep = int(L * (1 - mask_ratio))`, checked to keep at least one token."""
    ratio = _checks.real_number("mask_ratio", mask_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    len_keep = int(num_tokens * (1 - mask_ratio))  # in the caller's number type, as the official
    if len_keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} keeps no token of {num_tokens}: int(L * (1 - mask_ratio)) = 0"
        )
    return len_keep


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Drop-in for the official `MaskedAutoencoderViT.random_masking`.

    x: (B, L, D). Returns (x_masked (B, len_keep, D), mask (B, L) with 1 = removed, ids_restore
    (B, L) int64). Keeps the tokens with the smallest noise, in ascending noise order; ties keep
    the lower index. Without `noise`, draws `torch.rand(B, L, device=x.device)` exactly as the
    reference does, so seeded runs match it bit for bit.
    """
    return random_masking_with_ids(x, mask_ratio, noise)[:3]


def random_masking_with_ids(x: torch.Tensor, mask_ratio: float,
                            noise: torch.Tensor | None = None):
    """`random_masking`, plus ids_keep (B, len_keep): the kept positions, in keep order."""
    _checks.tensor("x", x, 3, floating=True)
    B, L, _ = x.shape
    len_keep = keep_count(L, mask_ratio)
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    else:
        _checks.tensor("noise", noise, 2)
        _checks.same_device(x=x, noise=noise)
        if tuple(noise.shape) != (B, L):
            raise ValueError(f"noise must have shape {(B, L)}, got {tuple(noise.shape)}")
        if noise.dtype.is_complex or noise.dtype == torch.bool:
            raise TypeError(f"noise must be a real tensor, got {noise.dtype}")
    if USE_REFERENCE:
        ids_keep = torch.argsort(noise, dim=1, stable=True)[:, :len_keep]
        return (*reference.random_masking(x, mask_ratio, noise), ids_keep)
    return random_masking_op(x, noise, len_keep, torch.get_default_dtype())
