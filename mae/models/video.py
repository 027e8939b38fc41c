"""VideoMAE (Tong et al. 2022): an MAE over space-time tubelets. Videos (B, C, T, H, W) are cut
into t x p x p tubelets (a Conv3d patch embedding, as VideoMAE's), one random spatial mask per
video is shared by every frame (tube masking, 90% by default), and the decoder predicts the
pixels of the masked tubelets with VideoMAE's target (the clip un-normalised; with norm-pix each
channel of a tubelet normalised by its mean and std + 1e-6). Positions are fixed 3D sin-cos
tables; like VideoMAE there is no cls token. Encoder parameter names follow VideoMAE's
(`patch_embed.proj`, `blocks.N.{norm1,attn,norm2,mlp}`, `norm`); the decoder keeps the MAE names.

With `use_kernels=True` the tubelets are cut by `patchify3d`, masked by the fused `tube_masking`
and only the kept ones embedded; the decoder input is the fused `unshuffle` with its positional
embedding; the loss reads the video directly. `use_kernels=False` runs the reference ops.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import mae_kernels
from mae_kernels import reference
from mae_kernels.augment import IMAGENET_MEAN, IMAGENET_STD

from .image import (
    Block,
    Features,
    MaskedAutoencoderViT,
    Output,
    _pair,
    global_pool,
    resolve_config,
    run_decoder,
)
from .pos_embed import sincos_3d

# ViT-S/B as VideoMAE pre-trains them (decoder 4 blocks at half width), and a tiny one for CPUs
VIDEO_MODEL_CONFIGS = {
    "mae_videomae_tiny_patch16": dict(encoder_dim=192, encoder_layers=12, encoder_heads=3,
                                      decoder_dim=128, decoder_layers=2, decoder_heads=4),
    "mae_videomae_small_patch16": dict(encoder_dim=384, encoder_layers=12, encoder_heads=6,
                                       decoder_dim=192, decoder_layers=4, decoder_heads=3),
    "mae_videomae_base_patch16": dict(encoder_dim=768, encoder_layers=12, encoder_heads=12,
                                      decoder_dim=384, decoder_layers=4, decoder_heads=6),
}


class TubeletEmbed(nn.Module):
    """Video to tubelet tokens by a strided Conv3d (VideoMAE's `PatchEmbed`, same names)."""

    def __init__(self, num_frames: int, img_size, tubelet: int, patch_size: int, in_chans: int,
                 embed_dim: int):
        super().__init__()
        self.img_size = _pair(img_size)
        self.tubelet_size = tubelet
        self.patch_size = patch_size
        self.grid_size = (num_frames // tubelet, self.img_size[0] // patch_size,
                          self.img_size[1] // patch_size)
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet, patch_size, patch_size),
                              stride=(tubelet, patch_size, patch_size))

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        return self.proj(videos).flatten(2).transpose(1, 2)

    def embed_patches(self, tubelets: torch.Tensor) -> torch.Tensor:
        """Project tubelets in patchify3d's (frame, row, col, channel) order, as `forward`."""
        weight = self.proj.weight.permute(0, 2, 3, 4, 1).flatten(1)
        return F.linear(tubelets, weight, self.proj.bias)


