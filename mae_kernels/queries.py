"""decoder_queries: the queries of a cross-attention decoder (CrossMAE's `mask_tokens_grid`), the
mask token plus the decoder position embedding of each predicted patch, in one pass.

out[b, n] = pos_embed[0, P + ids_pred[b, n]] + mask_token[0, 0], for ids_pred (B, N) the
predicted positions (in position order, as `masking_with_ids` lists them and CrossMAE's
`masked_select` reads them). The output dtype is the promotion of the two inputs' dtypes, as the
reference's add gives; the sum is taken in float32, or float64 for float64 inputs.

Triton (CUDA): forward, every output row reads its position-embedding row and the mask token and
is written once. Backward: the gradient of a position-embedding row sums the batch rows that
read it; one scatter builds the inverse map (position -> the row of each sample that reads it,
-1 if none), then each program sums a chunk of the batch for a tile of positions in registers
and writes a small per-chunk partial, as unshuffle's backward does (no atomics: deterministic).
The mask token's gradient is the sum of the position rows'. When the position embedding is
fixed (CrossMAE's sin-cos) the backward is the mask token's sum alone.
CPU: index_select, and index_add for the backward.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton
from .unshuffling import accumulation_dtype

BLOCK_T = 16
BLOCK_D = 128
BATCH_CHUNK = 32  # batches each backward program sums over


@triton.jit
def _queries_kernel(pos_ptr, mask_token_ptr, ids_ptr, out_ptr, N, L, P, D,
                    F64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_n = n < N
    valid_d = cols < D
    position = tl.load(ids_ptr + b * N + n, mask=valid_n, other=0)
    tl.device_assert((position >= 0) & (position < L), "ids_pred holds a position outside [0, L)")
    rows = valid_n & (position >= 0) & (position < L)  # out of range reads nothing
    tile = rows[:, None] & valid_d[None, :]
    pos = tl.load(pos_ptr + (P + position)[:, None] * D + cols[None, :], mask=tile, other=0.0)
    mask_token = tl.load(mask_token_ptr + cols, mask=valid_d, other=0.0)
    if F64:
        values = pos.to(tl.float64) + mask_token.to(tl.float64)[None, :]
    else:
        values = pos.to(tl.float32) + mask_token.to(tl.float32)[None, :]
    tl.store(out_ptr + (b * N + n)[:, None] * D + cols[None, :],
             values.to(out_ptr.dtype.element_ty), mask=valid_n[:, None] & valid_d[None, :])


@triton.jit
def _queries_backward_kernel(grad_ptr, rows_ptr, pos_partial_ptr, B, N, L, D, batch_chunk,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """pos_partial[chunk, l] = the sum over the chunk's samples b of grad[b, rows[b, l]]."""
    chunk = tl.program_id(0)
    positions = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_l = positions < L
    tile = valid_l[:, None] & (cols < D)[None, :]
    acc_type = pos_partial_ptr.dtype.element_ty  # float32, or float64 for float64 gradients
    total = tl.zeros((BLOCK_T, BLOCK_D), dtype=acc_type)
    b = chunk.to(tl.int64) * batch_chunk  # 64-bit loop counter: offsets pass 2^31
    b_end = tl.minimum(b + batch_chunk, B)
    # NOTE: a while loop, not range(b, b_end): triton 3.6's interpreter converts runtime range
    # bounds with int() on 1-element arrays, which NumPy >= 2.3 refuses.
    while b < b_end:
        row = tl.load(rows_ptr + b * L + positions, mask=valid_l, other=-1)
        g = tl.load(grad_ptr + (b * N + row)[:, None] * D + cols[None, :],
                    mask=tile & (row >= 0)[:, None], other=0.0)
        total += g.to(acc_type)
        b += 1
    tl.store(pos_partial_ptr + (chunk * L + positions)[:, None] * D + cols[None, :], total,
             mask=tile)


def _result_dtype(mask_token: torch.Tensor, pos_embed: torch.Tensor) -> torch.dtype:
    return torch.promote_types(mask_token.dtype, pos_embed.dtype)


def _tiles(T: int, D: int):
    block_d = min(BLOCK_D, triton.next_power_of_2(max(D, 1)))
    return triton.cdiv(T, BLOCK_T), triton.cdiv(D, block_d), block_d


def _queries_torch(mask_token: torch.Tensor, pos_embed: torch.Tensor, ids_pred: torch.Tensor,
                   num_prefix_tokens: int) -> torch.Tensor:
    dtype = _result_dtype(mask_token, pos_embed)
    acc = accumulation_dtype(dtype)
    rows = pos_embed[0, num_prefix_tokens:].index_select(0, ids_pred.reshape(-1))
    return (rows.to(acc) + mask_token[0].to(acc)).to(dtype).view(*ids_pred.shape, -1)


def _queries_triton(mask_token: torch.Tensor, pos_embed: torch.Tensor, ids_pred: torch.Tensor,
                    num_prefix_tokens: int) -> torch.Tensor:
    B, N = ids_pred.shape
    D = pos_embed.shape[2]
    dtype = _result_dtype(mask_token, pos_embed)
    pos_embed, mask_token = pos_embed.contiguous(), mask_token.contiguous()
    ids_pred = ids_pred.contiguous()
    out = torch.empty(B, N, D, dtype=dtype, device=pos_embed.device)
    if out.numel() == 0:
        return out
    tiles_n, tiles_d, block_d = _tiles(N, D)
    with torch.cuda.device_of(pos_embed):
        wrap_triton(_queries_kernel)[(B, tiles_n, tiles_d)](
            pos_embed, mask_token, ids_pred, out, N, pos_embed.shape[1] - num_prefix_tokens,
            num_prefix_tokens, D, F64=dtype == torch.float64, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
        )
    return out


