"""patchify / unpatchify: images (B, C, H, W) <-> patch tokens (B, L, p*p*C), each the other's
backward. Layout: patches row-major over the grid, (row, col, channel) inside a patch."""
from __future__ import annotations

import torch

from . import _checks, reference
from .backend import REFERENCE, TRITON, resolve


def _copy_fresh(value: torch.Tensor) -> torch.Tensor:
    # A custom op may not return a view of its input.
    return torch.empty(value.shape, dtype=value.dtype, device=value.device).copy_(value)


@torch.library.custom_op("mae_kernels::patchify", mutates_args=())
def _patchify_op(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    if resolve(imgs.device, has_extension_path=False) == TRITON:
        from .kernels.patchify import patchify_triton

        return patchify_triton(imgs, patch_size)
    return _copy_fresh(reference.patchify(imgs, patch_size))


@torch.library.custom_op("mae_kernels::unpatchify", mutates_args=())
def _unpatchify_op(x: torch.Tensor, patch_size: int, h: int, w: int,
                   channels: int) -> torch.Tensor:
    if resolve(x.device, has_extension_path=False) == TRITON:
        from .kernels.patchify import unpatchify_triton

        return unpatchify_triton(x, patch_size, h, w, channels)
    return _copy_fresh(reference.unpatchify(x, patch_size, (h, w), channels))


@_patchify_op.register_fake
def _(imgs, patch_size):
    B, C, H, W = imgs.shape
    return imgs.new_empty(B, (H // patch_size) * (W // patch_size), patch_size * patch_size * C)


@_unpatchify_op.register_fake
def _(x, patch_size, h, w, channels):
    return x.new_empty(x.shape[0], channels, h * patch_size, w * patch_size)


def _patchify_setup(ctx, inputs, output):
    imgs, patch_size = inputs
    ctx.patch_size = patch_size
    ctx.grid = (imgs.shape[2] // patch_size, imgs.shape[3] // patch_size)
    ctx.channels = imgs.shape[1]


def _patchify_backward(ctx, grad):
    h, w = ctx.grid
    return _unpatchify_op(grad, ctx.patch_size, h, w, ctx.channels), None


def _unpatchify_setup(ctx, inputs, output):
    ctx.patch_size = inputs[1]


def _unpatchify_backward(ctx, grad):
    return _patchify_op(grad, ctx.patch_size), None, None, None, None


_patchify_op.register_autograd(_patchify_backward, setup_context=_patchify_setup)
_unpatchify_op.register_autograd(_unpatchify_backward, setup_context=_unpatchify_setup)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), the official `einsum('nchpwq->nhwpqc')` layout."""
    _checks.tensor("imgs", imgs, 4, floating=True)
    _checks.patch_grid("imgs", imgs, patch_size)
    if resolve(imgs.device, has_extension_path=False) == REFERENCE:
        return reference.patchify(imgs, patch_size)
    return _patchify_op(imgs, patch_size)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None,
               channels: int = 3) -> torch.Tensor:
    """The exact inverse of `patchify`; a square grid when `grid` is None."""
    _checks.tensor("x", x, 3, floating=True)
    _checks.integer("patch_size", patch_size, 1)
    _checks.integer("channels", channels, 1)
    B, L, D = x.shape
    if grid is None:
        side = round(L**0.5)
        if side * side != L:
            raise ValueError(f"x has {L} patches, not a square grid: pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    _checks.integer("grid[0]", h, 1)
    _checks.integer("grid[1]", w, 1)
    if h * w != L:
        raise ValueError(f"grid {tuple(grid)} holds {h * w} patches but x has {L}")
    if D != patch_size * patch_size * channels:
        raise ValueError(
            f"x has {D} values per patch, expected patch_size**2 * channels = "
            f"{patch_size * patch_size * channels}"
        )
    if resolve(x.device, has_extension_path=False) == REFERENCE:
        return reference.unpatchify(x, patch_size, (h, w), channels)
    return _unpatchify_op(x, patch_size, h, w, channels)
