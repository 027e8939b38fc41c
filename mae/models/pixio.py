"""Pixio (Yang et al., "In Pursuit of Pixel Supervision for Visual Pre-training";
facebookresearch/pixio pretraining/models_pixio.py at commit b83555d): MAE with 8 class tokens,
random masking in 4x4 units of patches, learned position embeddings, a 32-block 512-wide decoder,
256 px images and stochastic depth in the encoder. It is `MaskedAutoencoderViT` with those
options (parameter names as Pixio's `PixioViT`, so its checkpoints load with strict=True);
this module names Pixio's models, with Pixio's factory names and sizes.

Pixio's released encoders (pixio/pixio.py: `pixio_vit{b,l,h,1b,5b}16`) hold the encoder's
weights only, under the same names (cls_token (1, 8, D), pos_embed, patch_embed, blocks, norm).
"""
from __future__ import annotations

from .image import _factory

# Pixio's recipe in the model (pretraining/scripts/*.sh): 8 cls tokens, 4x4 masking units,
# normalised pixel targets; its models' learned position embeddings; 256 px images.
PIXIO = dict(img_size=256, patch_size=16, n_cls_tokens=8, mask_grid=4, pos_embed="learned",
             norm_pix_loss=True, decoder_dim=512, decoder_layers=32, decoder_heads=16)
PIXIO_CONFIGS = {
    "pixio_vith16_enc1280x32h16_dec512x32h16": dict(PIXIO, encoder_dim=1280, encoder_layers=32,
                                                    encoder_heads=16),
    "pixio_vit1b16_enc1536x48h24_dec512x32h16": dict(PIXIO, encoder_dim=1536, encoder_layers=48,
                                                     encoder_heads=24),
    "pixio_vit5b16_enc3072x48h32_dec512x32h16": dict(PIXIO, encoder_dim=3072, encoder_layers=48,
                                                     encoder_heads=32),
    # Pixio-shaped small models for CPU work (not Pixio's): ViT-Tiny / ViT-S encoders with a
    # decoder as deep as the encoder (Pixio's H/16: 32 and 32 blocks)
    "pixio_vit_tiny_patch16": dict(PIXIO, encoder_dim=192, encoder_layers=12, encoder_heads=3,
                                   decoder_dim=128, decoder_layers=12, decoder_heads=4),
    "pixio_vit_small_patch16": dict(PIXIO, encoder_dim=384, encoder_layers=12, encoder_heads=6,
                                    decoder_dim=256, decoder_layers=12, decoder_heads=8),
}

pixio_vith16_enc1280x32h16_dec512x32h16 = _factory("pixio_vith16_enc1280x32h16_dec512x32h16")
pixio_vit1b16_enc1536x48h24_dec512x32h16 = _factory("pixio_vit1b16_enc1536x48h24_dec512x32h16")
pixio_vit5b16_enc3072x48h32_dec512x32h16 = _factory("pixio_vit5b16_enc3072x48h32_dec512x32h16")
pixio_vit_tiny_patch16 = _factory("pixio_vit_tiny_patch16")
pixio_vit_small_patch16 = _factory("pixio_vit_small_patch16")

PIXIO_MODELS = {name: globals()[name] for name in PIXIO_CONFIGS}