queries_op = device_op("decoder_queries", _queries_triton, _queries_torch)


def _queries_backward_torch(grad: torch.Tensor, ids_pred: torch.Tensor,
                            length: int) -> torch.Tensor:
    """The position embedding's gradient (length, D), summed in float32 (float64 for float64)."""
    D = grad.shape[2]
    acc = accumulation_dtype(grad.dtype)
    out = torch.zeros(length, D, dtype=acc, device=grad.device)
    return out.index_add_(0, ids_pred.reshape(-1), grad.reshape(-1, D).to(acc))


def _queries_backward_triton(grad: torch.Tensor, ids_pred: torch.Tensor,
                             length: int) -> torch.Tensor:
    B, N, D = grad.shape
    grad, ids_pred = grad.contiguous(), ids_pred.contiguous()
    acc = dict(dtype=accumulation_dtype(grad.dtype), device=grad.device)
    batch_chunk = min(BATCH_CHUNK, max(B, 1))
    chunks = triton.cdiv(B, batch_chunk)
    partial = torch.zeros(chunks, length, D, **acc)
    if grad.numel():
        # rows[b, l]: the row of sample b that reads position l, -1 where none does
        rows = torch.full((B, length), -1, dtype=torch.int64, device=grad.device)
        rows.scatter_(1, ids_pred, torch.arange(N, device=grad.device).expand(B, N))
        tiles_l, tiles_d, block_d = _tiles(length, D)
        with torch.cuda.device_of(grad):
            wrap_triton(_queries_backward_kernel)[(chunks, tiles_l, tiles_d)](
                grad, rows, partial, B, N, length, D, batch_chunk, BLOCK_T=BLOCK_T,
                BLOCK_D=block_d,
            )
    return partial.sum(0)


queries_backward_op = device_op("decoder_queries_backward", _queries_backward_triton,
                                _queries_backward_torch)


def _setup(ctx, inputs, output):
    mask_token, pos_embed, ids_pred, num_prefix_tokens = inputs
    ctx.save_for_backward(ids_pred)
    ctx.num_prefix_tokens = num_prefix_tokens
    ctx.pos_shape = tuple(pos_embed.shape)
    ctx.dtypes = (mask_token.dtype, pos_embed.dtype)


def _backward(ctx, grad):
    (ids_pred,) = ctx.saved_tensors
    mask_dtype, pos_dtype = ctx.dtypes
    acc = accumulation_dtype(grad.dtype)
    if not ctx.needs_input_grad[1]:  # a fixed position embedding: the mask token's sum alone
        grad_mask_token = grad.sum(dim=(0, 1), dtype=acc)
        return grad_mask_token.to(mask_dtype).view(1, 1, -1), None, None, None
    P = ctx.num_prefix_tokens
    body = queries_backward_op(grad.contiguous(), ids_pred, ctx.pos_shape[1] - P)
    grad_pos = torch.cat([body.new_zeros(P, body.shape[1]), body]).to(pos_dtype)[None]
    return body.sum(0).to(mask_dtype).view(1, 1, -1), grad_pos, None, None


queries_op.register_autograd(_backward, setup_context=_setup)


def decoder_queries(mask_token: torch.Tensor, pos_embed: torch.Tensor, ids_pred: torch.Tensor,
                    num_prefix_tokens: int = 1) -> torch.Tensor:
    """The cross-attention decoder's queries (B, N, D): the mask token plus the decoder position
    embedding of each predicted patch.

    mask_token (1, 1, D); pos_embed (1, P+L, D), P prefix (cls) rows first (the model's
    `decoder_pos_embed`); ids_pred (B, N) int64, the predicted positions in [0, L), distinct in
    each row (from `masking_with_ids`). Drop-in for CrossMAE's `mask_tokens_grid`:
    `pos_embed[:, P:].masked_select(mask) + mask_token`. Gradients flow to mask_token and to
    pos_embed (when it requires grad).
    """
    _checks.tensor("mask_token", mask_token, 3, floating=True)
    _checks.tensor("pos_embed", pos_embed, 3, floating=True)
    _checks.tensor("ids_pred", ids_pred, 2, dtype=torch.int64)
    P = _checks.integer("num_prefix_tokens", num_prefix_tokens, 0)
    _checks.same_device(mask_token=mask_token, pos_embed=pos_embed, ids_pred=ids_pred)
    D = pos_embed.shape[2]
    if tuple(mask_token.shape) != (1, 1, D):
        raise ValueError(f"mask_token must have shape (1, 1, {D}), got {tuple(mask_token.shape)}")
    if pos_embed.shape[0] != 1 or pos_embed.shape[1] <= P:
        raise ValueError(f"pos_embed must have shape (1, num_prefix_tokens + L, D) with L >= 1 "
                         f"(num_prefix_tokens {P}), got {tuple(pos_embed.shape)}")
    L = pos_embed.shape[1] - P
    _checks.index_range("ids_pred", ids_pred, L)
    _checks.distinct("ids_pred", ids_pred, L)
    if USE_REFERENCE:
        return reference.decoder_queries(mask_token, pos_embed, ids_pred, P)
    return queries_op(mask_token, pos_embed, ids_pred, P)
