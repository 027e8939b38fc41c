"""unshuffle: the MAE decoder input, with the decoder positional embedding added in the same pass.

out[:, :P] = x[:, :P]; out[:, P + i] = x[:, P + ids_restore[:, i]] where ids_restore < len_keep,
else mask_token; then out += pos_embed. The output dtype is the promotion of the inputs' dtypes,
as the reference's cat + add gives; sums are taken in float32, or float64 for float64 inputs.

Triton (CUDA): forward, every output row reads its source (a prefix token, a kept token or the
mask token) and the positional embedding, and is written once; backward, every gradient row is
read once and sent to its kept token, while the mask-token and positional-embedding gradients
are summed in registers over a chunk of the batch and written as small per-chunk partials.
CPU: the extension's gather, and PyTorch sums.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton
from .tokens import gather_op

BLOCK_T = 16
BLOCK_D = 128
BATCH_CHUNK = 32  # batches each backward program sums over


@triton.jit
def _sources(ids_restore_ptr, b, t, valid_t, L, K, P):
    """For output rows t: whether each comes from x (prefix or kept) and from which x row.
    An ids_restore entry outside [0, L) reads nothing (and asserts in debug builds)."""
    is_prefix = t < P
    r = tl.load(ids_restore_ptr + b * L + (t - P), mask=valid_t & ~is_prefix, other=0)
    tl.device_assert((r >= 0) & (r < L), "ids_restore holds a position outside [0, L)")
    from_x = is_prefix | ((r >= 0) & (r < K))
    return from_x, tl.where(is_prefix, t, P + r)


@triton.jit
def _unshuffle_kernel(x_ptr, mask_token_ptr, ids_restore_ptr, pos_ptr, out_ptr,
                      L, K, P, D, stride_xb, stride_xl,
                      HAS_POS: tl.constexpr, F64: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    T = P + L
    valid_t = t < T
    valid_d = cols < D
    tile = valid_t[:, None] & valid_d[None, :]
    from_x, src = _sources(ids_restore_ptr, b, t, valid_t, L, K, P)
    kept = tl.load(x_ptr + b * stride_xb + src[:, None] * stride_xl + cols[None, :],
                   mask=tile & from_x[:, None])
    mask_token = tl.load(mask_token_ptr + cols, mask=valid_d)
    if F64:
        kept, mask_token = kept.to(tl.float64), mask_token.to(tl.float64)
    else:
        kept, mask_token = kept.to(tl.float32), mask_token.to(tl.float32)
    values = tl.where(from_x[:, None], kept, mask_token[None, :])
    if HAS_POS:
        values += tl.load(pos_ptr + t[:, None] * D + cols[None, :], mask=tile).to(values.dtype)
    tl.store(out_ptr + (b * T + t)[:, None] * D + cols[None, :],
             values.to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _unshuffle_backward_kernel(grad_ptr, ids_restore_ptr, grad_x_ptr, mask_partial_ptr,
                               pos_partial_ptr, B, L, K, P, D, batch_chunk,
                               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    chunk = tl.program_id(0)
    t_block = tl.program_id(1)
    t = t_block * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    T = P + L
    valid_t = t < T
    tile = valid_t[:, None] & (cols < D)[None, :]
    acc_type = pos_partial_ptr.dtype.element_ty  # float32, or float64 for float64 gradients
    pos_sum = tl.zeros((BLOCK_T, BLOCK_D), dtype=acc_type)
    mask_sum = tl.zeros((BLOCK_D,), dtype=acc_type)
    b = chunk.to(tl.int64) * batch_chunk  # 64-bit loop counter: offsets pass 2^31
    b_end = tl.minimum(b + batch_chunk, B)
    # NOTE: a while loop, not range(b, b_end): triton 3.6's interpreter converts runtime range
    # bounds with int() on 1-element arrays, which NumPy >= 2.3 refuses.
    while b < b_end:
        # other=0: the lanes outside the tile are summed into pos_sum below (never stored, but
        # a masked load without `other` leaves them undefined on the GPU)
        g = tl.load(grad_ptr + (b * T + t)[:, None] * D + cols[None, :], mask=tile, other=0.0)
        from_x, dst = _sources(ids_restore_ptr, b, t, valid_t, L, K, P)
        tl.store(grad_x_ptr + (b * (P + K) + dst)[:, None] * D + cols[None, :],
                 g.to(grad_x_ptr.dtype.element_ty), mask=tile & from_x[:, None])
        g = g.to(acc_type)
        mask_sum += tl.sum(tl.where(tile & ~from_x[:, None], g, 0.0), axis=0)
        pos_sum += g
        b += 1
    row = chunk * tl.num_programs(1) + t_block
    tl.store(mask_partial_ptr + row * D + cols, mask_sum, mask=cols < D)
    tl.store(pos_partial_ptr + (chunk * T + t)[:, None] * D + cols[None, :], pos_sum, mask=tile)


def result_dtype(x, mask_token, pos_embed) -> torch.dtype:
    """The dtype of the reference's cat + gather + add: the promotion of the inputs'."""
    dtype = torch.promote_types(x.dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.float32, dtype)


def _grid_tiles(T: int, D: int):
    block_d = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
    return triton.cdiv(T, BLOCK_T), triton.cdiv(D, block_d), block_d


def _unshuffle_torch(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                     num_prefix_tokens: int, pos_embed: torch.Tensor | None) -> torch.Tensor:
    P = num_prefix_tokens
    B, K = x.shape[0], x.shape[1] - P
    dtype = result_dtype(x, mask_token, pos_embed)
    # Every removed position reads the one mask-token row appended after the kept tokens.
    sources = torch.cat([x[:, P:].to(dtype), mask_token.to(dtype).expand(B, 1, -1)], dim=1)
    body = gather_op(sources, ids_restore.clamp(max=K))
    out = torch.cat([x[:, :P].to(dtype), body], dim=1)
    if pos_embed is not None:
        out += pos_embed
    return out


def _unshuffle_triton(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                      num_prefix_tokens: int, pos_embed: torch.Tensor | None) -> torch.Tensor:
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
    with torch.cuda.device_of(x):
        wrap_triton(_unshuffle_kernel)[(B, tiles_t, tiles_d)](
            x, mask_token, ids_restore, pos_embed if pos_embed is not None else x, out,
            L, K, P, D, x.stride(0), x.stride(1), HAS_POS=pos_embed is not None,
            F64=dtype == torch.float64, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
        )
    return out


unshuffle_op = device_op("unshuffle", _unshuffle_triton, _unshuffle_torch)


def _unshuffle_backward_torch(grad: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                              num_prefix_tokens: int, x_dtype: torch.dtype
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    P, K = num_prefix_tokens, len_keep
    B, L = ids_restore.shape
    acc = accumulation_dtype(grad.dtype)
    body = grad[:, P:]
    # ids_keep[b, j]: the position of kept token j. Removed positions land in slot K; a slot
    # that no position fills (ids_restore not a permutation) stays -1, which gather rejects.
    slots = torch.where(ids_restore < K, ids_restore, K)
    positions = torch.arange(L, device=grad.device).expand(B, L)
    ids_keep = torch.full((B, K + 1), -1, dtype=torch.int64, device=grad.device)
    ids_keep = ids_keep.scatter(1, slots, positions)[:, :K].contiguous()
    grad_x = torch.cat([grad[:, :P], gather_op(body.contiguous(), ids_keep)], dim=1).to(x_dtype)
    removed = (ids_restore >= K).unsqueeze(-1)
    grad_mask_token = torch.where(removed, body, 0).sum(dim=(0, 1), dtype=acc)
    return grad_x, grad_mask_token, grad.sum(dim=0, dtype=acc)


def _unshuffle_backward_triton(grad: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                               num_prefix_tokens: int, x_dtype: torch.dtype
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x in x_dtype, grad_mask_token (D,), grad_pos_embed (P+L, D)), sums in float32
    (float64 for float64 gradients)."""
    P, K = num_prefix_tokens, len_keep
    B, T, D = grad.shape
    L = T - P
    grad = grad.contiguous()
    ids_restore = ids_restore.contiguous()
    grad_x = torch.empty(B, P + K, D, dtype=x_dtype, device=grad.device)
    batch_chunk = min(BATCH_CHUNK, max(B, 1))
    chunks = triton.cdiv(B, batch_chunk)
    tiles_t, tiles_d, block_d = _grid_tiles(T, D)
    acc = dict(dtype=accumulation_dtype(grad.dtype), device=grad.device)
    mask_partial = torch.zeros(chunks * tiles_t, D, **acc)
    pos_partial = torch.zeros(chunks, T, D, **acc)
    if grad.numel():
        with torch.cuda.device_of(grad):
            wrap_triton(_unshuffle_backward_kernel)[(chunks, tiles_t, tiles_d)](
                grad, ids_restore, grad_x, mask_partial, pos_partial, B, L, K, P, D,
                batch_chunk, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
            )
    return grad_x, mask_partial.sum(0), pos_partial.sum(0)


