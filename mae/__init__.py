"""Masked Autoencoder model, training and evaluation built on mae_kernels."""
from .models import (
    DEFAULT_CONFIG,
    MAE,
    MODEL_CONFIGS,
    MODELS,
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_giant_patch14,
    mae_vit_gigantic_patch14,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_small_patch16,
    mae_vit_tiny_patch16,
)
from .pos_embed import interpolate_pos_embed
from .video import (
    VIDEO_MODEL_CONFIGS,
    VideoMAE,
    mae_videomae_base_patch16,
    mae_videomae_small_patch16,
    mae_videomae_tiny_patch16,
)

__all__ = [
    "DEFAULT_CONFIG",
    "MAE",
    "MODELS",
    "MODEL_CONFIGS",
    "MaskedAutoencoderViT",
    "VIDEO_MODEL_CONFIGS",
    "VideoMAE",
    "interpolate_pos_embed",
    "mae_videomae_base_patch16",
    "mae_videomae_small_patch16",
    "mae_videomae_tiny_patch16",
    "mae_vit_base_patch16",
    "mae_vit_giant_patch14",
    "mae_vit_gigantic_patch14",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_small_patch16",
    "mae_vit_tiny_patch16",
]