class VideoMAE(nn.Module):
    """`VideoMAE({"num_frames": 16, "img_size": 224, ...})`: keys as `mae.DEFAULT_CONFIG` plus
    `num_frames` and `tubelet_size`. `model(videos)` returns `(loss, reconstructed, mask)` with
    `reconstructed` a video (B, C, T, H, W); `predict` returns (loss, pred, mask)."""

    def __init__(self, config: dict | None = None, **overrides):
        super().__init__()
        config = resolve_config({"num_frames": 16, **(config or {}), **overrides})
        self.config = config
        self.mask_ratio = config["mask_ratio"]
        self.norm_pix_loss = config["norm_pix_loss"]
        self.use_kernels = config["use_kernels"]
        self.in_chans = config["in_chans"]
        self.patch_size = config["patch_size"]
        self.tubelet_size = config["tubelet_size"]
        # VideoMAE's target un-normalises the clips, which the loaders normalise with ImageNet's
        # mean and std (mae.data.images.to_tensor); other channel counts are taken as they are
        rgb = self.in_chans == 3
        self.data_mean, self.data_std = (IMAGENET_MEAN, IMAGENET_STD) if rgb else (None, None)
        dim, decoder_dim = config["encoder_dim"], config["decoder_dim"]
        norm_layer = partial(nn.LayerNorm, eps=config["norm_eps"])
        self.patch_embed = TubeletEmbed(config["num_frames"], config["img_size"],
                                        self.tubelet_size, self.patch_size, self.in_chans, dim)
        self.grid_size = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(sincos_3d(dim, self.grid_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, config["encoder_heads"], config["mlp_ratio"],
                                           norm_layer, config["encoder_mlp_dim"])
                                     for _ in range(config["encoder_layers"])])
        self.norm = norm_layer(dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_3d(decoder_dim, self.grid_size)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, config["decoder_heads"], config["mlp_ratio"], norm_layer)
            for _ in range(config["decoder_layers"])])
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(
            decoder_dim, self.tubelet_size * self.patch_size**2 * self.in_chans)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(MaskedAutoencoderViT._init_weights)

    @classmethod
    def from_name(cls, name: str, **overrides) -> VideoMAE:
        """A model of VIDEO_MODEL_CONFIGS, with config keys as overrides."""
        if name not in VIDEO_MODEL_CONFIGS:
            raise ValueError(f"model must be one of {sorted(VIDEO_MODEL_CONFIGS)}, got {name!r}")
        return cls({**VIDEO_MODEL_CONFIGS[name], **overrides})

    def _check_videos(self, videos: torch.Tensor) -> None:
        expected = (self.in_chans, self.grid_size[0] * self.tubelet_size,
                    *self.patch_embed.img_size)
        if videos.dim() != 5 or tuple(videos.shape[1:]) != expected:
            raise ValueError(f"videos must have shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(videos.shape)}; build the model with num_frames and "
                             "img_size for other sizes")

    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The tube masking noise `forward(..., noise=)` takes: one value per spatial position."""
        return torch.rand(batch, self.grid_size[1] * self.grid_size[2], generator=generator)

    def forward_encoder(self, videos: torch.Tensor, mask_ratio: float, noise=None):
        self._check_videos(videos)
        frames = self.grid_size[0]
        tubelet = (self.tubelet_size, self.patch_size, self.patch_size)
        if self.use_kernels:
            tubelets, mask, ids_restore, ids_keep = mae_kernels.masking.tube_masking_with_ids(
                mae_kernels.patchify3d(videos, tubelet), mask_ratio, frames, noise)
            x = self.patch_embed.embed_patches(tubelets) + self.pos_embed[0][ids_keep]
        else:
            x = self.patch_embed(videos) + self.pos_embed
            x, mask, ids_restore = reference.tube_masking(x, mask_ratio, frames, noise)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return run_decoder(self, x, ids_restore, num_prefix_tokens=0)  # no cls token

    def predict(self, videos: torch.Tensor, mask_ratio: float = 0.9, noise=None):
        """(loss, pred (B, L, t*p*p*C), mask (B, L))."""
        latent, mask, ids_restore = self.forward_encoder(videos, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        ops = mae_kernels if self.use_kernels else reference
        loss = ops.mae_loss(videos, pred, mask, self.patch_size, self.norm_pix_loss,
                            self.tubelet_size, mean=self.data_mean, std=self.data_std)
        return loss, pred, mask

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        tubelet = (self.tubelet_size, self.patch_size, self.patch_size)
        ops = mae_kernels if self.use_kernels else reference
        return ops.unpatchify3d(x, tubelet, self.grid_size, self.in_chans)

    def forward(self, videos: torch.Tensor, mask_ratio: float | None = None,
                noise=None) -> Output:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        loss, pred, mask = self.predict(videos, ratio, noise)
        return Output(loss, pred, mask, self.unpatchify)

    def encode(self, videos: torch.Tensor) -> Features:
        """Every tubelet, no masking; without a cls token both features are the global pool
        (VideoMAE's fine-tuning model: the mean token before the norm, through a fresh fc_norm)."""
        self._check_videos(videos)
        x = self.patch_embed(videos) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        pooled = global_pool(x, self.config["norm_eps"])
        return Features(cls_token=pooled, patch_mean=pooled)


def _factory(name: str):
    def build(**overrides) -> VideoMAE:
        """The named VideoMAE; config keys (`mae.DEFAULT_CONFIG`'s, `num_frames`,
        `tubelet_size`) as overrides."""
        return VideoMAE.from_name(name, **overrides)

    build.__name__ = build.__qualname__ = name
    return build


mae_videomae_tiny_patch16 = _factory("mae_videomae_tiny_patch16")
mae_videomae_small_patch16 = _factory("mae_videomae_small_patch16")
mae_videomae_base_patch16 = _factory("mae_videomae_base_patch16")
