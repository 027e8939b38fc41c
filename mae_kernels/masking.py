"""The masking family: random_masking (the official method), tube_masking (VideoMAE: one spatial
mask shared by every frame), block_masking (BEiT's block-wise rectangles), grid_masking (the
MAE paper's regular grid), pixio_masking (Pixio's random masking of g x g units of patches) and
crossmae_masking (CrossMAE's three-way split: kept / masked, not predicted / predicted). Each
returns what the official random_masking returns,
`(x_masked, mask, ids_restore)`, with exactly `len_keep` tokens per sample (per frame for tube),
so the model and `unshuffle` stay the same.

All are one op: a spatial order of the S tokens of a frame (kept first), then the same
writes and gather for every one of `frames` frames. The strategies differ only in the sort key:
- random / tube / crossmae: the noise;
- block: whether a rectangle covers the token, then the noise (see `reference.block_cover`);
- grid: whether the token is off the grid, then its position;
- units (Pixio): the noise of the token's g x g unit, then the unit, then the token's
  row-major place in it (Pixio's order: each kept unit's g*g patches together).
The op also returns `ids_keep` (the kept positions, in keep order); its backward scatters the
gradient back through it with the extension's `scatter_tokens`, without a second sort. With
`num_predicted` >= 0 (CrossMAE) the mask marks only the last `num_predicted` tokens of each
frame's order, and `ids_pred` lists them in position order (CrossMAE's `masked_select` order,
which the decoder queries and the loss read); the kernel sorts them with a second, short sort.

Triton (CUDA): two kernels. `_masking_kernel` (one program per sample) sorts the row's keys and
writes ids_restore / mask / ids_keep for every frame; `_gather_kept_kernel` then copies the kept
rows, in tiles sized by the kept count (not by S) and slices of D (up to COLUMNS_PER_PROGRAM
columns, in tiles of BLOCK_D), so each sort runs once per sample and the copy fills the GPU.
Keys pack the order-preserving bits of the float32 noise above the token index, so one unsigned
sort is stable and orders negatives, zeros and NaN (last) as torch.argsort does. Rows longer than
MAX_FUSED_L, or noise whose order float32 cannot hold (float64, integers), sort with torch.sort
and gather with the extension.
CPU: torch.sort, then the extension's gather.

Kept counts: image MAE keeps `int(L * (1 - mask_ratio))` (`keep_count`, the MAE code); VideoMAE's
tube masking keeps `S - int(S * mask_ratio)` per frame (`tube_keep_count`, its
TubeMaskingGenerator): 20 of 196 at 90%, where the MAE rule gives 19.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton
from .tokens import gather_op, scatter_op

MAX_FUSED_L = 4096
TILE_ELEMENTS = 8192  # BLOCK_R x BLOCK_D values gathered per tile
TILE_ROWS = 64  # kept rows per gather program, at most
COLUMNS_PER_PROGRAM = 256
# the strategies; tube is RANDOM over several frames, crossmae RANDOM with num_predicted
RANDOM, BLOCK, GRID, UNITS = 0, 1, 2, 3


@triton.jit
def _sortable_bits(noise):
    """float32 -> uint32 whose unsigned order is the float order: -0.0 ties with 0.0, and every
    NaN maps to the top, as in torch.sort."""
    bits = tl.where(noise == 0.0, 0.0, noise).to(tl.uint32, bitcast=True)
    # NOTE: `bits ^ 0xFFFFFFFF`, not `~bits`: the interpreters of triton 3.6-3.8 build `~` on
    # uint32 from the constant -1, which NumPy 2 rejects (OverflowError); compiled code is the same.
    flipped = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return tl.where(noise != noise, 0xFFFFFFFF, flipped)


@triton.jit
def _block_mask(draws_ptr, attempts, pos, in_row, grid_h, grid_w, num_mask, min_patches):
    """reference.block_cover for one row, every token of the row at once (one attempt per
    loop step). NOTE: sqrt_rn / div_rn, not sqrt and `/`: the GPU's defaults are approximate,
    and one ulp can change a rounded side and so the mask; the correctly rounded ones give the
    reference's float32 results bit for bit."""
    row = pos // grid_w
    col = pos % grid_w
    blocked = pos < 0
    count = num_mask * 0
    attempt = 0
    # Once num_mask tokens are covered every later attempt draws area 0 and is rejected, so
    # stopping there gives the reference's cover (which makes all of them).
    while (attempt < attempts) & (count < num_mask):
        u_area = tl.load(draws_ptr + attempt * 4)
        aspect = tl.load(draws_ptr + attempt * 4 + 1)
        u_top = tl.load(draws_ptr + attempt * 4 + 2)
        u_left = tl.load(draws_ptr + attempt * 4 + 3)
        remaining = num_mask - count
        lo = tl.minimum(min_patches, remaining)
        area = lo + tl.floor(u_area * (remaining - lo + 1).to(tl.float32)).to(tl.int32)
        area = tl.minimum(area, remaining).to(tl.float32)
        h = tl.floor(tl.sqrt_rn(area * aspect) + 0.5).to(tl.int32)
        w = tl.floor(tl.sqrt_rn(tl.div_rn(area, aspect)) + 0.5).to(tl.int32)
        top = tl.minimum(tl.floor(u_top * (grid_h - h + 1).to(tl.float32)).to(tl.int32),
                         grid_h - h)
        left = tl.minimum(tl.floor(u_left * (grid_w - w + 1).to(tl.float32)).to(tl.int32),
                          grid_w - w)
        inside = (in_row & (row >= top) & (row < top + h) & (col >= left)
                  & (col < left + w))
        new = tl.sum((inside & (blocked == 0)).to(tl.int32), axis=0)
        accept = ((h >= 1) & (w >= 1) & (h < grid_h) & (w < grid_w) & (new > 0)
                  & (new <= remaining))
        blocked = blocked | (inside & accept)
        count += tl.where(accept, new, 0)
        attempt += 1
    return blocked


