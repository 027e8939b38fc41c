"""Fused kernels for Masked Autoencoder pre-training, as autograd-aware PyTorch custom ops.

    from mae_kernels import random_masking   # drop-in for the official MAE method

Each op lives in one module (kernel, launcher, CPU implementation, autograd, checked public
function); `reference` holds the plain-PyTorch semantics they are tested against.
"""
from . import reference
from ._checks import skip_index_checks
from .loss import mae_loss
from .masking import random_masking
from .patches import patchify, unpatchify
from .tokens import gather_tokens, scatter_tokens
from .unshuffling import unshuffle

__version__ = "0.1.0"

__all__ = [
    "gather_tokens",
    "mae_loss",
    "patchify",
    "random_masking",
    "reference",
    "scatter_tokens",
    "skip_index_checks",
    "unpatchify",
    "unshuffle",
]
