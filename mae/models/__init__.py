"""The models: MAE on images (`image`, official parameter names and initialisation), VideoMAE on
clips (`video`), and their fixed sin-cos positions (`pos_embed`). Above mae_kernels only."""
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
from .pos_embed import interpolate_pos_embed
from .video import (
    VIDEO_MODEL_CONFIGS,
    VideoMAE,
    mae_videomae_base_patch16,
    mae_videomae_small_patch16,
    mae_videomae_tiny_patch16,
)


def build_model(config: dict):
    """The model a resolved config describes: VideoMAE for video configs, else MAE."""
    return VideoMAE(config) if is_video(config) else MAE(config)


__all__ = [
    "DEFAULT_CONFIG",
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
