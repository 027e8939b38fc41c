"""Plain-PyTorch reference of every op, following facebookresearch/mae `models_mae.py`.

Tests compare every backend against these functions, and `MaskedAutoencoderViT(use_kernels=False)`
runs on them. Where the official code leaves a choice open, DESIGN.md fixes it: a stable sort
(ties keep the lower index) and float32 accumulation in the loss.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "patchify",
    "unpatchify",
    "patchify3d",
    "unpatchify3d",
    "random_masking",
    "tube_masking",
    "block_masking",
    "block_draws",
    "block_cover",
    "grid_masking",
    "pixio_masking",
    "crossmae_masking",
    "unshuffle",
    "decoder_queries",
    "mae_loss",
    "predicted_loss",
    "norm_pix_stats",
    "norm_pix",
    "hog_targets",
    "hog_loss",
    "masked_mse",
    "videomae_targets",
    "videomae_stats",
    "gather_tokens",
    "scatter_tokens",
    "resized_crop",
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


def patchify3d(videos: torch.Tensor, tubelet_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, (T/t)*(H/p)*(W/p), t*p*p*C): tubelets frame-major, then row-major
    over the grid; inside one (frame, row, col, channel), channel fastest (VideoMAE's order)."""
    t, p, _ = tubelet_size
    B, C, T, H, W = videos.shape
    x = videos.reshape(B, C, T // t, t, H // p, p, W // p, p)
    x = torch.einsum("ncTtHpWq->nTHWtpqc", x)
    return x.reshape(B, (T // t) * (H // p) * (W // p), t * p * p * C)


def unpatchify3d(x: torch.Tensor, tubelet_size: tuple[int, int, int],
                 grid: tuple[int, int, int], channels: int = 3) -> torch.Tensor:
    """(B, L, t*p*p*C) -> (B, C, T, H, W): the inverse of patchify3d for a (T/t, H/p, W/p) grid."""
    t, p, _ = tubelet_size
    frames, h, w = grid
    x = x.reshape(x.shape[0], frames, h, w, t, p, p, channels)
    x = torch.einsum("nTHWtpqc->ncTtHpWq", x)
    return x.reshape(x.shape[0], channels, frames * t, h * p, w * p)


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


def pixio_masking(x: torch.Tensor, mask_ratio: float, mask_grid: int,
                  noise: torch.Tensor | None = None, grid: tuple[int, int] | None = None):
    """Pixio's `random_masking` (facebookresearch/pixio pretraining/models_pixio.py, commit
    b83555d): random masking of mask_grid x mask_grid units of patches. The units (row-major
    over the grid of units) are ordered by noise (B, units) and the first
    int(units * (1 - mask_ratio)) kept; x_masked holds each kept unit's patches row-major, unit
    after unit. `grid` (rows, columns) of patches: Pixio's square grid when None."""
    N, L, D = x.shape
    H, W = grid if grid is not None else (int(L**0.5),) * 2
    g = mask_grid
    num_units = (H // g) * (W // g)
    len_keep = int(num_units * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, num_units, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    ids_masked = ids_shuffle[:, len_keep:]
    patch_grid = torch.arange(H * W, device=x.device).view(1, H, W)
    patch_grid = patch_grid.unfold(1, g, g).unfold(2, g, g)
    patch_grid = patch_grid.contiguous().view(1, -1, g, g)
    ids_keep_expanded = patch_grid[:, ids_keep].view(N, -1)
    ids_masked_expanded = patch_grid[:, ids_masked].view(N, -1)
    x_masked = torch.gather(x, dim=1, index=ids_keep_expanded.unsqueeze(-1).repeat(1, 1, D))
    ids_restore = torch.cat((ids_keep_expanded, ids_masked_expanded), dim=1)
    ids_restore = torch.argsort(ids_restore, dim=1)
    mask = torch.ones([N, H * W], device=x.device)
    mask[:, :len_keep * g**2] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def crossmae_masking(x: torch.Tensor, mask_ratio: float, kept_mask_ratio: float,
                     noise: torch.Tensor | None = None):
    """CrossMAE's `random_masking` (TonyLianLong/CrossMAE models_cross.py, commit ed0677a): the
    tokens split three ways by noise order: int(L * (1 - mask_ratio)) kept, the next
    int(L * (mask_ratio - kept_mask_ratio)) masked and not predicted, the rest masked and
    predicted. `mask` is 1 on the predicted tokens only."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    len_masked = int(L * (mask_ratio - kept_mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :(len_keep + len_masked)] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def decoder_queries(mask_token: torch.Tensor, pos_embed: torch.Tensor, ids_pred: torch.Tensor,
                    num_prefix_tokens: int = 1) -> torch.Tensor:
    """The cross-attention decoder's queries (CrossMAE's `mask_tokens_grid`): the decoder
    position embedding (1, P+L, D) of each predicted patch ids_pred (B, N), plus the mask
    token; in position order, CrossMAE's masked_select takes the rows the same way."""
    return gather_tokens(pos_embed[:, num_prefix_tokens:].expand(ids_pred.shape[0], -1, -1),
                         ids_pred) + mask_token


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


def norm_pix(target: torch.Tensor) -> torch.Tensor:
    """MAE's norm-pix target: each patch (last dim) by its own mean and std (norm_pix_stats)."""
    mean, std = norm_pix_stats(target)
    return (target - mean) / std


def videomae_stats(target: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of each channel of each tubelet (last dim, channel fastest) as VideoMAE's
    `normlize_target` normalises it: the unbiased std, eps added to the std (not inside the
    root, as MAE does). Both are laid out as `target`: `(target - mean) / std` is the target."""
    x = target.unflatten(-1, (-1, channels))
    mean = x.mean(dim=-2, keepdim=True).expand_as(x).flatten(-2)
    std = (x.var(dim=-2, keepdim=True).sqrt() + NORM_PIX_EPS).expand_as(x).flatten(-2)
    return mean, std


def videomae_targets(videos: torch.Tensor, tubelet_size: int, patch_size: int, normalize: bool,
                     dtype: torch.dtype, mean=None, std=None) -> torch.Tensor:
    """VideoMAE's labels (`engine_for_pretraining.py`): the video un-normalised with the data's
    per-channel `mean` and `std` (when given: VideoMAE's loader normalises with ImageNet's), cut
    into tubelets as patchify3d does; with `normalize`, each channel of each tubelet normalised
    by videomae_stats. Without it, the un-normalised tubelets."""
    x = videos.to(dtype)
    if mean is not None:
        per_channel = dict(dtype=dtype, device=x.device)
        shape = (1, -1, 1, 1, 1)
        x = (x * torch.as_tensor(std, **per_channel).view(shape)
             + torch.as_tensor(mean, **per_channel).view(shape))
    target = patchify3d(x, (tubelet_size, patch_size, patch_size))
    if normalize:
        tube_mean, tube_std = videomae_stats(target, videos.shape[1])
        target = (target - tube_mean) / tube_std
    return target


def loss_targets(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool,
                 dtype: torch.dtype, tubelet_size: int = 1, mean=None,
                 std=None) -> torch.Tensor:
    """What `pred` is compared with. Images (B, C, H, W): MAE's, the patches, with
    `norm_pix_loss` each normalised by norm_pix. Videos (B, C, T, H, W): VideoMAE's
    (videomae_targets, `norm_pix_loss` its `normlize_target`)."""
    if imgs.dim() == 5:
        return videomae_targets(imgs, tubelet_size, patch_size, norm_pix_loss, dtype, mean, std)
    target = patchify(imgs, patch_size).to(dtype)
    return norm_pix(target) if norm_pix_loss else target


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """The MAE loss's reduction, in `dtype`: the mean over each patch of (pred - target)^2,
    then the mask-weighted mean over the patches."""
    loss = (pred.to(dtype) - target.to(dtype)) ** 2
    loss = loss.mean(dim=-1)
    mask = mask.to(dtype)
    return (loss * mask).sum() / mask.sum()


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = True, tubelet_size: int = 1, mean=None,
             std=None) -> torch.Tensor:
    """Mean squared error on removed patches, in float32 (float64 for float64 inputs), with
    loss_targets: images MAE's `forward_loss`, videos (B, C, T, H, W) VideoMAE's loss over
    tubelets (`mean`, `std`: the data's normalisation, undone first). As the official code,
    a NaN anywhere in `pred` makes the loss NaN."""
    dtype = loss_dtype(imgs, pred)
    target = loss_targets(imgs, patch_size, norm_pix_loss, dtype, tubelet_size, mean, std)
    return masked_mse(pred, target, mask, dtype)


def predicted_loss(imgs: torch.Tensor, pred: torch.Tensor, ids_pred: torch.Tensor,
                   patch_size: int, norm_pix_loss: bool = True,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """The loss over the predicted patches only (CrossMAE's `forward_loss`): pred (B, N, E)
    predicts patches ids_pred (B, N); each target patch normalised as MAE's (norm_pix), the
    mean over each patch of the squared error, then the mean over the N patches of every
    sample (weighted by `weights` (B, N) where given), in float32."""
    dtype = loss_dtype(imgs, pred)
    target = gather_tokens(patchify(imgs, patch_size).to(dtype), ids_pred)
    if norm_pix_loss:
        target = norm_pix(target)
    weights = torch.ones(ids_pred.shape, device=pred.device) if weights is None else weights
    return masked_mse(pred, target, weights, dtype)


HOG_NORM_EPS = 1.0e-12  # F.normalize's floor on the norm


def hog_targets(imgs: torch.Tensor, patch_size: int, bins: int = 9, cell: int = 8) -> torch.Tensor:
    """MaskFeat's HOG target: SlowFast's `HOGLayerC(nbins=bins, pool=cell)` as MaskFeat builds
    it (no Gaussian window), laid out per patch as `_get_hog_label_2d` lays it out. Per channel:
    reflect padding by one pixel, the Sobel filters [[1, 0, -1], [2, 0, -2], [1, 0, -1]] (gx) and
    its transpose (gy), magnitude sqrt(gx^2 + gy^2), bin floor(atan2(gx, gy) / pi * bins) mod
    bins, magnitudes summed per `cell` x `cell` cell, each cell's bins L2-normalised. Returns
    (B, L, C * bins * (p/cell)^2) float32, per patch (channel, bin, cell row, cell col)."""
    B, C, H, W = imgs.shape
    x = torch.nn.functional.pad(imgs.float(), (1, 1, 1, 1), mode="reflect")

    def at(dy: int, dx: int) -> torch.Tensor:  # the neighbour (dy, dx) of every pixel
        return x[..., 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    # the 3x3 filters as differences of neighbours: exactly zero where the padding mirrors
    gx = (at(-1, -1) - at(-1, 1)) + 2 * (at(0, -1) - at(0, 1)) + (at(1, -1) - at(1, 1))
    gy = (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1)) - (at(1, -1) + 2 * at(1, 0) + at(1, 1))
    magnitude = torch.sqrt(gx * gx + gy * gy)
    index = (torch.atan2(gx, gy) / math.pi * bins).floor().long() % bins
    votes = torch.zeros(B, C, H, W, bins, device=x.device)
    votes.scatter_(-1, index.unsqueeze(-1), magnitude.unsqueeze(-1))
    hist = votes.reshape(B, C, H // cell, cell, W // cell, cell, bins).sum(dim=(3, 5))
    hist = hist / hist.norm(dim=-1, keepdim=True).clamp_min(HOG_NORM_EPS)
    k = patch_size // cell
    h, w = H // patch_size, W // patch_size
    hist = hist.reshape(B, C, h, k, w, k, bins).permute(0, 2, 4, 1, 6, 3, 5)
    return hist.reshape(B, h * w, C * bins * k * k)


def hog_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
             patch_size: int) -> torch.Tensor:
    """Mean squared error to the HOG features (hog_targets, default bins and cells) on removed
    patches, in float32."""
    return masked_mse(pred, hog_targets(imgs, patch_size), mask, torch.float32)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, k] = x[b, index[b, k]]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """The adjoint of gather_tokens: out[b, index[b, k]] = src[b, k], zeros elsewhere."""
    B, _, D = src.shape
    out = src.new_zeros(B, length, D)
    return out.scatter(1, index.unsqueeze(-1).expand(-1, -1, D), src)


def _masked_by_order(x: torch.Tensor, ids_shuffle: torch.Tensor, len_keep: int):
    """random_masking's outputs for a given order of the tokens (the first len_keep kept)."""
    N, L, D = x.shape
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    x_masked = torch.gather(x, dim=1, index=ids_shuffle[:, :len_keep, None].repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def tube_masking(x: torch.Tensor, mask_ratio: float, frames: int,
                 noise: torch.Tensor | None = None):
    """VideoMAE's tube masking: x (B, frames * S, D) frame-major; one random spatial mask per
    sample kept in every frame: the smallest-noise S - int(S * mask_ratio) positions, as
    VideoMAE's TubeMaskingGenerator masks int(mask_ratio * S) of each frame. x_masked holds
    frame 0's kept tokens in noise order, then frame 1's, ..."""
    N, L, D = x.shape
    S = L // frames
    len_keep = S - int(S * mask_ratio)
    if noise is None:
        noise = torch.rand(N, S, device=x.device)
    order = torch.argsort(noise, dim=1, stable=True)
    starts = torch.arange(frames, device=x.device)[:, None] * S
    ids_shuffle = torch.cat([(order[:, None, :len_keep] + starts).flatten(1),
                             (order[:, None, len_keep:] + starts).flatten(1)], dim=1)
    return _masked_by_order(x, ids_shuffle, frames * len_keep)


def block_draws(noise: torch.Tensor, aspect_ratio: tuple[float, float]):
    """block_masking's noise (B, L, 5) -> the token order noise (B, L) and the draws of each
    rectangle attempt (B, L, 4) in float32: area, aspect ratio (log-uniform between the two
    bounds, as BEiT draws it), top, left."""
    lo, hi = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
    draws = noise[..., 1:].float().clone()
    draws[..., 1] = torch.exp(lo + draws[..., 1] * (hi - lo))
    return noise[..., 0], draws


def block_cover(draws: torch.Tensor, grid: tuple[int, int], num_mask: int,
                min_patches: int) -> torch.Tensor:
    """The tokens BEiT-style rectangles cover, (B, L) bool, from the draws of `block_draws`.

    With r = num_mask - covered, attempt a of each sample draws a rectangle: its area is an
    integer uniform in [min(min_patches, r), r], its sides h = floor(sqrt(area * aspect) + 0.5)
    and w = floor(sqrt(area / aspect) + 0.5) in float32, its top-left corner uniform over the
    positions where it fits. As in BEiT's MaskingGenerator it is used if h < grid rows and
    w < grid columns and it covers between 1 and r new tokens. Unlike BEiT, which stops after
    10 failed attempts in a row, every sample makes all its attempts (one per token)."""
    B, attempts, _ = draws.shape
    grid_h, grid_w = grid
    pos = torch.arange(grid_h * grid_w, device=draws.device)
    row, col = pos // grid_w, pos % grid_w
    covered = torch.zeros(B, grid_h * grid_w, dtype=torch.bool, device=draws.device)
    count = torch.zeros(B, dtype=torch.int32, device=draws.device)
    for attempt in range(attempts):
        u_area, aspect, u_top, u_left = draws[:, attempt].unbind(1)
        remaining = num_mask - count
        lo = torch.clamp(remaining, max=min_patches)
        area = lo + torch.floor(u_area * (remaining - lo + 1).float()).int()
        area = torch.minimum(area, remaining).float()
        h = torch.floor(torch.sqrt(area * aspect) + 0.5).int()
        w = torch.floor(torch.sqrt(area / aspect) + 0.5).int()
        top = torch.minimum(torch.floor(u_top * (grid_h - h + 1).float()).int(), grid_h - h)
        left = torch.minimum(torch.floor(u_left * (grid_w - w + 1).float()).int(), grid_w - w)
        inside = ((row >= top[:, None]) & (row < (top + h)[:, None])
                  & (col >= left[:, None]) & (col < (left + w)[:, None]))
        new = (inside & ~covered).sum(1, dtype=torch.int32)
        used = (h >= 1) & (w >= 1) & (h < grid_h) & (w < grid_w) & (new > 0) & (new <= remaining)
        covered |= inside & used[:, None]
        count += torch.where(used, new, 0)
    return covered


def block_masking(x: torch.Tensor, mask_ratio: float, grid: tuple[int, int],
                  noise: torch.Tensor | None = None, min_patches: int = 4,
                  aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)):
    """Block-wise masking after BEiT, with an exact count: `block_cover` covers up to
    L - len_keep tokens with rectangles; the kept tokens are the uncovered ones first, each
    group in the order of noise[..., 0] (ties to the lower index), so a shortfall of covered
    tokens is made up by the uncovered ones with the largest noise."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, 5, device=x.device)
    order_noise, draws = block_draws(noise, aspect_ratio)
    covered = block_cover(draws, grid, L - len_keep, min_patches)
    by_noise = torch.argsort(order_noise, dim=1, stable=True)
    by_cover = torch.argsort(covered.gather(1, by_noise).int(), dim=1, stable=True)
    return _masked_by_order(x, by_noise.gather(1, by_cover), len_keep)


def grid_masking(x: torch.Tensor, grid: tuple[int, int], keep_every: int = 2,
                 offsets: torch.Tensor | None = None):
    """The MAE paper's grid-wise sampling: keep the token at (offset row, offset column) of
    every keep_every x keep_every square, in position order; offsets (B, 2), default zeros."""
    N, L, D = x.shape
    grid_h, grid_w = grid
    if offsets is None:
        offsets = torch.zeros(N, 2, dtype=torch.int64, device=x.device)
    rows = torch.arange(L, device=x.device) // grid_w
    cols = torch.arange(L, device=x.device) % grid_w
    kept = (rows % keep_every == offsets[:, :1]) & (cols % keep_every == offsets[:, 1:])
    ids_shuffle = torch.argsort((~kept).int(), dim=1, stable=True)
    return _masked_by_order(x, ids_shuffle, L // keep_every**2)


def resized_crop(images: list[torch.Tensor], boxes: torch.Tensor, size: int,
                 flips: torch.Tensor | None = None, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), dtype: torch.dtype = torch.float32,
                 patch_size: int | None = None) -> torch.Tensor:
    """Per sample, torchvision v2's `resized_crop(img, top, left, height, width, [size, size],
    BICUBIC, antialias=True)` on the uint8 image (`images`: (3, H_i, W_i) each) without its final
    rounding to uint8: the crop resampled as float by aten's antialiased bicubic, clamped to
    [0, 255]; then the horizontal flip where `flips` says, /255, (x - mean) / std, in `dtype`;
    in the `patchify` layout when `patch_size` is given. boxes (B, 4): (top, left, height,
    width)."""
    flips = [False] * len(images) if flips is None else flips.tolist()
    out = []
    for img, (top, left, height, width), flip in zip(images, boxes.tolist(), flips):
        crop = img[None, :, top:top + height, left:left + width].float()
        if (height, width) != (size, size):  # torchvision returns an unresized crop as it is
            crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic",
                                                   align_corners=False, antialias=True)
        crop = crop.clamp(0, 255)[0]
        out.append(crop.flip(-1) if flip else crop)
    x = torch.stack(out) / 255
    x = ((x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1))
         / torch.tensor(std, device=x.device).view(1, 3, 1, 1))
    x = x.to(dtype)
    return patchify(x, patch_size) if patch_size else x
