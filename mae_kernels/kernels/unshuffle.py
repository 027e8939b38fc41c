"""unshuffle in Triton: the decoder sequence written in one pass, and its backward in one pass.

Forward: every output row reads its source (a prefix token, a kept token or the mask token) and
the positional embedding, and is written once. Backward: every gradient row is read once and
sent to its kept token; the mask-token and positional-embedding gradients are summed in
registers over a chunk of the batch and written as small per-chunk partials, summed after.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..unshuffle import result_dtype

BLOCK_T = 16
BLOCK_D = 128
BATCH_CHUNK = 32  # batches each backward program sums over when reductions are needed


@triton.jit
def _sources(ids_restore_ptr, b, t, valid_t, L, K, P):
    """For output rows t: whether each comes from x (prefix or kept) and from which x row."""
    is_prefix = t < P
    r = tl.load(ids_restore_ptr + b * L + (t - P), mask=valid_t & ~is_prefix, other=0)
    from_x = is_prefix | (r < K)
    return from_x, tl.where(is_prefix, t, P + r)


@triton.jit
def _unshuffle_kernel(x_ptr, mask_token_ptr, ids_restore_ptr, pos_ptr, out_ptr,
                      L, K, P, D, stride_xb, stride_xl,
                      HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    T = P + L
    valid_t = t < T
    valid_d = cols < D
    tile = valid_t[:, None] & valid_d[None, :]
    from_x, src = _sources(ids_restore_ptr, b, t, valid_t, L, K, P)
    kept = tl.load(x_ptr + b * stride_xb + src[:, None] * stride_xl + cols[None, :],
                   mask=tile & from_x[:, None]).to(tl.float32)
    mask_token = tl.load(mask_token_ptr + cols, mask=valid_d).to(tl.float32)
    values = tl.where(from_x[:, None], kept, mask_token[None, :])
    if HAS_POS:
        values += tl.load(pos_ptr + t[:, None] * D + cols[None, :], mask=tile).to(tl.float32)
    tl.store(out_ptr + (b * T + t)[:, None] * D + cols[None, :],
             values.to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _unshuffle_backward_kernel(grad_ptr, ids_restore_ptr, grad_x_ptr, mask_partial_ptr,
                               pos_partial_ptr, B, L, K, P, D, batch_chunk,
                               NEED_MASK_TOKEN: tl.constexpr, NEED_POS: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    chunk = tl.program_id(0)
    t_block = tl.program_id(1)
    t = t_block * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    T = P + L
    valid_t = t < T
    tile = valid_t[:, None] & (cols < D)[None, :]
    pos_sum = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    mask_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    b_start = chunk.to(tl.int64) * batch_chunk  # 64-bit loop counter: offsets pass 2^31
    b_end = tl.minimum(b_start + batch_chunk, B)
    for b in range(b_start, b_end):
        g = tl.load(grad_ptr + (b * T + t)[:, None] * D + cols[None, :], mask=tile)
        from_x, dst = _sources(ids_restore_ptr, b, t, valid_t, L, K, P)
        tl.store(grad_x_ptr + (b * (P + K) + dst)[:, None] * D + cols[None, :],
                 g.to(grad_x_ptr.dtype.element_ty), mask=tile & from_x[:, None])
        g = g.to(tl.float32)
        if NEED_MASK_TOKEN:
            mask_sum += tl.sum(tl.where(tile & ~from_x[:, None], g, 0.0), axis=0)
        if NEED_POS:
            pos_sum += g
    if NEED_MASK_TOKEN:
        row = chunk * tl.num_programs(1) + t_block
        tl.store(mask_partial_ptr + row * D + cols, mask_sum, mask=cols < D)
    if NEED_POS:
        tl.store(pos_partial_ptr + (chunk * T + t)[:, None] * D + cols[None, :], pos_sum,
                 mask=tile)


def _grid_tiles(T: int, D: int):
    block_d = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
    return triton.cdiv(T, BLOCK_T), triton.cdiv(D, block_d), block_d


def unshuffle_triton(x, mask_token, ids_restore, num_prefix_tokens, pos_embed):
    P = num_prefix_tokens
    B, L = ids_restore.shape
    D = x.shape[2]
    K = x.shape[1] - P
    dtype = result_dtype(x, mask_token, pos_embed)
    if pos_embed is not None:
        pos_embed = pos_embed.contiguous()
    if x.stride(2) != 1:
        x = x.contiguous()
    ids_restore = ids_restore.contiguous()
    mask_token = mask_token.contiguous()
    out = torch.empty(B, P + L, D, dtype=dtype, device=x.device)
    if out.numel() == 0:
        return out
    tiles_t, tiles_d, block_d = _grid_tiles(P + L, D)
    _unshuffle_kernel[(B, tiles_t, tiles_d)](
        x, mask_token, ids_restore, pos_embed if pos_embed is not None else x, out,
        L, K, P, D, x.stride(0), x.stride(1),
        HAS_POS=pos_embed is not None, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
    )
    return out


def unshuffle_backward_triton(grad, ids_restore, len_keep, num_prefix_tokens, x_dtype,
                              need_mask_token, need_pos_embed):
    P, K = num_prefix_tokens, len_keep
    B, T, D = grad.shape
    L = T - P
    grad = grad.contiguous()
    ids_restore = ids_restore.contiguous()
    grad_x = torch.empty(B, P + K, D, dtype=x_dtype, device=grad.device)
    reduce = need_mask_token or need_pos_embed
    batch_chunk = min(BATCH_CHUNK, max(B, 1)) if reduce else 1
    chunks = triton.cdiv(B, batch_chunk)
    tiles_t, tiles_d, block_d = _grid_tiles(T, D)
    f32 = dict(dtype=torch.float32, device=grad.device)
    mask_partial = torch.zeros(chunks * tiles_t if need_mask_token else 0, D, **f32)
    pos_partial = torch.zeros(chunks if need_pos_embed else 0, T, D, **f32)
    if grad.numel():
        _unshuffle_backward_kernel[(chunks, tiles_t, tiles_d)](
            grad, ids_restore, grad_x, mask_partial, pos_partial, B, L, K, P, D, batch_chunk,
            NEED_MASK_TOKEN=need_mask_token, NEED_POS=need_pos_embed,
            BLOCK_T=BLOCK_T, BLOCK_D=block_d,
        )
    grad_mask_token = mask_partial.sum(0) if need_mask_token else torch.empty(0, **f32)
    grad_pos = pos_partial.sum(0) if need_pos_embed else torch.empty(0, **f32)
    return grad_x, grad_mask_token, grad_pos
