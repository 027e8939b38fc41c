"""Fused kernels for Masked Autoencoder pre-training, as autograd-aware PyTorch custom ops.

    from mae_kernels import random_masking   # drop-in for the official MAE method
"""
from . import reference
from ._checks import skip_index_checks
from .backend import BACKENDS, current_backend, use_backend
from .loss import mae_loss
from .masking import random_masking
from .patchify import patchify, unpatchify
from .tokens import gather_tokens, scatter_tokens
from .unshuffle import unshuffle

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "current_backend",
    "gather_tokens",
    "mae_loss",
    "patchify",
    "random_masking",
    "reference",
    "scatter_tokens",
    "skip_index_checks",
    "unpatchify",
    "unshuffle",
    "use_backend",
]