unshuffle_backward_op = device_op("unshuffle_backward", _unshuffle_backward_triton,
                                  _unshuffle_backward_torch)


def _setup(ctx, inputs, output):
    x, mask_token, ids_restore, num_prefix_tokens, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.len_keep = x.shape[1] - num_prefix_tokens
    ctx.num_prefix_tokens = num_prefix_tokens
    ctx.x_dtype = x.dtype
    ctx.mask_token_dtype = mask_token.dtype
    ctx.pos_embed_dtype = None if pos_embed is None else pos_embed.dtype


def _backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    grad_x, grad_mask_token, grad_pos = unshuffle_backward_op(
        grad.contiguous(), ids_restore, ctx.len_keep, ctx.num_prefix_tokens, ctx.x_dtype
    )
    return (
        grad_x,
        grad_mask_token.to(ctx.mask_token_dtype).view(1, 1, -1),
        None,
        None,
        None if ctx.pos_embed_dtype is None else grad_pos.to(ctx.pos_embed_dtype).unsqueeze(0),
    )


unshuffle_op.register_autograd(_backward, setup_context=_setup)


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
              num_prefix_tokens: int = 1, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's input sequence, (B, P+L, D), from the encoder's (B, P+len_keep, D).

    Drop-in for the official `cat + gather + cat` (then `+ decoder_pos_embed` when `pos_embed`
    is given).
    """
    _checks.tensor("x", x, 3, floating=True)
    _checks.tensor("mask_token", mask_token, 3, floating=True)
    _checks.tensor("ids_restore", ids_restore, 2, dtype=torch.int64)
    P = _checks.integer("num_prefix_tokens", num_prefix_tokens, 0)
    if pos_embed is not None:
        _checks.tensor("pos_embed", pos_embed, 3, floating=True)
    _checks.same_device(x=x, mask_token=mask_token, ids_restore=ids_restore, pos_embed=pos_embed)
    B, T, D = x.shape
    L = ids_restore.shape[1]
    if ids_restore.shape[0] != B:
        raise ValueError(f"ids_restore has batch size {ids_restore.shape[0]} but x has {B}")
    if tuple(mask_token.shape) != (1, 1, D):
        raise ValueError(f"mask_token must have shape (1, 1, {D}), got {tuple(mask_token.shape)}")
    if not P < T <= P + L:
        raise ValueError(
            f"x must hold num_prefix_tokens ({P}) then between 1 and {L} kept tokens, "
            f"got {T} tokens"
        )
    if pos_embed is not None and tuple(pos_embed.shape) != (1, P + L, D):
        raise ValueError(
            f"pos_embed must have shape (1, {P + L}, {D}), got {tuple(pos_embed.shape)}"
        )
    _checks.permutation("ids_restore", ids_restore)
    if USE_REFERENCE:
        return reference.unshuffle(x, mask_token, ids_restore, P, pos_embed)
    return unshuffle_op(x, mask_token, ids_restore, P, pos_embed)
