"""Fixed sine-cosine positional embeddings: 2D (the MAE paper's), 3D for video, and their
interpolation when a checkpoint is loaded at another resolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): sin of position * frequency, then cos; float64."""
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """(h*w [+1], dim) float32 table: the first half encodes the column, the second the row,
    as the official code's meshgrid order gives; a zero row first for the cls token."""
    if dim % 4:
        raise ValueError(f"embedding dim must be a multiple of 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """(T*h*w, dim) float32 table for a (frames, rows, columns) grid of tubelets, frame-major: a
    quarter of the channels encodes the frame (1D sin-cos), the rest the position in the frame
    (sincos_2d), so every frame shares the image model's spatial code."""
    if dim % 16:
        raise ValueError(f"embedding dim must be a multiple of 16 for 3D sin-cos, got {dim}")
    frames, h, w = grid
    time = sincos_1d(dim // 4, torch.arange(frames)).float()
    space = sincos_2d(dim - dim // 4, (h, w))
    return torch.cat([time[:, None].expand(-1, h * w, -1),
                      space[None].expand(frames, -1, -1)], dim=2).reshape(frames * h * w, dim)


def interpolate_pos_embed(model, state_dict: dict, keys=("pos_embed", "decoder_pos_embed")):
    """Resize the positional embeddings in `state_dict` (in place) to `model`'s patch grid
    (`model.patch_embed.grid_size`: ours and timm's ViT), bicubically, keeping the prefix (cls)
    tokens; as the official `interpolate_pos_embed`."""
    new_h, new_w = model.patch_embed.grid_size
    for key in keys:
        if key not in state_dict or not hasattr(model, key):
            continue
        old = state_dict[key]
        target = getattr(model, key)
        prefix = target.shape[1] - new_h * new_w
        old_tokens = old.shape[1] - prefix
        if old.shape[1] == target.shape[1]:
            continue
        old_side = round(old_tokens**0.5)
        if old_side * old_side != old_tokens:
            raise ValueError(f"{key} in the checkpoint holds {old_tokens} patches, not a square "
                             "grid; rebuild it with sincos_2d instead")
        dim = old.shape[-1]
        grid = old[:, prefix:].reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(new_h, new_w), mode="bicubic",
                             align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(old.dtype)
        state_dict[key] = torch.cat([old[:, :prefix], grid], dim=1)
    return state_dict
