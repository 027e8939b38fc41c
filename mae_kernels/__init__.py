"""Fused kernels for Masked Autoencoder pre-training, as autograd-aware PyTorch custom ops.

    from mae_kernels import random_masking   # drop-in for the official MAE method

Each op lives in one module (kernel, launcher, CPU implementation, autograd, checked public
function); `reference` holds the plain-PyTorch semantics they are tested against.
"""
from . import reference
from ._checks import skip_index_checks
from .augment import random_resized_crop_boxes, resized_crop, step_generator
from .hog import hog_targets
from .loss import mae_loss
from .masking import block_masking, grid_masking, random_masking, tube_masking
from .patches import patchify, patchify3d, unpatchify, unpatchify3d
from .tokens import gather_tokens, scatter_tokens
from .unshuffling import unshuffle

__version__ = "0.1.0"

__all__ = [
    "block_masking",
    "gather_tokens",
    "grid_masking",
    "hog_targets",
    "mae_loss",
    "patchify",
    "patchify3d",
    "random_masking",
    "random_resized_crop_boxes",
    "reference",
    "resized_crop",
    "scatter_tokens",
    "skip_index_checks",
    "step_generator",
    "tube_masking",
    "unpatchify",
    "unpatchify3d",
    "unshuffle",
]
