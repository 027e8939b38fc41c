"""References of ours for the upstream Pixio and CrossMAE models, written from their code's
semantics (module structure and parameter names, initialisation where it shapes the state dict,
and the forward computation), for tests to compare against; their code is not in this
repository. Each class names the file and commit it follows.

- Pixio: facebookresearch/pixio, pretraining/models_pixio.py (PixioViT, its factories) and
  pretraining/layers/{attention,mlp,patch_embed}.py, commit
  b83555d6581f4906f6f1fc1ae0abb04f622db32f.
  The released encoders: pixio/pixio.py (PixioViT without the decoder), same commit.
- CrossMAE: TonyLianLong/CrossMAE, models_cross.py (MaskedAutoencoderViT, WeightedFeatureMaps)
  and transformer_utils.py (Block, CrossAttentionBlock, PatchEmbed), commit
  ed0677a978a54c4dac3d28d54efb6b687c9d3dec. Its forward's `torch.cuda.amp.autocast()` is left
  out (these references run on the CPU, where it does nothing).

Their masking draws its noise with torch.rand inside `random_masking`, as upstream does; ties
are broken by a stable sort (upstream's argsort is unstable; continuous noise has no ties).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae.models.pos_embed import sincos_2d


def _layer_norm(dim):
    return nn.LayerNorm(dim, eps=1e-6)  # both factories' norm_layer


def _patchify(imgs, p):
    h, w = imgs.shape[2] // p, imgs.shape[3] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * 3)


class PatchEmbed(nn.Module):
    """Both repositories' patch embedding: a strided conv `proj` (their `norm` is Identity)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Pixio's SelfAttention / CrossMAE's Attention with their defaults: qkv (with bias), proj;
    scaled_dot_product_attention. (Pixio's q_norm, k_norm, norm are Identity: no parameters.)"""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SelfAttentionBlock(nn.Module):
    """Pixio's SelfAttentionBlock / CrossMAE's Block (layer scale off, as both build it), with
    Pixio's drop path (none in these references: they are compared in eval mode)."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_linear_and_norm(m):
    """Both repositories' _init_weights: xavier-uniform linear layers, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class PixioViT(nn.Module):
    """Pixio's pre-training model (pretraining/models_pixio.py, b83555d)."""

    def __init__(self, img_size=256, patch_size=16, in_chans=3, embed_dim=1280, depth=32,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=32, decoder_num_heads=16,
                 mlp_ratio=4.0, n_cls_tokens=8, mask_grid=4, norm_pix_loss=True):
        super().__init__()
        self.n_cls_tokens, self.mask_grid, self.norm_pix_loss = n_cls_tokens, mask_grid, \
            norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, n_cls_tokens, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + n_cls_tokens, embed_dim))
        self.blocks = nn.ModuleList([SelfAttentionBlock(embed_dim, num_heads, mlp_ratio)
                                     for _ in range(depth)])
        self.norm = _layer_norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + n_cls_tokens, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            SelfAttentionBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio)
            for _ in range(decoder_depth)])
        self.decoder_norm = _layer_norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        self.apply(_init_linear_and_norm)

    def patchify(self, imgs):
        return _patchify(imgs, self.patch_embed.patch_size[0])

    def random_masking(self, x, mask_ratio, grid):
        """Random masking of grid x grid units: noise per unit, each unit's patches row-major."""
        N, L, D = x.shape
        H = W = int(L**0.5)
        units = (H // grid) * (W // grid)
        len_keep = int(units * (1 - mask_ratio))
        noise = torch.rand(N, units, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        cells = torch.arange(H * W, device=x.device).view(H // grid, grid, W // grid, grid)
        cells = cells.permute(0, 2, 1, 3).reshape(units, grid * grid)  # unfold's unit order
        keep = cells[ids_shuffle[:, :len_keep]].reshape(N, -1)
        removed = cells[ids_shuffle[:, len_keep:]].reshape(N, -1)
        x_masked = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, D))
        ids_restore = torch.argsort(torch.cat([keep, removed], dim=1), dim=1)
        mask = torch.ones(N, H * W, device=x.device)
        mask[:, :keep.shape[1]] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, x, mask_ratio):
        P = self.n_cls_tokens
        x = self.patch_embed(x) + self.pos_embed[:, P:, :]
        cls_tokens = (self.cls_token + self.pos_embed[:, :P, :]).expand(x.shape[0], -1, -1)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, self.mask_grid)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        P = self.n_cls_tokens
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + P - x.shape[1], 1)
        x_ = torch.cat((x[:, P:, :], mask_tokens), dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat((x[:, :P, :], x_), dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, P:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6)**.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        return self.forward_loss(imgs, self.forward_decoder(latent, ids_restore), mask)


PIXIO_SIZES = {  # models_pixio.py's factories: (embed_dim, depth, num_heads); decoder 512x32h16
    "pixio_vith16_enc1280x32h16_dec512x32h16": (1280, 32, 16),
    "pixio_vit1b16_enc1536x48h24_dec512x32h16": (1536, 48, 24),
    "pixio_vit5b16_enc3072x48h32_dec512x32h16": (3072, 48, 32),
}


def pixio(name: str, **kwargs) -> PixioViT:
    embed_dim, depth, num_heads = PIXIO_SIZES[name]
    return PixioViT(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


def pixio_encoder_keys(model: PixioViT) -> dict:
    """The state dict of Pixio's released encoder (pixio/pixio.py): the pre-training model's
    without the decoder and mask token."""
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("decoder", "mask_token"))}


