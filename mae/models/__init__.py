"""The models: MAE on images (`image`, official parameter names and initialisation), Pixio's
(`pixio`: MAE with its options) and CrossMAE (`crossmae`: the cross-attention decoder), VideoMAE
on clips (`video`), and their fixed sin-cos positions (`pos_embed`). Above mae_kernels only."""
from .crossmae import CROSSMAE_CONFIGS, CROSSMAE_MODELS, CrossMAE
from .image import (
    DEFAULT_CONFIG,
    MAE,
    MODEL_CONFIGS,
    MODELS,
    MaskedAutoencoderViT,
    is_video,
    mae_vit_base_patch16,
    mae_vit_giant_patch14,
    mae_vit_gigantic_patch14,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_small_patch16,
    mae_vit_tiny_patch16,
)
from .pixio import PIXIO_CONFIGS, PIXIO_MODELS
from .pos_embed import interpolate_pos_embed
from .video import (
    VIDEO_MODEL_CONFIGS,
    VideoMAE,
    mae_videomae_base_patch16,
    mae_videomae_small_patch16,
    mae_videomae_tiny_patch16,
)

# every named image model, for `mae pretrain --model` and the checkpoints that name one
MODEL_CONFIGS.update(PIXIO_CONFIGS, **CROSSMAE_CONFIGS)
MODELS.update(PIXIO_MODELS, **CROSSMAE_MODELS)


def build_model(config: dict):
    """The model a resolved config describes: VideoMAE for video configs, CrossMAE for the
    cross-attention decoder, else MAE (Pixio's models too)."""
    if is_video(config):
        return VideoMAE(config)
    return CrossMAE(config) if config.get("decoder") == "cross" else MAE(config)


__all__ = [
    "DEFAULT_CONFIG",
    "CrossMAE",
    "MAE",
    "MODELS",
    "MODEL_CONFIGS",
    "MaskedAutoencoderViT",
    "VIDEO_MODEL_CONFIGS",
    "VideoMAE",
    "build_model",
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
