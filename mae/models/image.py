"""MaskedAutoencoderViT: the official MAE architecture (facebookresearch/mae `models_mae.py`),
parameter for parameter, so official checkpoints load with strict=True, running on the
mae_kernels ops and F.scaled_dot_product_attention.

With `use_kernels=True` (the default) two steps also do less work than the official model:
only the kept patches are embedded (patchify, mask the pixels, then project: a quarter of the
patch-embedding work), and the decoder's mask-token unshuffle adds the positional embedding in
the same pass. `use_kernels=False` runs the official sequence on the reference ops.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import mae_kernels
from mae_kernels import reference

from .pos_embed import sincos_2d


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class PatchEmbed(nn.Module):
    """Image to patch tokens by a strided convolution (timm's `PatchEmbed`, same names)."""

    def __init__(self, img_size, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Project already-patchified pixels, (row, col, channel) order, as `forward` would."""
        weight = self.proj.weight.permute(0, 2, 3, 1).flatten(1)
        return F.linear(patches, weight, self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (timm's DropPath): in training, each sample's branch is dropped with
    probability `rate` and the kept ones scaled by 1 / (1 - rate)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    kept = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * kept.div_(keep)


class Block(nn.Module):
    """Pre-norm transformer block with timm's parameter names."""

    # set by mae.train.fsdp.set_grad_checkpointing; a class default, so it is no part of the weights
    grad_checkpointing = False

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer,
                 mlp_dim: int | None = None, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        # ViT-g/G's MLP widths (6144, 8192) are no integer multiple of their width
        self.mlp = Mlp(dim, mlp_dim or int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate  # stochastic depth (Pixio's encoder: up to 0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # inside forward, so FSDP's hooks on the block's call stay outside the recompute
            # (what checkpoint_wrapper under fully_shard does)
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        rate = self.drop_path_rate
        x = x + drop_path(self.attn(self.norm1(x)), rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), rate, self.training)


def run_decoder(model, x: torch.Tensor, ids_restore: torch.Tensor,
                num_prefix_tokens: int) -> torch.Tensor:
    """The MAE decoder of `model` (image or video): embed, unshuffle with the mask token and the
    decoder positional embedding, the blocks, the norm, and the head over the patch tokens only
    (not the prefix/cls tokens)."""
    x = model.decoder_embed(x)
    if model.use_kernels:
        with mae_kernels.skip_index_checks():  # ids_restore comes from the model's masking
            x = mae_kernels.unshuffle(x, model.mask_token, ids_restore, num_prefix_tokens,
                                      model.decoder_pos_embed)
    else:
        x = reference.unshuffle(x, model.mask_token, ids_restore, num_prefix_tokens,
                                model.decoder_pos_embed)
    for blk in model.decoder_blocks:
        x = blk(x)
    x = model.decoder_norm(x)
    return model.decoder_pred(x[:, num_prefix_tokens:, :])


class Features(NamedTuple):
    """What `encode` returns: the cls token after the encoder's norm, and the global-pool
    feature of the official fine-tune/probe models (models_vit.py with global_pool): the mean of
    the patch tokens before the norm, through a fresh `fc_norm` LayerNorm (as main_linprobe.py
    leaves it: weight 1, bias 0, the model's LayerNorm eps)."""

    cls_token: torch.Tensor
    patch_mean: torch.Tensor


def global_pool(tokens: torch.Tensor, eps: float) -> torch.Tensor:
    """`Features.patch_mean` of tokens (B, N, D) taken before the encoder's norm; `eps` the
    model's LayerNorm eps, as timm's fc_norm has it."""
    pooled = tokens.mean(dim=1)
    return F.layer_norm(pooled, pooled.shape[-1:], eps=eps)


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a ViT backbone; `forward(imgs, mask_ratio, noise)` returns
    (loss, pred, mask) as the official model does.

    Pixio (facebookresearch/pixio pretraining/models_pixio.py `PixioViT`, same parameter names)
    is this model with `n_cls_tokens` class tokens (Pixio: 8), random masking in `mask_grid` x
    `mask_grid` units of patches (Pixio: 4), learned position embeddings initialised as
    Pixio's (`learned_pos_embed`: truncated normal, std 0.02) and stochastic depth in the
    encoder (`drop_path`, linearly up to it over the blocks, as Pixio)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6),  # noqa: B008 (official)
                 norm_pix_loss=False,
                 use_kernels=True, mask_type="random", target="pixel", mlp_dim=None,
                 n_cls_tokens=1, mask_grid=1, learned_pos_embed=False, drop_path=0.0):
        """`mlp_dim`: the encoder's MLP width where it is no integer multiple of embed_dim
        (ViT-g/14's 6144); the decoder's is decoder_embed_dim * mlp_ratio."""
        super().__init__()
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        if mask_grid != 1 and mask_type != "random":
            raise ValueError(f"mask_grid {mask_grid} masks random units of patches: it needs "
                             f"mask_type 'random', got {mask_type!r}")
        if target not in TARGETS or (target == "hog" and patch_size % HOG_CELL):
            raise ValueError(f"target must be one of {TARGETS} (hog: with a patch_size divisible "
                             f"by {HOG_CELL}), got {target!r} with patch_size {patch_size}")
        self.mask_type = mask_type
        self.target = target
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        if any(side % mask_grid for side in self.grid_size):
            raise ValueError(f"mask_grid {mask_grid} must divide both sides of the "
                             f"{self.grid_size[0]}x{self.grid_size[1]} grid of patches")
        self.n_cls_tokens, self.mask_grid = n_cls_tokens, mask_grid
        self.learned_pos_embed = learned_pos_embed
        P = n_cls_tokens

        self.cls_token = nn.Parameter(torch.zeros(1, P, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + P, embed_dim),
                                      requires_grad=learned_pos_embed)
        # Pixio's np.linspace(0, drop_path, depth), on the host (models are built on meta too)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, norm_layer, mlp_dim, rate) for rate in rates]
        )
        self.norm = norm_layer(embed_dim)
        self.norm_eps = self.norm.eps  # global_pool's (a CrossMAE without a last norm drops it)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + P, decoder_embed_dim),
                                              requires_grad=learned_pos_embed)
        self.decoder_blocks = self.build_decoder_blocks(embed_dim, decoder_embed_dim,
                                                        decoder_depth, decoder_num_heads,
                                                        mlp_ratio, norm_layer)
        self.decoder_norm = norm_layer(decoder_embed_dim)
        # pixels, or HOG features: in_chans * cells * bins per patch
        out = (in_chans * (patch_size // HOG_CELL) ** 2 * HOG_BINS if target == "hog"
               else patch_size**2 * in_chans)
        self.decoder_pred = nn.Linear(decoder_embed_dim, out, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.use_kernels = use_kernels
        self.initialize_weights()

    @property
    def num_prefix_tokens(self) -> int:
        return self.n_cls_tokens

    def build_decoder_blocks(self, embed_dim, decoder_dim, depth, num_heads, mlp_ratio,
                             norm_layer) -> nn.ModuleList:
        """MAE's decoder blocks: self-attention over every token (CrossMAE overrides it)."""
        return nn.ModuleList([Block(decoder_dim, num_heads, mlp_ratio, norm_layer)
                              for _ in range(depth)])

    def initialize_weights(self):
        """The official initialisation: fixed sin-cos tables (zero rows for the cls tokens), or
        Pixio's truncated normal (std 0.02) for learned ones; xavier-uniform linear layers (and
        the patch projection viewed as one), N(0, 0.02) cls and mask tokens."""
        for table in (self.pos_embed, self.decoder_pos_embed):
            if self.learned_pos_embed:
                nn.init.trunc_normal_(table, std=0.02)
            else:
                prefix = torch.zeros(self.n_cls_tokens, table.shape[-1])
                table.data.copy_(torch.cat([prefix, sincos_2d(table.shape[-1],
                                                              self.grid_size)])[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        ops = mae_kernels if self.use_kernels else reference
        return ops.patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        ops = mae_kernels if self.use_kernels else reference
        return ops.unpatchify(x, self.patch_size, self.grid_size, self.in_chans)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise=None):
        """(x_masked, mask, ids_restore) by the model's mask_type: the official random masking
        (in mask_grid x mask_grid units: Pixio's), BEiT's blocks or the paper's grid (noise as
        each op takes it; grid uses none)."""
        if self.use_kernels:
            return self.masking_with_ids(x, mask_ratio, noise)[:3]
        if self.mask_type == "block":
            return reference.block_masking(x, mask_ratio, self.grid_size, noise)
        if self.mask_type == "grid":
            return reference.grid_masking(x, self.grid_size, grid_keep_every(mask_ratio))
        if self.mask_grid > 1:
            return reference.pixio_masking(x, mask_ratio, self.mask_grid, noise, self.grid_size)
        return reference.random_masking(x, mask_ratio, noise)

    def masking_with_ids(self, x: torch.Tensor, mask_ratio: float, noise=None):
        """The fused ops of `random_masking`, plus ids_keep (the kept positions)."""
        ops = mae_kernels.masking
        if self.mask_type == "block":
            return ops.block_masking_with_ids(x, mask_ratio, self.grid_size, noise)
        if self.mask_type == "grid":
            return ops.grid_masking_with_ids(x, self.grid_size, grid_keep_every(mask_ratio))
        if self.mask_grid > 1:
            return ops.masking_with_ids(x, mask_ratio, noise, mask_grid=self.mask_grid,
                                        grid=self.grid_size)[:4]
        return ops.random_masking_with_ids(x, mask_ratio, noise)

    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise of the shape `forward(..., noise=)` takes for this mask_type (on the CPU): one
        value per token, or per mask_grid x mask_grid unit."""
        shape = ((batch, self.patch_embed.num_patches // self.mask_grid**2)
                 + ((5,) if self.mask_type == "block" else ()))
        return torch.rand(shape, generator=generator)

    def _check_imgs(self, imgs: torch.Tensor) -> None:
        expected = (self.in_chans, *self.patch_embed.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(
                f"imgs must have shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(imgs.shape)}; build the model with img_size for other sizes"
            )

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise=None):
        self._check_imgs(imgs)
        P = self.n_cls_tokens
        if self.use_kernels:
            # Mask the pixels, then embed only the kept patches.
            patches, mask, ids_restore, ids_keep = self.masking_with_ids(
                self.patchify(imgs), mask_ratio, noise
            )
            x = self.patch_embed.embed_patches(patches) + self.pos_embed[0, P:][ids_keep]
        else:
            x = self.patch_embed(imgs) + self.pos_embed[:, P:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        x = self._with_cls_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def _with_cls_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The cls tokens (with their position embedding) before the patch tokens x."""
        P = self.n_cls_tokens
        cls = (self.cls_token + self.pos_embed[:, :P, :]).expand(x.shape[0], -1, -1)
        return torch.cat((cls.to(x.dtype), x), dim=1)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return run_decoder(self, x, ids_restore, num_prefix_tokens=self.n_cls_tokens)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        if self.target == "hog":
            if self.use_kernels:
                return mae_kernels.mae_loss(imgs, pred, mask, self.patch_size, target="hog")
            return reference.hog_loss(imgs, pred, mask, self.patch_size)
        ops = mae_kernels if self.use_kernels else reference
        return ops.mae_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss)

    def predict(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise=None):
        """(loss, pred (B, L, p*p*C), mask): the official forward."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise=None):
        return self.predict(imgs, mask_ratio, noise)

    def encode(self, imgs: torch.Tensor) -> Features:
        """All patches, no masking: the features a linear probe or fine-tuning starts from
        (several cls tokens, Pixio's: their mean, as Pixio's k-NN evaluation takes them)."""
        self._check_imgs(imgs)
        P = self.n_cls_tokens
        x = self._with_cls_tokens(self.patch_embed(imgs) + self.pos_embed[:, P:, :])
        for blk in self.blocks:
            x = blk(x)
        return Features(cls_token=self.final_norm(x)[:, :P].mean(dim=1),
                        patch_mean=global_pool(x[:, P:], self.norm_eps))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last LayerNorm."""
        return self.norm(x)


# Named models as config dicts (the keys of `MAE`); the official ones are models_mae.py's.
MODEL_CONFIGS = {
    # a small model for CPU work: ViT-Tiny encoder, 128-wide 2-block decoder
    "mae_vit_tiny_patch16": dict(encoder_dim=192, encoder_layers=12, encoder_heads=3,
                                 decoder_dim=128, decoder_layers=2, decoder_heads=4),
    "mae_vit_small_patch16": dict(encoder_dim=384, encoder_layers=12, encoder_heads=6,
                                  decoder_dim=256, decoder_layers=4, decoder_heads=8),
    "mae_vit_base_patch16": dict(encoder_dim=768, encoder_layers=12, encoder_heads=12),
    "mae_vit_large_patch16": dict(encoder_dim=1024, encoder_layers=24, encoder_heads=16),
    "mae_vit_huge_patch14": dict(patch_size=14, encoder_dim=1280, encoder_layers=32,
                                 encoder_heads=16),
    # ViT-g/14 and ViT-G/14 (Zhai et al., "Scaling Vision Transformers"), the MAE decoder
    "mae_vit_giant_patch14": dict(patch_size=14, encoder_dim=1408, encoder_layers=40,
                                  encoder_heads=16, encoder_mlp_dim=6144),
    "mae_vit_gigantic_patch14": dict(patch_size=14, encoder_dim=1664, encoder_layers=48,
                                     encoder_heads=16, encoder_mlp_dim=8192),
}

# Every key `MAE` accepts, with its default (the official ViT-B/16 with the 8-block decoder).
DEFAULT_CONFIG = {
    "img_size": 224, "patch_size": 16, "in_chans": 3,
    "encoder_dim": 768, "encoder_layers": 12, "encoder_heads": None,  # None: encoder_dim // 64
    "decoder_dim": 512, "decoder_layers": 8, "decoder_heads": None,  # None: decoder_dim // 32
    "mlp_ratio": 4.0, "encoder_mlp_dim": None,  # None: encoder_dim * mlp_ratio
    "mask_ratio": 0.75, "norm_pix_loss": False, "use_kernels": True,
    # every LayerNorm's eps: the official models' 1e-6 (an HF ViTMAE's config.json says its own,
    # layer_norm_eps, 1e-12 where it does not)
    "norm_eps": 1e-6,
    "mask_type": "random",  # or "block" (BEiT's rectangles), "grid" (the paper's regular grid)
    "target": "pixel",  # or "hog": MaskFeat's HOG features of the masked patches
    # Pixio (docs/decoders.md): cls tokens, masking units of mask_grid x mask_grid patches,
    # position embeddings "sincos" (fixed, MAE's) or "learned" (Pixio's), encoder drop path
    "n_cls_tokens": 1, "mask_grid": 1, "pos_embed": "sincos", "drop_path": 0.0,
    # the decoder: "mae" (self-attention over every token) or "cross" (CrossMAE: the queries of
    # the predicted patches cross-attend to the encoder); CrossMAE's options: predict_ratio (its
    # kept_mask_ratio: the share of all patches predicted; None: every masked one), weight_fm
    # (each decoder block reads its own weighted sum of encoder blocks' features), use_fm
    # (those blocks; None: all), use_input (the encoder's input too), self_attn
    "decoder": "mae", "predict_ratio": None, "weight_fm": False, "use_fm": None,
    "use_input": False, "self_attn": False,
}
CROSS_KEYS = ("predict_ratio", "weight_fm", "use_fm", "use_input", "self_attn")
DECODERS = ("mae", "cross")
POS_EMBEDS = ("sincos", "learned")
TARGETS = ("pixel", "hog")
HOG_CELL, HOG_BINS = 8, 9  # mae_kernels.hog_targets' defaults: 8x8 cells, 9 orientations
MASK_TYPES = ("random", "block", "grid")
# A config with either key is a video model (.video.VideoMAE): VideoMAE's defaults, 16 frames in
# tubelets of 2, tube masking at 90%, no cls token.
VIDEO_CONFIG = {"num_frames": 16, "tubelet_size": 2, "mask_ratio": 0.9, "mask_type": "tube",
                "n_cls_tokens": 0}


def is_video(config: dict) -> bool:
    return "num_frames" in config or "tubelet_size" in config


def grid_keep_every(mask_ratio: float) -> int:
    """Grid masking keeps one token of every k x k square: mask_ratio = 1 - 1/k^2 (0.75: k=2)."""
    keep_every = max(1, round((1 - mask_ratio) ** -0.5))
    if abs(1 - keep_every**-2 - mask_ratio) > 1e-6:
        raise ValueError(f"grid masking keeps one token in k*k, so mask_ratio must be 1 - 1/k^2 "
                         f"(0.75, 0.889, ...), got {mask_ratio}")
    return keep_every


def resolve_config(config: dict) -> dict:
    """`config` over the defaults, checked: unknown keys and bad values name the key."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    video = is_video(config)
    defaults = {**DEFAULT_CONFIG, **VIDEO_CONFIG} if video else DEFAULT_CONFIG
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"unknown MAE config key(s) {unknown}; valid keys: "
                         f"{sorted(set(DEFAULT_CONFIG) | set(VIDEO_CONFIG))}")
    config = {**defaults, **config}
    for heads, dim, width in (("encoder_heads", "encoder_dim", 64),
                              ("decoder_heads", "decoder_dim", 32)):
        if config[heads] is None and isinstance(config[dim], int):
            config[heads] = max(1, config[dim] // width)
    img = config["img_size"]
    config["img_size"] = list(_pair(img)) if not isinstance(img, int) else img
    for key in ("patch_size", "in_chans", "encoder_dim", "encoder_layers", "encoder_heads",
                "decoder_dim", "decoder_layers", "decoder_heads"):
        # decoder_layers 0: the official code builds a decoder of no blocks (embed, norm, head)
        least = 0 if key == "decoder_layers" else 1
        if isinstance(config[key], bool) or not isinstance(config[key], int) \
                or config[key] < least:
            raise ValueError(f"config[{key!r}] must be an integer >= {least}, got "
                             f"{config[key]!r}")
    mlp_dim = config["encoder_mlp_dim"]
    if mlp_dim is not None and (isinstance(mlp_dim, bool) or not isinstance(mlp_dim, int)
                                or mlp_dim < 1):
        raise ValueError(f"config['encoder_mlp_dim'] must be an integer >= 1 or None, got "
                         f"{mlp_dim!r}")
    mlp = config["mlp_ratio"]
    if isinstance(mlp, bool) or not isinstance(mlp, (int, float)) or not 0 < mlp < float("inf"):
        raise ValueError(f"config['mlp_ratio'] must be a number > 0, got {mlp!r}")
    for side in _pair(config["img_size"]):
        if isinstance(side, bool) or not isinstance(side, int) or side % config["patch_size"]:
            raise ValueError(f"config['img_size'] {config['img_size']!r} must be integers "
                             f"divisible by config['patch_size'] {config['patch_size']}")
    for dim, heads in (("encoder_dim", "encoder_heads"), ("decoder_dim", "decoder_heads")):
        if config[dim] % config[heads]:
            raise ValueError(f"config[{dim!r}] {config[dim]} is not divisible by "
                             f"config[{heads!r}] {config[heads]}")
    eps = config["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"config['norm_eps'] must be a number in (0, 1), got {eps!r}")
    ratio = config["mask_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"config['mask_ratio'] must be in [0, 1), got {ratio!r}")
    for key in ("norm_pix_loss", "use_kernels"):
        if not isinstance(config[key], bool):
            raise ValueError(f"config[{key!r}] must be True or False, got {config[key]!r}")
    if video:
        for key in ("num_frames", "tubelet_size"):
            if isinstance(config[key], bool) or not isinstance(config[key], int) \
                    or config[key] < 1:
                raise ValueError(f"config[{key!r}] must be a positive integer, got "
                                 f"{config[key]!r}")
        if config["num_frames"] % config["tubelet_size"]:
            raise ValueError(f"config['tubelet_size'] {config['tubelet_size']} must divide "
                             f"config['num_frames'] {config['num_frames']}")
    targets = ("pixel",) if video else TARGETS
    if config["target"] not in targets:
        raise ValueError(f"config['target'] must be one of {targets}, got {config['target']!r}")
    if config["target"] == "hog" and config["patch_size"] % HOG_CELL:
        raise ValueError(f"config['target'] 'hog' needs a patch_size divisible by {HOG_CELL} "
                         f"(its cells), got {config['patch_size']}")
    mask_types = ("tube",) if video else MASK_TYPES
    if config["mask_type"] not in mask_types:
        raise ValueError(f"config['mask_type'] must be one of {mask_types}, got "
                         f"{config['mask_type']!r}")
    if config["mask_type"] == "grid":
        grid_keep_every(ratio)
    _check_decoder_side(config, video)
    return config


def _check_decoder_side(config: dict, video: bool) -> None:
    """The Pixio and CrossMAE keys of a config (see DEFAULT_CONFIG)."""
    least = {"n_cls_tokens": 0 if video else 1, "mask_grid": 1}
    for key, low in least.items():
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"config[{key!r}] must be an integer >= {low}, got {value!r}")
    rate = config["drop_path"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"config['drop_path'] must be in [0, 1), got {rate!r}")
    for key, allowed in (("pos_embed", POS_EMBEDS), ("decoder", DECODERS)):
        if config[key] not in allowed:
            raise ValueError(f"config[{key!r}] must be one of {allowed}, got {config[key]!r}")
    if video and (config["mask_grid"] != 1 or config["decoder"] != "mae"
                  or config["n_cls_tokens"] or config["pos_embed"] != "sincos"
                  or config["drop_path"]):
        raise ValueError("VideoMAE configs take no Pixio or CrossMAE keys (n_cls_tokens, "
                         "mask_grid, pos_embed, drop_path, decoder)")
    side = [s // config["patch_size"] for s in _pair(config["img_size"])]
    if config["mask_grid"] > 1:
        if config["mask_type"] != "random":
            raise ValueError(f"config['mask_grid'] {config['mask_grid']} masks random units: it "
                             f"needs mask_type 'random', got {config['mask_type']!r}")
        if any(n % config["mask_grid"] for n in side):
            raise ValueError(f"config['mask_grid'] {config['mask_grid']} must divide both sides "
                             f"of the {side[0]}x{side[1]} grid of patches")
    if config["decoder"] == "mae":
        given = [k for k in CROSS_KEYS if config[k] != DEFAULT_CONFIG[k]]
        if given:
            raise ValueError(f"config[{given[0]!r}] is CrossMAE's: it needs decoder 'cross'")
        return
    if config["mask_type"] != "random" or config["target"] != "pixel":
        raise ValueError("decoder 'cross' predicts pixels of randomly masked patches (CrossMAE): "
                         "mask_type 'random', target 'pixel'")
    ratio = config["predict_ratio"]
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0 < ratio <= config["mask_ratio"]):
        raise ValueError(f"config['predict_ratio'] must be in (0, mask_ratio="
                         f"{config['mask_ratio']}] or None, got {ratio!r}")
    for key in ("weight_fm", "use_input", "self_attn"):
        if not isinstance(config[key], bool):
            raise ValueError(f"config[{key!r}] must be True or False, got {config[key]!r}")
    use_fm, depth = config["use_fm"], config["encoder_layers"]
    if use_fm is not None and (
            not isinstance(use_fm, list) or not use_fm
            or not all(isinstance(i, int) and not isinstance(i, bool) and -depth <= i < depth
                       for i in use_fm)):
        raise ValueError(f"config['use_fm'] must be None (every block) or a list of encoder "
                         f"block indices in [-{depth}, {depth}), got {use_fm!r}")
    if use_fm is not None and not config["weight_fm"]:
        raise ValueError("config['use_fm'] selects the blocks weight_fm weighs: it needs "
                         "weight_fm True")


def config_of(name: str, **overrides) -> dict:
    """The config dict of a named model, with overrides."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model must be one of {sorted(MODEL_CONFIGS)}, got {name!r}")
    return resolve_config({**MODEL_CONFIGS[name], **overrides})


def _official_kwargs(config: dict) -> dict:
    """MaskedAutoencoderViT's (official) arguments for a resolved config."""
    return dict(img_size=config["img_size"], patch_size=config["patch_size"],
                in_chans=config["in_chans"], embed_dim=config["encoder_dim"],
                depth=config["encoder_layers"], num_heads=config["encoder_heads"],
                decoder_embed_dim=config["decoder_dim"], decoder_depth=config["decoder_layers"],
                decoder_num_heads=config["decoder_heads"], mlp_ratio=config["mlp_ratio"],
                norm_pix_loss=config["norm_pix_loss"], use_kernels=config["use_kernels"],
                mask_type=config["mask_type"], target=config["target"],
                mlp_dim=config["encoder_mlp_dim"], n_cls_tokens=config["n_cls_tokens"],
                mask_grid=config["mask_grid"],
                learned_pos_embed=config["pos_embed"] == "learned",
                drop_path=config["drop_path"],
                norm_layer=partial(nn.LayerNorm, eps=config["norm_eps"]))


@dataclasses.dataclass(eq=False)
class Output:
    """What `MAE(...)(images)` returns: `loss, reconstructed, mask = model(images)`, or read by
    name. `reconstructed` (B, C, H, W), the prediction of every patch as an image, is made from
    the prediction when first read, so a training step that reads only `loss` never
    unpatchifies; `mask` (B, L) is 1 where masked. A dataclass and a pytree node, so that FSDP2
    finds its tensors (its root hooks its pre-backward, the backward prefetch, on them)."""

    loss: torch.Tensor
    _pred: torch.Tensor = dataclasses.field(repr=False)
    mask: torch.Tensor
    _to_image: object = dataclasses.field(default=None, repr=False)
    _reconstructed: torch.Tensor | None = dataclasses.field(default=None, init=False,
                                                            repr=False)

    @property
    def reconstructed(self) -> torch.Tensor:
        if self._reconstructed is None:
            self._reconstructed = (self._pred if self._to_image is None
                                   else self._to_image(self._pred))
        return self._reconstructed

    def __iter__(self):
        return iter((self.loss, self.reconstructed, self.mask))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index):
        if isinstance(index, int):  # output[0] makes no image
            return getattr(self, ("loss", "reconstructed", "mask")[index])
        return tuple(self)[index]


