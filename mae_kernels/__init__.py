"""Fused kernels for Masked Autoencoder pre-training, as autograd-aware PyTorch custom ops.

    from mae_kernels import random_masking   # drop-in for the official MAE method

Each op lives in one module (kernel, launcher, CPU implementation, autograd, checked public
function); `reference` holds the plain-PyTorch semantics they are tested against.
"""
from . import reference
from ._checks import skip_index_checks
from ._version import __version__ as __version__
from .augment import random_resized_crop_boxes, resized_crop, step_generator
from .hog import hog_targets
from .loss import mae_loss
from .masking import (
    block_masking,
    crossmae_masking,
    grid_masking,
    pixio_masking,
    random_masking,
    tube_masking,
)
from .patches import patchify, patchify3d, unpatchify, unpatchify3d
from .queries import decoder_queries
from .tokens import gather_tokens, scatter_tokens
from .unshuffling import unshuffle

__all__ = [
    "block_masking",
    "crossmae_masking",
    "decoder_queries",
    "gather_tokens",
    "grid_masking",
    "hog_targets",
    "mae_loss",
    "patchify",
    "patchify3d",
    "pixio_masking",
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