@triton.jit
def _masking_kernel(noise_ptr, draws_ptr, offsets_ptr, mask_ptr, ids_restore_ptr, ids_keep_ptr,
                    ids_pred_ptr, S, K, first_masked, frames, grid_w, attempts, num_mask, param,
                    stride_nb, STRATEGY: tl.constexpr, PREDICT: tl.constexpr,
                    BLOCK_L: tl.constexpr):
    """One sample's order: sort its keys, write ids_restore, mask (ranks >= first_masked) and
    ids_keep of every frame, and with PREDICT ids_pred (the masked tokens, in position order)."""
    b = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK_L)
    in_row = pos < S
    index = pos.to(tl.uint64)  # the low bits of every key: a stable sort
    if STRATEGY == 2:  # grid: kept tokens first, in position order; param = keep_every
        offset_row = tl.load(offsets_ptr + b * 2)
        offset_col = tl.load(offsets_ptr + b * 2 + 1)
        on_grid = (((pos // grid_w) % param == offset_row)
                   & ((pos % grid_w) % param == offset_col))
        keys = (tl.where(on_grid & in_row, 0, 1).to(tl.uint64) << 32) | index
    else:
        if STRATEGY == 3:  # units: param = g; each token sorts by its unit's noise, then by its
            # unit-major index (unit, then row-major in the unit), decoded after the sort
            units_w = grid_w // param
            unit = (pos // grid_w // param) * units_w + (pos % grid_w) // param
            within = ((pos // grid_w) % param) * param + (pos % grid_w) % param
            noise = tl.load(noise_ptr + b * stride_nb + unit, mask=in_row, other=0.0)
            index = tl.where(in_row, unit * param * param + within, pos).to(tl.uint64)
        else:
            noise = tl.load(noise_ptr + b * stride_nb + pos, mask=in_row, other=0.0)
        bits = tl.where(in_row, _sortable_bits(noise.to(tl.float32)), 0xFFFFFFFF).to(tl.uint64)
        if STRATEGY == 1:  # block: uncovered tokens first, each part in noise order
            blocked = _block_mask(draws_ptr + b * attempts * 4, attempts, pos, in_row,
                                  S // grid_w, grid_w, num_mask, param)
            covered = tl.where(blocked | (in_row == 0), 1, 0).to(tl.uint64)
            keys = (covered << 63) | (bits << 31) | index
        else:
            keys = (bits << 32) | index
    ids_shuffle = (tl.sort(keys) & 0x7FFFFFFF).to(tl.int64)  # ids_shuffle[j]: the token of rank j
    if STRATEGY == 3:  # unit-major index -> position
        units_w = grid_w // param
        unit = ids_shuffle // (param * param)
        within = ids_shuffle % (param * param)
        ids_shuffle = (((unit // units_w) * param + within // param) * grid_w
                       + (unit % units_w) * param + within % param)
    keep = pos < K
    length = frames * S
    num_pred = S - first_masked
    if PREDICT:  # the predicted tokens first, in position order
        predicted = tl.where(in_row & (pos >= first_masked), 0, 1).to(tl.uint64)
        ids_pred = (tl.sort((predicted << 32) | ids_shuffle.to(tl.uint64))
                    & 0x7FFFFFFF).to(tl.int64)
    # NOTE: `while`, not `for t in range(frames)`: the interpreter of triton 3.6 turns a range
    # over a scalar argument (a 1-element array there) into int(), which NumPy >= 2.3 rejects.
    t = 0
    while t < frames:
        token = t * S + ids_shuffle
        rank = tl.where(keep, t * K + pos, frames * K + t * (S - K) + pos - K)
        tl.store(ids_restore_ptr + b * length + token, rank.to(tl.int64), mask=in_row)
        tl.store(mask_ptr + b * length + token,
                 (pos >= first_masked).to(mask_ptr.dtype.element_ty), mask=in_row)
        tl.store(ids_keep_ptr + b * frames * K + t * K + pos, token, mask=keep)
        if PREDICT:
            tl.store(ids_pred_ptr + (b * frames + t) * num_pred + pos, t * S + ids_pred,
                     mask=pos < num_pred)
        t += 1


@triton.jit
def _gather_kept_kernel(x_ptr, ids_keep_ptr, out_ptr, R, D, stride_xb, stride_xl,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, D_TILES: tl.constexpr):
    """out[b, r] = x[b, ids_keep[b, r]] for BLOCK_R of the R kept rows and one slice of D."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = rows < R
    tokens = tl.load(ids_keep_ptr + b * R + rows, mask=in_rows, other=0)
    src_rows = x_ptr + b * stride_xb + tokens[:, None] * stride_xl
    dst_rows = out_ptr + (b * R + rows)[:, None] * D
    for tile_index in range(D_TILES):
        cols = (tl.program_id(2) * D_TILES + tile_index) * BLOCK_D + tl.arange(0, BLOCK_D)
        tile = in_rows[:, None] & (cols < D)[None, :]
        values = tl.load(src_rows + cols[None, :], mask=tile)
        tl.store(dst_rows + cols[None, :], values, mask=tile)


def _spatial_order(noise, draws, offsets, S: int, len_keep: int, grid_w: int, strategy: int,
                   param: int) -> torch.Tensor:
    """ids_shuffle (B, S) of one frame: the kernel's sort, in PyTorch."""
    if strategy == GRID:
        pos = torch.arange(S, device=offsets.device)
        on_grid = (((pos // grid_w) % param == offsets[:, :1])
                   & ((pos % grid_w) % param == offsets[:, 1:]))
        return torch.sort((~on_grid).to(torch.uint8), dim=1, stable=True).indices
    order = torch.sort(noise, dim=1, stable=True).indices
    if strategy == UNITS:  # units in noise order, each unit's g*g positions row-major
        g, h = param, S // grid_w
        cells = torch.arange(S, device=noise.device).view(h // g, g, grid_w // g, g)
        return cells.permute(0, 2, 1, 3).reshape(-1, g * g)[order].flatten(1)
    if strategy == BLOCK:
        covered = reference.block_cover(draws, (S // grid_w, grid_w), S - len_keep, param)
        covered = covered.gather(1, order)
        order = order.gather(1, torch.sort(covered.to(torch.uint8), dim=1, stable=True).indices)
    return order


def _masking_cpu(x: torch.Tensor, noise: torch.Tensor | None, draws: torch.Tensor | None,
                 offsets: torch.Tensor | None, len_keep: int, frames: int, grid_w: int,
                 strategy: int, param: int, mask_dtype: torch.dtype, num_predicted: int = -1):
    B, L, _ = x.shape
    S = L // frames
    order = _spatial_order(noise, draws, offsets, S, len_keep, grid_w, strategy, param)
    frame_starts = torch.arange(0, L, S, device=x.device)[:, None]  # (frames, 1)
    kept = (order[:, None, :len_keep] + frame_starts).flatten(1)
    removed = (order[:, None, len_keep:] + frame_starts).flatten(1)
    ids_shuffle = torch.cat([kept, removed], dim=1)
    ranks = torch.arange(L, device=x.device).expand_as(ids_shuffle)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, ranks)
    if num_predicted < 0:
        mask = (ids_restore >= frames * len_keep).to(mask_dtype)
        ids_pred = ids_restore.new_empty(B, 0)
    else:  # the last num_predicted of each frame's order, in position order
        predicted = torch.sort(order[:, S - num_predicted:], dim=1).values
        ids_pred = (predicted[:, None, :] + frame_starts).flatten(1)
        mask = torch.zeros(B, L, dtype=mask_dtype, device=x.device).scatter_(1, ids_pred, 1)
    return gather_op(x, kept), mask, ids_restore, kept, ids_pred


def _masking_triton(x: torch.Tensor, noise: torch.Tensor | None, draws: torch.Tensor | None,
                    offsets: torch.Tensor | None, len_keep: int, frames: int, grid_w: int,
                    strategy: int, param: int, mask_dtype: torch.dtype, num_predicted: int = -1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    B, L, D = x.shape
    S = L // frames
    if S > MAX_FUSED_L or (noise is not None and noise.dtype not in
                           (torch.float32, torch.float16, torch.bfloat16)):
        return _masking_cpu(x, noise, draws, offsets, len_keep, frames, grid_w, strategy, param,
                            mask_dtype, num_predicted)
    if x.stride(2) != 1:
        x = x.contiguous()
    if noise is not None and noise.stride(1) != 1:
        noise = noise.contiguous()
    kept = frames * len_keep
    out = x.new_empty(B, kept, D)
    mask = torch.empty(B, L, dtype=mask_dtype, device=x.device)
    ids_restore = torch.empty(B, L, dtype=torch.int64, device=x.device)
    ids_keep = torch.empty(B, kept, dtype=torch.int64, device=x.device)
    ids_pred = torch.empty(B, frames * max(num_predicted, 0), dtype=torch.int64, device=x.device)
    if B == 0:
        return out, mask, ids_restore, ids_keep, ids_pred
    # the pointers a strategy does not read: any tensor of the launch
    noise_arg = noise if noise is not None else ids_restore
    draws_arg = draws.contiguous() if draws is not None else ids_restore
    offsets_arg = offsets.contiguous() if offsets is not None else ids_restore
    block_r = min(triton.next_power_of_2(kept), TILE_ROWS)
    block_d = max(1, min(triton.next_power_of_2(max(D, 1)), TILE_ELEMENTS // block_r))
    d_tiles = max(1, min(COLUMNS_PER_PROGRAM // block_d, triton.cdiv(D, block_d)))
    gather_grid = (B, triton.cdiv(kept, block_r), max(1, triton.cdiv(D, block_d * d_tiles)))
    block_l = triton.next_power_of_2(S)
    # NOTE registers a thread (sm_90, bf16, D = 768; tests/triton_sm90.py reports them). The
    # former single kernel (a gather tile of next_power_of_2(S) rows, and each D-slice program
    # sorting, and for block making every attempt, again): 95-128 at S = 196 and 1024, and 255
    # with 280-488 B spilled at S = 4096 (triton 3.9; 3.6: 127-128, 255 + 304-376 B). Now, with
    # block_l // 128 warps (4 to 16: up to 4 keys a thread, 8 at S = 4096), triton 3.9 / 3.8 /
    # 3.6: the sort 32-40 at S = 196 (and tubes of 8 x 196), 64 / 64 / 48-56 at 1024, 86-106 at
    # 4096 (with 4 warps there: 255 and 112-136 B spilled; with 4 at 1024, 8 keys a thread, 8 B
    # spilled: grid masking on 3.8, block masking on 3.6). The gather 40 (74 in fp32 with 8
    # warps; 4 warps: 168). No spills.
    with torch.cuda.device_of(x):
        wrap_triton(_masking_kernel)[(B,)](
            noise_arg, draws_arg, offsets_arg, mask, ids_restore, ids_keep, ids_pred, S,
            len_keep, S - num_predicted if num_predicted >= 0 else len_keep, frames, grid_w, S,
            S - len_keep, param, noise_arg.stride(0), STRATEGY=strategy,
            PREDICT=num_predicted >= 0, BLOCK_L=block_l,
            num_warps=min(16, max(4, block_l // 128)),
        )
        wrap_triton(_gather_kept_kernel)[gather_grid](
            x, ids_keep, out, kept, D, x.stride(0), x.stride(1), BLOCK_R=block_r,
            BLOCK_D=block_d, D_TILES=d_tiles, num_warps=8,
        )
    return out, mask, ids_restore, ids_keep, ids_pred


masking_op = device_op("masking", _masking_triton, _masking_cpu)


def _setup(ctx, inputs, output):
    ctx.length = inputs[0].shape[1]
    ctx.save_for_backward(output[3])


def _backward(ctx, grad_x_masked, _grad_mask, _grad_ids_restore, _grad_ids_keep,
              _grad_ids_pred):
    (ids_keep,) = ctx.saved_tensors
    grad = scatter_op(grad_x_masked.contiguous(), ids_keep, ctx.length)
    return grad, None, None, None, None, None, None, None, None, None, None


masking_op.register_autograd(_backward, setup_context=_setup)


def _check_ratio(mask_ratio) -> None:
    if not 0.0 <= _checks.real_number("mask_ratio", mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")


def _at_least_one(len_keep: int, num_tokens: int, mask_ratio, rule: str) -> int:
    if len_keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no token of {num_tokens}: {rule} = 0")
    return len_keep


def keep_count(num_tokens: int, mask_ratio) -> int:
    """The MAE code's `len_keep = int(L * (1 - mask_ratio))`, checked to keep at least one token."""
    _check_ratio(mask_ratio)
    len_keep = int(num_tokens * (1 - mask_ratio))  # in the caller's number type, as the official
    return _at_least_one(len_keep, num_tokens, mask_ratio, "int(L * (1 - mask_ratio))")


def tube_keep_count(num_tokens: int, mask_ratio) -> int:
    """VideoMAE's kept positions per frame, `S - int(S * mask_ratio)` (its TubeMaskingGenerator
    masks `int(mask_ratio * S)`): 20 of 196 at 0.9, where `keep_count` gives 19."""
    _check_ratio(mask_ratio)
    len_keep = num_tokens - int(num_tokens * mask_ratio)
    return _at_least_one(len_keep, num_tokens, mask_ratio, "S - int(S * mask_ratio)")


def _noise(noise, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The caller's noise, checked, or torch.rand(shape) on x's device as the reference draws it."""
    if noise is None:
        return torch.rand(*shape, device=x.device)
    _checks.tensor("noise", noise, len(shape))
    _checks.same_device(x=x, noise=noise)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    if noise.dtype.is_complex or noise.dtype == torch.bool:
        raise TypeError(f"noise must be a real tensor, got {noise.dtype}")
    return noise


def _with_ids_keep(masked):
    """A reference masking's outputs plus ids_keep: the first x_masked.shape[1] entries of
    ids_shuffle, the inverse of ids_restore."""
    x_masked, mask, ids_restore = masked
    return x_masked, mask, ids_restore, torch.argsort(ids_restore, dim=1)[:, :x_masked.shape[1]]


def _grid(grid, num_tokens: int) -> tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise TypeError(f"grid must be a pair of positive ints (rows, columns), got {grid!r}")
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"grid {tuple(grid)} holds {grid[0] * grid[1]} tokens, but x has "
                         f"{num_tokens} per frame")
    return int(grid[0]), int(grid[1])


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Drop-in for the official `MaskedAutoencoderViT.random_masking`.

    x: (B, L, D). Returns (x_masked (B, len_keep, D), mask (B, L) with 1 = removed, ids_restore
    (B, L) int64). Keeps the tokens with the smallest noise, in ascending noise order; ties keep
    the lower index. Without `noise`, draws `torch.rand(B, L, device=x.device)` exactly as the
    reference does, so seeded runs match it bit for bit.
    """
    return random_masking_with_ids(x, mask_ratio, noise)[:3]


def random_masking_with_ids(x: torch.Tensor, mask_ratio: float,
                            noise: torch.Tensor | None = None):
    """`random_masking`, plus ids_keep (B, len_keep): the kept positions, in keep order."""
    _checks.tensor("x", x, 3, floating=True)
    B, L, _ = x.shape
    len_keep = keep_count(L, mask_ratio)
    noise = _noise(noise, x, (B, L))
    if USE_REFERENCE:
        return _with_ids_keep(reference.random_masking(x, mask_ratio, noise))
    return masking_op(x, noise, None, None, len_keep, 1, 1, RANDOM, 0,
                      torch.get_default_dtype())[:4]


def tube_masking(x: torch.Tensor, mask_ratio: float, frames: int,
                 noise: torch.Tensor | None = None):
    """VideoMAE's tube masking: one random spatial mask per sample, shared by every frame.

    x: (B, frames * S, D), frame-major (the token of frame t at spatial position s is
    t * S + s). noise: (B, S) (default torch.rand), ordered as in `random_masking`; each frame
    keeps the same `len_keep = S - int(S * mask_ratio)` positions, VideoMAE's count (20 of 196
    at 0.9; random_masking's `int(L * (1 - mask_ratio))` would keep 19). Returns (x_masked
    (B, frames * len_keep, D): frame 0's kept tokens in noise order, then frame 1's, ...;
    mask (B, frames * S); ids_restore (B, frames * S)), ready for `unshuffle`.
    """
    return tube_masking_with_ids(x, mask_ratio, frames, noise)[:3]


def tube_masking_with_ids(x: torch.Tensor, mask_ratio: float, frames: int,
                          noise: torch.Tensor | None = None):
    """`tube_masking`, plus ids_keep (B, frames * len_keep): the kept positions, in keep order."""
    _checks.tensor("x", x, 3, floating=True)
    _checks.integer("frames", frames, 1)
    B, L, _ = x.shape
    if L % frames:
        raise ValueError(f"frames {frames} does not divide the {L} tokens of x")
    S = L // frames
    len_keep = tube_keep_count(S, mask_ratio)
    noise = _noise(noise, x, (B, S))
    if USE_REFERENCE:
        return _with_ids_keep(reference.tube_masking(x, mask_ratio, frames, noise))
    return masking_op(x, noise, None, None, len_keep, frames, 1, RANDOM, 0,
                      torch.get_default_dtype())[:4]


def block_masking(x: torch.Tensor, mask_ratio: float, grid: tuple[int, int],
                  noise: torch.Tensor | None = None, *, min_patches: int = 4,
                  aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)):
    """BEiT's block-wise masking with an exact count: rectangles of random area and aspect
    ratio cover up to `L - len_keep` tokens; if they cover fewer, the uncovered tokens with the
    largest noise are masked too. Algorithm: `reference.block_cover` and
    `reference.block_masking`.

    x: (B, L, D) with L = grid[0] * grid[1]. noise: (B, L, 5) uniform in [0, 1) (default
    torch.rand): [..., 0] orders the tokens as `random_masking`'s noise does; [b, a, 1:] are
    the draws of rectangle attempt a (area, aspect ratio, top, left). Returns what
    `random_masking` returns; kept tokens are in noise order.
    """
    return block_masking_with_ids(x, mask_ratio, grid, noise, min_patches=min_patches,
                                  aspect_ratio=aspect_ratio)[:3]


def block_masking_with_ids(x: torch.Tensor, mask_ratio: float, grid: tuple[int, int],
                           noise: torch.Tensor | None = None, *, min_patches: int = 4,
                           aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)):
    """`block_masking`, plus ids_keep (B, len_keep)."""
    _checks.tensor("x", x, 3, floating=True)
    B, L, _ = x.shape
    grid_h, grid_w = _grid(grid, L)
    len_keep = keep_count(L, mask_ratio)
    _checks.integer("min_patches", min_patches, 1)
    if (not isinstance(aspect_ratio, (tuple, list)) or len(aspect_ratio) != 2
            or not all(isinstance(a, (int, float)) and a > 0 for a in aspect_ratio)
            or aspect_ratio[0] > aspect_ratio[1]):
        raise ValueError(f"aspect_ratio must be (low, high) with 0 < low <= high, got "
                         f"{aspect_ratio!r}")
    noise = _noise(noise, x, (B, L, 5))
    if USE_REFERENCE:
        return _with_ids_keep(reference.block_masking(x, mask_ratio, grid, noise, min_patches,
                                                      aspect_ratio))
    order_noise, draws = reference.block_draws(noise, aspect_ratio)
    return masking_op(x, order_noise, draws, None, len_keep, 1, grid_w, BLOCK, min_patches,
                      torch.get_default_dtype())[:4]


def grid_masking(x: torch.Tensor, grid: tuple[int, int], keep_every: int = 2, offset=None):
    """The MAE paper's grid-wise sampling: keep one token of every keep_every x keep_every
    square (keep_every=2: one in four, a 75% mask), in position order.

    x: (B, L, D) with L = grid[0] * grid[1], both divisible by keep_every. offset: the kept
    (row, column) inside each square: None for (0, 0), a pair for every sample, or a (B, 2)
    integer tensor per sample. Returns what `random_masking` returns.
    """
    return grid_masking_with_ids(x, grid, keep_every, offset)[:3]


def grid_masking_with_ids(x: torch.Tensor, grid: tuple[int, int], keep_every: int = 2,
                          offset=None):
    """`grid_masking`, plus ids_keep (B, L / keep_every**2)."""
    _checks.tensor("x", x, 3, floating=True)
    B, L, _ = x.shape
    grid_h, grid_w = _grid(grid, L)
    _checks.integer("keep_every", keep_every, 1)
    if grid_h % keep_every or grid_w % keep_every:
        raise ValueError(f"keep_every {keep_every} must divide both sides of grid {grid}, so "
                         "that every sample keeps the same number of tokens")
    offsets = _grid_offsets(offset, B, keep_every, x.device)
    len_keep = L // keep_every**2
    if USE_REFERENCE:
        return _with_ids_keep(reference.grid_masking(x, grid, keep_every, offsets))
    return masking_op(x, None, None, offsets, len_keep, 1, grid_w, GRID, keep_every,
                      torch.get_default_dtype())[:4]


def _grid_offsets(offset, batch: int, keep_every: int, device) -> torch.Tensor:
    """(batch, 2) int64 offsets. A pair is checked on the host; a tensor's range is a
    data-dependent check (a host sync on CUDA), made in eager mode only, as index ranges are:
    unchecked, an entry out of range gives a wrong mask, never an access out of bounds."""
    if offset is None:
        offset = (0, 0)
    if isinstance(offset, torch.Tensor):
        _checks.tensor("offset", offset, 2)
        if tuple(offset.shape) != (batch, 2) or offset.dtype.is_floating_point \
                or offset.dtype.is_complex or offset.dtype == torch.bool:
            raise ValueError(f"offset must be an integer tensor of shape {(batch, 2)}, got "
                             f"{offset.dtype} {tuple(offset.shape)}")
        _checks.index_range("offset", offset, keep_every)
        return offset.to(device=device, dtype=torch.int64).contiguous()
    if (not isinstance(offset, (tuple, list)) or len(offset) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offset)):
        raise TypeError(f"offset must be None, a pair of ints or a (B, 2) tensor, got "
                        f"{offset!r}")
    if not all(0 <= o < keep_every for o in offset):
        raise ValueError(f"offset entries must lie in [0, keep_every={keep_every}), got "
                         f"{list(offset)}")
    # filled on the device: torch.tensor(offset, device="cuda") would copy from pageable host
    # memory, a host-device sync in every training step
    offsets = torch.full((batch, 2), offset[0], dtype=torch.int64, device=device)
    offsets[:, 1].fill_(offset[1])
    return offsets


def _patch_grid(grid, num_tokens: int) -> tuple[int, int]:
    """The (rows, columns) of x's tokens: `grid`, or the square grid the upstream code assumes."""
    if grid is not None:
        return _grid(grid, num_tokens)
    side = round(num_tokens**0.5)
    if side * side != num_tokens:
        raise ValueError(f"x has {num_tokens} tokens, not a square grid: pass grid (rows, "
                         "columns)")
    return side, side


def predicted_count(num_tokens: int, mask_ratio, predict_ratio, len_keep: int,
                    name: str = "predict_ratio") -> int:
    """CrossMAE's predicted tokens: L - len_keep - int(L * (mask_ratio - kept_mask_ratio)),
    checked to be at least one and to leave the kept tokens alone."""
    ratio = _checks.real_number(name, predict_ratio)
    if not 0.0 < ratio <= float(mask_ratio):
        raise ValueError(f"{name} must lie in (0, mask_ratio={mask_ratio}]: the share of all "
                         f"tokens that are masked and predicted, got {predict_ratio}")
    count = num_tokens - len_keep - int(num_tokens * (mask_ratio - predict_ratio))
    if count < 1:
        raise ValueError(f"{name} {predict_ratio} predicts no token of {num_tokens}")
    return count


def masking_with_ids(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None, *,
                     mask_grid: int = 1, grid: tuple[int, int] | None = None,
                     predict_ratio: float | None = None):
    """Random masking of `mask_grid` x `mask_grid` units of patches (Pixio; 1: MAE's tokens),
    optionally split three ways (CrossMAE's `kept_mask_ratio` as `predict_ratio`: the share of
    all tokens masked and predicted; the mask then marks those only).

    x: (B, L, D) on a grid of patches (`grid`, or square). noise: (B, units) (default
    torch.rand), units = L / mask_grid**2. The counts are the upstream codes' over units:
    int(units * (1 - mask_ratio)) kept; with predict_ratio, units - kept - int(units *
    (mask_ratio - predict_ratio)) predicted. Returns (x_masked, mask, ids_restore, ids_keep,
    ids_pred): ids_pred (B, predicted patches) in position order, (B, 0) without
    predict_ratio."""
    return _unit_masking(x, mask_ratio, noise, mask_grid, grid, predict_ratio, "predict_ratio")


def _unit_masking(x, mask_ratio, noise, mask_grid: int, grid, predict_ratio,
                  predict_name: str):
    _checks.tensor("x", x, 3, floating=True)
    B, L, _ = x.shape
    g = _checks.integer("mask_grid", mask_grid, 1)
    grid_h, grid_w = _patch_grid(grid, L) if g > 1 or grid is not None else (1, L)
    if grid_h % g or grid_w % g:
        raise ValueError(f"mask_grid {g} must divide both sides of the {grid_h}x{grid_w} grid "
                         "of patches")
    units = L // g**2
    keep_units = keep_count(units, mask_ratio)
    predict_units = -1 if predict_ratio is None else predicted_count(
        units, mask_ratio, predict_ratio, keep_units, predict_name)
    noise = _noise(noise, x, (B, units))
    num_predicted = predict_units * g**2 if predict_units >= 0 else -1
    if USE_REFERENCE:
        if predict_ratio is not None and g == 1:
            masked = reference.crossmae_masking(x, mask_ratio, predict_ratio, noise)
        else:
            masked = reference.pixio_masking(x, mask_ratio, g, noise, (grid_h, grid_w))
        return _with_predicted(_with_ids_keep(masked), num_predicted)
    strategy, param = (UNITS, g) if g > 1 else (RANDOM, 0)
    return masking_op(x, noise, None, None, keep_units * g**2, 1, grid_w, strategy, param,
                      torch.get_default_dtype(), num_predicted)


def _with_predicted(masked, num_predicted: int):
    """A reference masking's outputs with ids_keep, plus ids_pred: the last num_predicted of
    the order, in position order (mask 1 there only); (B, 0) when num_predicted < 0."""
    x_masked, mask, ids_restore, ids_keep = masked
    B, L = ids_restore.shape
    if num_predicted < 0:
        return x_masked, mask, ids_restore, ids_keep, ids_restore.new_empty(B, 0)
    ids_pred = torch.sort(torch.argsort(ids_restore, dim=1)[:, L - num_predicted:], dim=1).values
    mask = torch.zeros_like(mask).scatter_(1, ids_pred, 1)
    return x_masked, mask, ids_restore, ids_keep, ids_pred


def pixio_masking(x: torch.Tensor, mask_ratio: float, mask_grid: int = 4,
                  noise: torch.Tensor | None = None, grid: tuple[int, int] | None = None):
    """Drop-in for Pixio's `PixioViT.random_masking(x, mask_ratio, grid)`: random masking of
    mask_grid x mask_grid units of patches (Pixio: 4x4).

    x: (B, L, D) on a square grid of patches (or `grid` (rows, columns)), both sides divisible
    by mask_grid. noise: (B, L / mask_grid**2), one value per unit (default torch.rand, as Pixio
    draws it). Returns (x_masked, mask, ids_restore) as Pixio's: each kept unit's patches
    row-major, units in ascending noise order (ties to the lower unit)."""
    return masking_with_ids(x, mask_ratio, noise, mask_grid=mask_grid, grid=grid)[:3]


def crossmae_masking(x: torch.Tensor, mask_ratio: float, kept_mask_ratio: float,
                     noise: torch.Tensor | None = None):
    """Drop-in for CrossMAE's `random_masking(x, mask_ratio, kept_mask_ratio)`: the tokens in
    noise order split three ways, int(L * (1 - mask_ratio)) kept, int(L * (mask_ratio -
    kept_mask_ratio)) masked and not predicted, the rest predicted. Returns (x_masked, mask,
    ids_restore) with mask 1 on the predicted tokens only, as CrossMAE's."""
    return _unit_masking(x, mask_ratio, noise, 1, None, kept_mask_ratio, "kept_mask_ratio")[:3]
