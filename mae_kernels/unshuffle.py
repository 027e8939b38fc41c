"""unshuffle: the MAE decoder input, with the decoder positional embedding added in the same pass.

out[:, :P] = x[:, :P]; out[:, P + i] = x[:, P + ids_restore[:, i]] where ids_restore < len_keep,
else mask_token; then out += pos_embed. The output dtype is the promotion of the inputs' dtypes,
as the reference's cat + add gives.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from .backend import REFERENCE, TRITON, resolve
from .masking import inverse_permutation
from .tokens import gather_rows


def result_dtype(x, mask_token, pos_embed) -> torch.dtype:
    """The dtype of the reference's cat + gather + add: the promotion of the inputs'."""
    dtype = torch.promote_types(x.dtype, mask_token.dtype)
    return dtype if pos_embed is None else torch.promote_types(dtype, pos_embed.dtype)


@torch.library.custom_op("mae_kernels::unshuffle", mutates_args=())
def _unshuffle_op(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                  num_prefix_tokens: int, pos_embed: torch.Tensor | None) -> torch.Tensor:
    if resolve(x.device) == TRITON:
        from .kernels.unshuffle import unshuffle_triton

        return unshuffle_triton(x, mask_token, ids_restore, num_prefix_tokens, pos_embed)
    P = num_prefix_tokens
    B, K = x.shape[0], x.shape[1] - P
    dtype = result_dtype(x, mask_token, pos_embed)
    # Every removed position reads the one mask-token row appended after the kept tokens.
    sources = torch.cat([x[:, P:].to(dtype), mask_token.to(dtype).expand(B, 1, -1)], dim=1)
    body = gather_rows(sources, ids_restore.clamp(max=K))
    out = torch.cat([x[:, :P].to(dtype), body], dim=1)
    if pos_embed is not None:
        out += pos_embed
    return out


@_unshuffle_op.register_fake
def _(x, mask_token, ids_restore, num_prefix_tokens, pos_embed):
    B, L = ids_restore.shape
    dtype = result_dtype(x, mask_token, pos_embed)
    return x.new_empty(B, num_prefix_tokens + L, x.shape[2], dtype=dtype)


@torch.library.custom_op("mae_kernels::unshuffle_backward", mutates_args=())
def _unshuffle_backward_op(grad: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                           num_prefix_tokens: int, x_dtype: torch.dtype, need_mask_token: bool,
                           need_pos_embed: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    """(grad_x in x_dtype, grad_mask_token (D,) float32, grad_pos_embed (P+L, D) float32).

    A gradient that is not needed comes back as an empty tensor.
    """
    if resolve(grad.device) == TRITON:
        from .kernels.unshuffle import unshuffle_backward_triton

        return unshuffle_backward_triton(grad, ids_restore, len_keep, num_prefix_tokens, x_dtype,
                                         need_mask_token, need_pos_embed)
    P, K = num_prefix_tokens, len_keep
    body = grad[:, P:]
    ids_keep = inverse_permutation(ids_restore)[:, :K].contiguous()
    grad_x = torch.cat([grad[:, :P], gather_rows(body, ids_keep)], dim=1).to(x_dtype)
    grad_mask_token = grad.new_empty(0, dtype=torch.float32)
    if need_mask_token:
        removed = (ids_restore >= K).unsqueeze(-1)
        grad_mask_token = torch.where(removed, body, 0).sum(dim=(0, 1), dtype=torch.float32)
    grad_pos = grad.new_empty(0, dtype=torch.float32)
    if need_pos_embed:
        grad_pos = grad.sum(dim=0, dtype=torch.float32)
    return grad_x, grad_mask_token, grad_pos


@_unshuffle_backward_op.register_fake
def _(grad, ids_restore, len_keep, num_prefix_tokens, x_dtype, need_mask_token, need_pos_embed):
    B, T, D = grad.shape
    return (
        grad.new_empty(B, num_prefix_tokens + len_keep, D, dtype=x_dtype),
        grad.new_empty(D if need_mask_token else 0, dtype=torch.float32),
        grad.new_empty((T, D) if need_pos_embed else (0,), dtype=torch.float32),
    )


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
    need_x, need_mask_token, _, _, need_pos = ctx.needs_input_grad
    grad_x, grad_mask_token, grad_pos = _unshuffle_backward_op(
        grad.contiguous(), ids_restore, ctx.len_keep, ctx.num_prefix_tokens, ctx.x_dtype,
        need_mask_token, bool(need_pos),
    )
    return (
        grad_x if need_x else None,
        grad_mask_token.to(ctx.mask_token_dtype).view(1, 1, -1) if need_mask_token else None,
        None,
        None,
        grad_pos.to(ctx.pos_embed_dtype).unsqueeze(0) if need_pos else None,
    )


_unshuffle_op.register_autograd(_backward, setup_context=_setup)


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
    _checks.index_range("ids_restore", ids_restore, L)
    if resolve(x.device) == REFERENCE:
        return reference.unshuffle(x, mask_token, ids_restore, P, pos_embed)
    return _unshuffle_op(x, mask_token, ids_restore, P, pos_embed)