# torch before 2.13 finds a module's output tensors with tree_flatten (2.13 on: dataclasses too)
torch.utils._pytree.register_pytree_node(
    Output, lambda out: ([out.loss, out._pred, out.mask], out._to_image),
    lambda tensors, to_image: Output(*tensors, to_image),
    serialized_type_name=f"{__name__}.Output")


class MAE(MaskedAutoencoderViT):
    """The config-dict interface: `MAE({"img_size": 224, "patch_size": 16, ...})`, keys as in
    DEFAULT_CONFIG. `model(images)` returns `(loss, reconstructed, mask)` with `reconstructed`
    an image (B, C, H, W); with norm_pix_loss it is in per-patch normalised units, as the loss
    sees it (mae.eval.figures.reconstruct maps it back to pixels). Same parameters as the official
    model: the `mae` CLI trains this class, and either's checkpoints load into the other.

    `feature_target`: predict features instead of pixels (e.g. a frozen pre-trained network's,
    for a perceptual target). A callable mapping the (normalised) images (B, C, H, W) to one
    feature vector per patch, (B, L, F) in patch order; it runs under no_grad, is not part of
    the model (not trained, saved or moved), and the decoder head is sized to F (`feature_dim`,
    or found by one call on a blank image). The loss is then the mean squared error to those
    features on the masked patches, and `reconstructed` the predicted features (B, L, F), as
    it is for config["target"] "hog"."""

    DECODER = "mae"  # the config["decoder"] this class builds

    def __init__(self, config: dict | None = None, feature_target=None,
                 feature_dim: int | None = None, **overrides):
        config = resolve_config({**(config or {}), **overrides})
        if config["decoder"] != self.DECODER:
            raise ValueError(f"config['decoder'] {config['decoder']!r}: build it with "
                             f"mae.models.build_model (CrossMAE for 'cross')")
        super().__init__(**_official_kwargs(config))
        self.config = config
        self.mask_ratio = config["mask_ratio"]
        # Not a submodule: a frozen feature network is neither trained, saved nor moved with
        # the model (put it on the model's device yourself).
        object.__setattr__(self, "feature_target", feature_target)
        if feature_target is not None:
            if feature_dim is None:  # one call on a blank image tells the width
                C, (H, W) = self.in_chans, self.patch_embed.img_size
                with torch.no_grad():
                    feature_dim = self._features(torch.zeros(1, C, H, W)).shape[-1]
            self.decoder_pred = nn.Linear(self.decoder_pred.in_features, feature_dim)
            self._init_weights(self.decoder_pred)

    def _features(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.feature_target(imgs)
        expected = (imgs.shape[0], self.patch_embed.num_patches)
        if not isinstance(target, torch.Tensor) or target.dim() != 3 \
                or tuple(target.shape[:2]) != expected:
            got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target)
            raise ValueError(f"feature_target must map images (B, C, H, W) to per-patch "
                             f"features {expected + ('F',)}, got {got}")
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        if self.feature_target is None:
            return super().forward_loss(imgs, pred, mask)
        return reference.masked_mse(pred, self._features(imgs), mask, torch.float32)

    @classmethod
    def from_name(cls, name: str, **overrides) -> MAE:
        return cls(config_of(name, **overrides))

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise=None) -> Output:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        loss, pred, mask = self.predict(imgs, ratio, noise)
        if self.feature_target is not None or self.target != "pixel":
            return Output(loss, pred, mask)  # predicted features (B, L, F), not pixels
        return Output(loss, pred, mask, self.unpatchify)


