"""MaskedAutoencoderViT: the official MAE architecture (facebookresearch/mae `models_mae.py`),
parameter for parameter, so official checkpoints load with strict=True, running on the
mae_kernels ops and F.scaled_dot_product_attention.

With `use_kernels=True` (the default) two steps also do less work than the official model:
only the kept patches are embedded (patchify, mask the pixels, then project: a quarter of the
patch-embedding work), and the decoder's mask-token unshuffle adds the positional embedding in
the same pass. `use_kernels=False` runs the official sequence on the reference ops.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class Block(nn.Module):
    """Pre-norm transformer block with timm's parameter names."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Features(NamedTuple):
    """What `encode` returns: the cls token and the mean of the patch tokens, after the norm."""

    cls_token: torch.Tensor
    patch_mean: torch.Tensor


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a ViT backbone; `forward(imgs, mask_ratio, noise)` returns
    (loss, pred, mask) as the official model does."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_layer=partial(nn.LayerNorm, eps=1e-6),  # noqa: B008 (official)
                 norm_pix_loss=False,
                 use_kernels=True):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer)
             for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.use_kernels = use_kernels
        self.initialize_weights()

    def initialize_weights(self):
        """The official initialisation: fixed sin-cos tables, xavier-uniform linear layers (and
        the patch projection viewed as one), N(0, 0.02) cls and mask tokens."""
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid_size, True)[None])
        self.decoder_pos_embed.data.copy_(
            sincos_2d(self.decoder_pos_embed.shape[-1], self.grid_size, True)[None]
        )
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
        ops = mae_kernels if self.use_kernels else reference
        return ops.random_masking(x, mask_ratio, noise)

    def _check_imgs(self, imgs: torch.Tensor) -> None:
        expected = (self.in_chans, *self.patch_embed.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(
                f"imgs must have shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(imgs.shape)}; build the model with img_size for other sizes"
            )

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise=None):
        self._check_imgs(imgs)
        if self.use_kernels:
            # Mask the pixels, then embed only the kept patches.
            patches, mask, ids_restore, ids_keep = mae_kernels.masking.random_masking_with_ids(
                self.patchify(imgs), mask_ratio, noise
            )
            x = self.patch_embed.embed_patches(patches) + self.pos_embed[0, 1:][ids_keep]
        else:
            x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls.to(x.dtype), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        if self.use_kernels:
            with mae_kernels.skip_index_checks():  # ids_restore comes from random_masking
                x = mae_kernels.unshuffle(x, self.mask_token, ids_restore, 1,
                                          self.decoder_pos_embed)
        else:
            x = reference.unshuffle(x, self.mask_token, ids_restore, 1, self.decoder_pos_embed)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, 1:, :])  # the head skips the cls token

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
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
        """All patches, no masking: the features a linear probe or fine-tuning starts from."""
        self._check_imgs(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls.to(x.dtype), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return Features(cls_token=x[:, 0], patch_mean=x[:, 1:].mean(dim=1))


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
}

# Every key `MAE` accepts, with its default (the official ViT-B/16 with the 8-block decoder).
DEFAULT_CONFIG = {
    "img_size": 224, "patch_size": 16, "in_chans": 3,
    "encoder_dim": 768, "encoder_layers": 12, "encoder_heads": None,  # None: encoder_dim // 64
    "decoder_dim": 512, "decoder_layers": 8, "decoder_heads": None,  # None: decoder_dim // 32
    "mlp_ratio": 4.0, "mask_ratio": 0.75, "norm_pix_loss": False, "use_kernels": True,
}


def resolve_config(config: dict) -> dict:
    """`config` over the defaults, checked: unknown keys and bad values name the key."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown MAE config key(s) {unknown}; valid keys: "
                         f"{sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    for heads, dim, width in (("encoder_heads", "encoder_dim", 64),
                              ("decoder_heads", "decoder_dim", 32)):
        if config[heads] is None and isinstance(config[dim], int):
            config[heads] = max(1, config[dim] // width)
    img = config["img_size"]
    config["img_size"] = list(_pair(img)) if not isinstance(img, int) else img
    for key in ("patch_size", "in_chans", "encoder_dim", "encoder_layers", "encoder_heads",
                "decoder_dim", "decoder_layers", "decoder_heads"):
        if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"config[{key!r}] must be a positive integer, got {config[key]!r}")
    for side in _pair(config["img_size"]):
        if isinstance(side, bool) or not isinstance(side, int) or side % config["patch_size"]:
            raise ValueError(f"config['img_size'] {config['img_size']!r} must be integers "
                             f"divisible by config['patch_size'] {config['patch_size']}")
    for dim, heads in (("encoder_dim", "encoder_heads"), ("decoder_dim", "decoder_heads")):
        if config[dim] % config[heads]:
            raise ValueError(f"config[{dim!r}] {config[dim]} is not divisible by "
                             f"config[{heads!r}] {config[heads]}")
    ratio = config["mask_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"config['mask_ratio'] must be in [0, 1), got {ratio!r}")
    for key in ("norm_pix_loss", "use_kernels"):
        if not isinstance(config[key], bool):
            raise ValueError(f"config[{key!r}] must be True or False, got {config[key]!r}")
    return config


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
                norm_pix_loss=config["norm_pix_loss"], use_kernels=config["use_kernels"])


class Output(NamedTuple):
    loss: torch.Tensor
    reconstructed: torch.Tensor  # (B, C, H, W): the prediction of every patch, as an image
    mask: torch.Tensor  # (B, L): 1 = masked


class MAE(MaskedAutoencoderViT):
    """The config-dict interface: `MAE({"img_size": 224, "patch_size": 16, ...})`, keys as in
    DEFAULT_CONFIG. `model(images)` returns `(loss, reconstructed, mask)` with `reconstructed`
    an image (B, C, H, W); with norm_pix_loss it is in per-patch normalised units, as the loss
    sees it (mae.figures.reconstruct maps it back to pixels). Same parameters as the official
    model: the `mae` CLI trains this class, and either's checkpoints load into the other."""

    def __init__(self, config: dict | None = None, **overrides):
        config = resolve_config({**(config or {}), **overrides})
        super().__init__(**_official_kwargs(config))
        self.config = config
        self.mask_ratio = config["mask_ratio"]

    @classmethod
    def from_name(cls, name: str, **overrides) -> MAE:
        return cls(config_of(name, **overrides))

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise=None) -> Output:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        loss, pred, mask = self.predict(imgs, ratio, noise)
        return Output(loss, self.unpatchify(pred), mask)


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

MODELS = {name: globals()[name] for name in MODEL_CONFIGS}
