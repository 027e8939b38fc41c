"""CrossMAE (Fu, Lian et al., "Rethinking Patch Dependence for Masked Autoencoders";
TonyLianLong/CrossMAE models_cross.py and transformer_utils.py at commit ed0677a): the decoder's
queries are the mask token plus the position embedding of a subset of the masked patches only,
and they cross-attend to the encoder's features (optionally a learned mixture of several
encoder blocks' per decoder block, `weight_fm`) instead of self-attending over every token.
Parameter names are CrossMAE's, so its checkpoints load with strict=True.

On the fused ops: the three-way split of `masking_with_ids` (kept / masked, not predicted /
predicted, with `ids_pred`), `decoder_queries` (CrossMAE's `mask_tokens_grid` in one pass) and
`mae_loss` over the predicted subset (reading those patches only); attention through
F.scaled_dot_product_attention. `use_kernels=False` runs CrossMAE's sequence on the reference ops.

Where we differ: without weight_fm CrossMAE's encoder calls a `norm` it never builds (an
AttributeError); ours builds it (weight_fm=True, CrossMAE's released recipe, has none, as
theirs). The class token gets the position embedding's cls row added, as MAE's; in CrossMAE's
sin-cos table that row is zero, so the values are CrossMAE's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import mae_kernels
from mae_kernels import masking, reference

from .image import MAE, Attention, Mlp, Output, resolve_config


class CrossAttention(nn.Module):
    """Queries from the decoder (q), keys and values from the encoder's features (kv)."""

    def __init__(self, encoder_dim: int, decoder_dim: int, num_heads: int):
        super().__init__()
        if decoder_dim % num_heads:
            raise ValueError(f"dim {decoder_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(decoder_dim, decoder_dim)
        self.kv = nn.Linear(encoder_dim, decoder_dim * 2)
        self.proj = nn.Linear(decoder_dim, decoder_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        heads, width = self.num_heads, C // self.num_heads
        q = self.q(x).reshape(B, N, heads, width).transpose(1, 2)
        k, v = self.kv(y).reshape(B, y.shape[1], 2, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttentionBlock(nn.Module):
    """CrossMAE's decoder block: [self-attention,] cross-attention to the encoder, MLP; pre-norm."""

    grad_checkpointing = False  # as Block's (mae.train.fsdp.set_grad_checkpointing)

    def __init__(self, encoder_dim: int, decoder_dim: int, num_heads: int, mlp_ratio: float,
                 norm_layer, self_attn: bool = False):
        super().__init__()
        if self_attn:
            self.norm0 = norm_layer(decoder_dim)
            self.self_attn = Attention(decoder_dim, num_heads)
        self.norm1 = norm_layer(decoder_dim)
        self.cross_attn = CrossAttention(encoder_dim, decoder_dim, num_heads)
        self.norm2 = norm_layer(decoder_dim)
        self.mlp = Mlp(decoder_dim, int(decoder_dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, y, use_reentrant=False)
        return self._forward(x, y)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "self_attn"):
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class WeightedFeatureMaps(nn.Module):
    """k encoder feature maps -> one weighted sum per decoder block: (B, T, D, depth)."""

    def __init__(self, k: int, decoder_depth: int):
        super().__init__()
        self.linear = nn.Linear(k, decoder_depth, bias=False)

    def forward(self, feature_maps: list[torch.Tensor]) -> torch.Tensor:
        return self.linear(torch.stack(feature_maps, dim=-1))


class CrossMAE(MAE):
    """`CrossMAE({... "decoder": "cross", "predict_ratio": 0.25, "weight_fm": True, ...})`: the
    config keys of `MAE` (mae.DEFAULT_CONFIG, CrossMAE's documented there). `forward(imgs,
    mask_ratio, noise)` returns `loss, reconstructed, mask` as MAE's, with `mask` 1 on the
    predicted patches only and `reconstructed` the prediction of those (zero elsewhere)."""

    DECODER = "cross"

    def __init__(self, config: dict | None = None, **overrides):
        config = resolve_config({**(config or {}), **overrides, "decoder": "cross"})
        # read by build_decoder_blocks, during MAE's constructor
        self.weight_fm, self.use_input = config["weight_fm"], config["use_input"]
        self.self_attn = config["self_attn"]
        super().__init__(config)
        depth, use_fm = config["encoder_layers"], config["use_fm"]
        # CrossMAE's [-1] (its default) means every block, as None does here
        self.use_fm = (list(range(depth)) if use_fm in (None, [-1])
                       else sorted({i % depth for i in use_fm}))
        self.predict_ratio = config["predict_ratio"]
        del self.decoder_embed  # the queries are built in the decoder's width
        if self.weight_fm:
            del self.norm  # each decoder block normalises its own mixture (dec_norms)
            encoder_dim, blocks = self.config["encoder_dim"], self.config["decoder_layers"]
            self.dec_norms = nn.ModuleList([nn.LayerNorm(encoder_dim, eps=self.config["norm_eps"])
                                            for _ in range(blocks)])
            self.wfm = WeightedFeatureMaps(len(self.use_fm) + self.use_input, blocks)
            # CrossMAE draws wfm's weights N(0, 1/k), then its xavier pass redraws them
            self.dec_norms.apply(self._init_weights)
            self.wfm.apply(self._init_weights)

    def build_decoder_blocks(self, embed_dim, decoder_dim, depth, num_heads, mlp_ratio,
                             norm_layer) -> nn.ModuleList:
        return nn.ModuleList([CrossAttentionBlock(embed_dim, decoder_dim, num_heads, mlp_ratio,
                                                  norm_layer, self.self_attn)
                              for _ in range(depth)])

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """With weight_fm there is no trained `norm`: a fresh one (weight 1, bias 0), as the
        fine-tuned ViT's head starts from."""
        if self.weight_fm:
            return F.layer_norm(x, x.shape[-1:], eps=self.config["norm_eps"])
        return self.norm(x)

    def _predict_ratio(self, mask_ratio: float) -> float:
        return mask_ratio if self.predict_ratio is None else self.predict_ratio

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise=None):
        """(features: the normalised last block's, or with weight_fm the list of the chosen
        blocks' (and the input), mask (1 on the predicted patches), ids_restore, ids_pred)."""
        self._check_imgs(imgs)
        P, ratio = self.n_cls_tokens, self._predict_ratio(mask_ratio)
        if self.use_kernels:
            patches, mask, ids_restore, ids_keep, ids_pred = masking.masking_with_ids(
                self.patchify(imgs), mask_ratio, noise, mask_grid=self.mask_grid,
                grid=self.grid_size, predict_ratio=ratio)
            x = self.patch_embed.embed_patches(patches) + self.pos_embed[0, P:][ids_keep]
        else:
            x = self.patch_embed(imgs) + self.pos_embed[:, P:, :]
            x, mask, ids_restore, ids_pred = self._reference_masking(x, mask_ratio, ratio, noise)
        x = self._with_cls_tokens(x)
        features = [x] if self.use_input else []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if self.weight_fm and i in self.use_fm:
                features.append(x)
        return (features if self.weight_fm else self.norm(x)), mask, ids_restore, ids_pred

    def _reference_masking(self, x, mask_ratio, predict_ratio, noise):
        """CrossMAE's random_masking (Pixio's units first where mask_grid > 1), and the
        predicted positions in CrossMAE's masked_select order."""
        if self.mask_grid == 1:
            x, mask, ids_restore = reference.crossmae_masking(x, mask_ratio, predict_ratio, noise)
        else:
            x, mask, ids_restore = reference.pixio_masking(x, mask_ratio, self.mask_grid, noise,
                                                           self.grid_size)
            units = mask.shape[1] // self.mask_grid**2
            kept = masking.keep_count(units, mask_ratio)
            predicted = masking.predicted_count(units, mask_ratio, predict_ratio, kept) \
                * self.mask_grid**2
            order = torch.argsort(ids_restore, dim=1)
            mask = torch.zeros_like(mask).scatter_(1, order[:, -predicted:], 1)
        B, L = mask.shape
        ids_pred = torch.arange(L, device=x.device).expand(B, L).masked_select(mask.bool())
        return x, mask, ids_restore, ids_pred.view(B, -1)

    def forward_decoder(self, features, ids_pred: torch.Tensor) -> torch.Tensor:
        """The predictions (B, N, p*p*C) of the predicted patches ids_pred."""
        args = (self.mask_token, self.decoder_pos_embed, ids_pred, self.n_cls_tokens)
        if self.use_kernels:
            with mae_kernels.skip_index_checks():  # ids_pred comes from the model's masking
                x = mae_kernels.decoder_queries(*args)
        else:
            x = reference.decoder_queries(*args)
        if self.weight_fm:
            mixtures = self.wfm(features)
        for i, blk in enumerate(self.decoder_blocks):
            x = blk(x, self.dec_norms[i](mixtures[..., i]) if self.weight_fm else features)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                     ids_pred: torch.Tensor) -> torch.Tensor:
        if self.use_kernels:
            with mae_kernels.skip_index_checks():
                return mae_kernels.mae_loss(imgs, pred, None, self.patch_size,
                                            self.norm_pix_loss, ids_pred=ids_pred)
        return reference.predicted_loss(imgs, pred, ids_pred, self.patch_size,
                                        self.norm_pix_loss)

    def _predict(self, imgs: torch.Tensor, mask_ratio: float, noise=None):
        features, mask, _, ids_pred = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(features, ids_pred)
        return self.forward_loss(imgs, pred, ids_pred), pred, mask, ids_pred

    def predict(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise=None):
        """(loss, pred (B, L, p*p*C), mask (B, L)) as MAE's: pred holds the predicted patches
        (mask 1) in place and zeros elsewhere, as CrossMAE's visualisation lays them out."""
        loss, pred, mask, ids_pred = self._predict(imgs, mask_ratio, noise)
        return loss, reference.scatter_tokens(pred, ids_pred, mask.shape[1]), mask

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise=None) -> Output:
        """`loss, reconstructed, mask`; `reconstructed` (read on demand) as `predict` lays the
        prediction out, as an image."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        loss, pred, mask, ids_pred = self._predict(imgs, ratio, noise)
        length = mask.shape[1]

        def to_image(pred):
            return self.unpatchify(reference.scatter_tokens(pred, ids_pred, length))

        return Output(loss, pred, mask, to_image)


# CrossMAE's recipe in the model (its README's pre-training command): 12 cross-attention
# decoder blocks reading weighted feature maps of every encoder block and the input, 25% of the
# patches predicted (of the 75% masked), normalised pixel targets. Sizes: models_cross.py's.
CROSSMAE = dict(decoder="cross", decoder_layers=12, weight_fm=True, use_input=True,
                predict_ratio=0.25, norm_pix_loss=True)
CROSSMAE_CONFIGS = {
    "crossmae_vit_small_patch16": dict(CROSSMAE, encoder_dim=384, encoder_layers=12,
                                       encoder_heads=6, decoder_dim=256, decoder_heads=8),
    "crossmae_vit_base_patch16": dict(CROSSMAE, encoder_dim=768, encoder_layers=12,
                                      encoder_heads=12, decoder_dim=512, decoder_heads=16),
    "crossmae_vit_large_patch16": dict(CROSSMAE, encoder_dim=1024, encoder_layers=24,
                                       encoder_heads=16, decoder_dim=512, decoder_heads=16),
    "crossmae_vit_huge_patch14": dict(CROSSMAE, patch_size=14, encoder_dim=1280,
                                      encoder_layers=32, encoder_heads=16, decoder_dim=512,
                                      decoder_heads=16),
    # for CPU work: mae_vit_tiny_patch16's encoder and decoder width and depth
    "crossmae_vit_tiny_patch16": dict(CROSSMAE, encoder_dim=192, encoder_layers=12,
                                      encoder_heads=3, decoder_dim=128, decoder_layers=2,
                                      decoder_heads=4),
}
# CrossMAE's constructor arguments -> our config keys
UPSTREAM_ARGUMENTS = {"decoder_depth": "decoder_layers", "kept_mask_ratio": "predict_ratio",
                      "img_size": "img_size", "norm_pix_loss": "norm_pix_loss",
                      "weight_fm": "weight_fm", "use_fm": "use_fm", "use_input": "use_input",
                      "self_attn": "self_attn", "use_kernels": "use_kernels"}


def _factory(name: str):
    def build(**kwargs) -> CrossMAE:
        """The named CrossMAE with CrossMAE's constructor arguments (decoder_depth, weight_fm,
        use_fm, use_input, self_attn, img_size, norm_pix_loss; and kept_mask_ratio) as
        overrides."""
        unknown = sorted(set(kwargs) - set(UPSTREAM_ARGUMENTS))
        if unknown:
            raise TypeError(f"{name}() got unexpected arguments {unknown}; it takes "
                            f"{sorted(UPSTREAM_ARGUMENTS)}")
        overrides = {UPSTREAM_ARGUMENTS[k]: v for k, v in kwargs.items()}
        return CrossMAE({**CROSSMAE_CONFIGS[name], **overrides})

    build.__name__ = build.__qualname__ = name
    return build


crossmae_vit_small_patch16 = _factory("crossmae_vit_small_patch16")
crossmae_vit_base_patch16 = _factory("crossmae_vit_base_patch16")
crossmae_vit_large_patch16 = _factory("crossmae_vit_large_patch16")
crossmae_vit_huge_patch14 = _factory("crossmae_vit_huge_patch14")
crossmae_vit_tiny_patch16 = _factory("crossmae_vit_tiny_patch16")

CROSSMAE_MODELS = {name: globals()[name] for name in CROSSMAE_CONFIGS}