def _factory(name: str):
    def build(**kwargs) -> MaskedAutoencoderViT:
        """The named model with the official constructor's arguments as overrides."""
        defaults = _official_kwargs(config_of(name))
        return MaskedAutoencoderViT(**{**defaults, **kwargs})

    build.__name__ = build.__qualname__ = name
    return build


mae_vit_tiny_patch16 = _factory("mae_vit_tiny_patch16")
mae_vit_small_patch16 = _factory("mae_vit_small_patch16")
mae_vit_base_patch16 = _factory("mae_vit_base_patch16")
mae_vit_large_patch16 = _factory("mae_vit_large_patch16")
mae_vit_huge_patch14 = _factory("mae_vit_huge_patch14")
mae_vit_giant_patch14 = _factory("mae_vit_giant_patch14")
mae_vit_gigantic_patch14 = _factory("mae_vit_gigantic_patch14")

MODELS = {name: globals()[name] for name in MODEL_CONFIGS}


def model_config_of(saved_args: dict) -> dict:
    """The model config a checkpoint's saved arguments describe (older checkpoints, ours and the
    official ones, saved the model name and size flags only)."""
    if saved_args.get("model_config"):
        return resolve_config(saved_args["model_config"])
    config = {**MODEL_CONFIGS[saved_args["model"]], "img_size": saved_args.get("input_size", 224),
              "norm_pix_loss": bool(saved_args.get("norm_pix_loss", False)),
              "use_kernels": not saved_args.get("no_kernels", False)}
    if saved_args.get("patch_size"):
        config["patch_size"] = saved_args["patch_size"]
    return resolve_config(config)