class CrossAttention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(decoder_dim, decoder_dim)
        self.kv = nn.Linear(encoder_dim, decoder_dim * 2)
        self.proj = nn.Linear(decoder_dim, decoder_dim)

    def forward(self, x, y):
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        kv = self.kv(y).reshape(B, y.shape[1], 2, self.num_heads, C // self.num_heads)
        k, v = kv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttentionBlock(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, num_heads, mlp_ratio, self_attn=False):
        super().__init__()
        self.self_attn = self_attn
        if self_attn:
            self.norm0 = _layer_norm(decoder_dim)
            self.self_attn = SelfAttention(decoder_dim, num_heads)
        self.norm1 = _layer_norm(decoder_dim)
        self.cross_attn = CrossAttention(encoder_dim, decoder_dim, num_heads)
        self.norm2 = _layer_norm(decoder_dim)
        self.mlp = Mlp(decoder_dim, int(decoder_dim * mlp_ratio))

    def forward(self, x, y):
        if self.self_attn:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class WeightedFeatureMaps(nn.Module):
    def __init__(self, k, decoder_depth):
        super().__init__()
        self.linear = nn.Linear(k, decoder_depth, bias=False)
        nn.init.normal_(self.linear.weight, mean=0.0, std=1.0 / math.sqrt(k))

    def forward(self, feature_maps):
        return self.linear(torch.stack(feature_maps, dim=-1))


class CrossMAEViT(nn.Module):
    """CrossMAE's MaskedAutoencoderViT (models_cross.py, ed0677a). As upstream, no `norm` is
    built: without weight_fm its forward_encoder fails."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_pix_loss=False, weight_fm=False, use_fm=(-1,),
                 use_input=False, self_attn=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([SelfAttentionBlock(embed_dim, num_heads, mlp_ratio)
                                     for _ in range(depth)])
        self.weight_fm, self.use_input = weight_fm, use_input
        use_fm = list(use_fm)
        self.use_fm = (list(range(depth)) if use_fm == [-1]
                       else [i if i >= 0 else depth + i for i in use_fm])
        if weight_fm:
            self.dec_norms = nn.ModuleList([_layer_norm(embed_dim) for _ in range(decoder_depth)])
            self.wfm = WeightedFeatureMaps(len(self.use_fm) + use_input, decoder_depth)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            CrossAttentionBlock(embed_dim, decoder_embed_dim, decoder_num_heads, mlp_ratio,
                                self_attn) for _ in range(decoder_depth)])
        self.decoder_norm = _layer_norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.norm_pix_loss = norm_pix_loss
        grid = (int(L**0.5),) * 2
        for table in (self.pos_embed, self.decoder_pos_embed):  # get_2d_sincos_pos_embed
            table.data.copy_(sincos_2d(table.shape[-1], grid, cls_token=True)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def patchify(self, imgs):
        return _patchify(imgs, self.patch_embed.patch_size[0])

    def random_masking(self, x, mask_ratio, kept_mask_ratio):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        len_masked = int(L * (mask_ratio - kept_mask_ratio))
        noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_masked = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :len_keep + len_masked] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, x, mask_ratio, kept_mask_ratio):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, kept_mask_ratio)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        features = [x] if self.use_input else []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if self.weight_fm and i in self.use_fm:
                features.append(x)
        if self.weight_fm:
            return features, mask, ids_restore, None
        return self.norm(x), mask, ids_restore, None  # upstream: no `norm` was built

    def mask_tokens_grid(self, mask, ids_restore):
        N = ids_restore.shape[0]
        x = self.decoder_pos_embed[:, 1:].masked_select(mask.bool().unsqueeze(-1))
        return x.reshape(N, -1, self.mask_token.shape[-1]) + self.mask_token

    def forward_decoder(self, y, mask, ids_restore, coords, mask_ratio, kept_mask_ratio):
        x = self.mask_tokens_grid(mask, ids_restore)
        if self.weight_fm:
            y = self.wfm(y)
        for i, blk in enumerate(self.decoder_blocks):
            x = blk(x, self.dec_norms[i](y[..., i]) if self.weight_fm else y)
        return self.decoder_pred(self.decoder_norm(x)), None

    def forward_loss(self, imgs, pred, mask, coords):
        target = self.patchify(imgs)
        target = target.masked_select(mask.bool().unsqueeze(-1)).reshape(
            target.shape[0], -1, target.shape[-1])
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6)**.5
        return ((pred - target) ** 2).mean(), target

    def forward(self, imgs, mask_ratio=0.75, kept_mask_ratio=0.75):
        latent, mask, ids_restore, coords = self.forward_encoder(imgs, mask_ratio,
                                                                 kept_mask_ratio)
        pred, _ = self.forward_decoder(latent, mask, ids_restore, coords, mask_ratio,
                                       kept_mask_ratio)
        return self.forward_loss(imgs, pred, mask, coords)[0]


CROSSMAE_SIZES = {  # models_cross.py's factories: encoder (dim, depth, heads), decoder (dim, heads)
    "mae_vit_small_patch16": (16, 384, 12, 6, 256, 8),
    "mae_vit_base_patch16": (16, 768, 12, 12, 512, 16),
    "mae_vit_large_patch16": (16, 1024, 24, 16, 512, 16),
    "mae_vit_huge_patch14": (14, 1280, 32, 16, 512, 16),
}


def crossmae(name: str, **kwargs) -> CrossMAEViT:
    p, dim, depth, heads, decoder_dim, decoder_heads = CROSSMAE_SIZES[name]
    return CrossMAEViT(patch_size=p, embed_dim=dim, depth=depth, num_heads=heads,
                       decoder_embed_dim=decoder_dim, decoder_num_heads=decoder_heads, **kwargs)
