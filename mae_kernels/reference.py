"""Plain-PyTorch reference of every op, following facebookresearch/mae `models_mae.py`.

Tests compare every backend against these functions, and `MaskedAutoencoderViT(use_kernels=False)`
runs on them. Where the official code leaves a choice open, DESIGN.md fixes it: a stable sort
(ties keep the lower index) and float32 accumulation in the loss.
"""
from __future__ import annotations

import torch

__all__ = [
    "patchify",
    "unpatchify",
    "random_masking",
    "unshuffle",
    "mae_loss",
    "norm_pix_stats",
    "gather_tokens",
    "scatter_tokens",
]


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, (row, col, channel) inside a patch."""
    p = patch_size
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None,
               channels: int = 3) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, h*p, w*p); a square grid when `grid` is None."""
    p = patch_size
    B, L, _ = x.shape
    h, w = grid if grid is not None else (int(L**0.5),) * 2
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by argsort of uniform noise; keeps the smallest-noise tokens."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def unshuffle(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
              num_prefix_tokens: int = 1, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder input: prefix tokens, then kept tokens and mask tokens in the original order."""
    P = num_prefix_tokens
    B, L = ids_restore.shape
    D = x.shape[-1]
    mask_tokens = mask_token.repeat(B, L + P - x.shape[1], 1)
    x_ = torch.cat([x[:, P:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, D))
    x = torch.cat([x[:, :P, :], x_], dim=1)
    if pos_embed is not None:
        x = x + pos_embed
    return x


NORM_PIX_EPS = 1.0e-6


def norm_pix_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of each patch (last dim) as the official norm-pix loss normalises it:
    the unbiased variance, eps inside the root. `(target - mean) / std` is the loss target."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return mean, (var + NORM_PIX_EPS) ** 0.5


def loss_dtype(imgs: torch.Tensor, pred: torch.Tensor) -> torch.dtype:
    """The loss accumulates in float32, or float64 when an input is float64 (for gradcheck)."""
    return torch.promote_types(torch.float32, torch.promote_types(imgs.dtype, pred.dtype))


def loss_targets(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    """What `pred` is compared with: the patches, normalised per patch with `norm_pix_loss`."""
    target = patchify(imgs, patch_size).to(dtype)
    if norm_pix_loss:
        mean, std = norm_pix_stats(target)
        target = (target - mean) / std
    return target


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = True) -> torch.Tensor:
    """Mean squared error on removed patches, in float32 (float64 for float64 inputs);
    norm-pix uses the unbiased variance."""
    dtype = loss_dtype(imgs, pred)
    target = loss_targets(imgs, patch_size, norm_pix_loss, dtype)
    loss = (pred.to(dtype) - target) ** 2
    loss = loss.mean(dim=-1)
    mask = mask.to(dtype)
    return (loss * mask).sum() / mask.sum()


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, k] = x[b, index[b, k]]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """The adjoint of gather_tokens: out[b, index[b, k]] = src[b, k], zeros elsewhere."""
    B, _, D = src.shape
    out = src.new_zeros(B, length, D)
    return out.scatter(1, index.unsqueeze(-1).expand(-1, -1, D), src)
