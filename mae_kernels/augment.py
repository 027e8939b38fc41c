"""resized_crop: the input pipeline's augmentation in one pass. uint8 RGB images of different
sizes, one box (top, left, height, width) and one horizontal flip per sample -> (B, 3, S, S)
normalised in the training dtype, or straight in the `patchify` layout (B, L, p*p*3).

Resampling is aten's (and PIL's) antialiased bicubic, the reference's `F.interpolate(...,
mode="bicubic", antialias=True)`: per axis, scale = crop / S, support = 2 * max(scale, 1), output
pixel i centred at scale * (i + 0.5) in the crop, taps [trunc(centre - support + 0.5),
trunc(centre + support + 0.5)) cut to the crop, Keys' cubic (a = -0.5) of the distance divided by
max(scale, 1), weights normalised per output pixel. Then clamp to [0, 255] (a uint8 pipeline
does), flip, /255, (x - mean) / std.

Images come packed: one uint8 buffer, CHW per image at `offsets[b]`, `shapes[b] = (H, W)` (the
layout torchvision.io's decoders give); a list of (3, H, W) tensors is packed on the way in.

Triton (CUDA): one program per tile of ROWS output rows by a block of columns, all three
channels, of one sample; the weights are computed in the kernel from the box. It walks the crop
rows the tile needs (once per TAPS horizontal taps): each row filtered horizontally, then added
into every output row it reaches with that row's vertical weight. Stores are whole runs of
contiguous output: a row of one channel, or in the patch layout a patch row's p*3 interleaved
values.
CPU: per sample, the two passes as matmuls with the banded weight matrices, a band of
output pixels at a time.

`random_resized_crop_boxes` draws torchvision's `RandomResizedCrop.get_params` boxes for the whole
batch at once, on the device, from a generator `step_generator(seed, epoch, rank, step)` seeds,
so a resumed run draws the same boxes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _checks, reference
from ._library import USE_REFERENCE, device_op, tl, triton, wrap_triton

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROWS = 8  # output rows per program: each crop row filtered horizontally serves ROWS of them
ROW_LANES = 64  # output columns per program in the image layout
PATCH_LANES = 256  # lanes per program in the patch layout: whole patch rows
TAPS = 8  # horizontal taps per step: up to 4 * scale + 1 <= 8 (1.75x downscaling), one step
BAND = 48  # output pixels per matmul in the CPU kernel


@triton.jit
def _cubic(x):
    """Keys' cubic convolution kernel with a = -0.5."""
    x = tl.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _taps(i, crop, S):
    """Output pixels i of an axis: their centre in the crop, first tap, tap count, the factor
    the distances are scaled by, and the sum of their weights (to normalise by)."""
    extent = crop.to(tl.float32)
    # div_rn: the GPU's `/` is approximate, and an ulp of scale moves a far pixel's centre
    scale = tl.div_rn(extent, extent * 0.0 + S)
    support = 2.0 * tl.maximum(scale, 1.0)
    inv = tl.where(scale >= 1.0, tl.div_rn(scale * 0.0 + 1.0, scale), 1.0)
    centre = scale * (i.to(tl.float32) + 0.5)
    first = tl.maximum((centre - support + 0.5).to(tl.int32), 0)  # truncation, as aten's cast
    count = tl.minimum((centre + support + 0.5).to(tl.int32), crop) - first
    total = tl.zeros_like(centre)
    # NOTE: `while` loops over runtime bounds in this file: triton 3.6's interpreter converts
    # range() bounds with int() on 1-element arrays, which NumPy >= 2.3 refuses.
    k = 0
    taps = tl.max(count, axis=0)
    while k < taps:
        w = _cubic((first + k - centre + 0.5) * inv)
        total += tl.where(k < count, w, 0.0)
        k += 1
    return centre, first, count, inv, total


@triton.jit
def _resized_crop_kernel(data_ptr, offsets_ptr, shapes_ptr, boxes_ptr, flips_ptr, out_ptr,
                         numel, S, p, grid_w, row_tiles,
                         scale0, scale1, scale2, shift0, shift1, shift2,
                         PATCHES: tl.constexpr, ROWS: tl.constexpr, LANES: tl.constexpr,
                         RUN: tl.constexpr, TAPS: tl.constexpr):
    b = tl.program_id(0) // row_tiles
    y = (tl.program_id(0) % row_tiles) * ROWS + tl.arange(0, ROWS)
    lane = tl.arange(0, LANES)
    if PATCHES:  # lanes (patch column j, n = (pixel column, channel) of a patch row)
        j = tl.program_id(1) * (LANES // RUN) + lane // RUN
        n = lane % RUN
        x = j * p + n // 3
        c = n % 3
        valid = (n < 3 * p) & (j < grid_w)
    else:  # lanes (channel, column)
        x = tl.program_id(1) * RUN + lane % RUN
        c = lane // RUN
        valid = (c < 3) & (x < S)
    b64 = b.to(tl.int64)
    height = tl.load(shapes_ptr + 2 * b64)
    width = tl.load(shapes_ptr + 2 * b64 + 1)
    top = tl.load(boxes_ptr + 4 * b64)
    left = tl.load(boxes_ptr + 4 * b64 + 1)
    crop_h = tl.load(boxes_ptr + 4 * b64 + 2).to(tl.int32)
    crop_w = tl.load(boxes_ptr + 4 * b64 + 3).to(tl.int32)
    flip = tl.load(flips_ptr + b64) != 0
    source = tl.where(flip, S - 1 - x, x)
    centre_x, first_x, count_x, inv_x, total_x = _taps(source, crop_w, S)
    count_x = tl.where(valid, count_x, 0)
    total_x = tl.where(valid, total_x, 1.0)  # idle lanes: no 0 / 0
    centre_y, first_y, count_y, inv_y, total_y = _taps(y, crop_h, S)
    count_y = tl.where(y < S, count_y, 0)
    total_y = tl.where(y < S, total_y, 1.0)
    # the crop rows this tile reads: from its first row's first tap to its last row's last
    row_lo = tl.min(tl.where(count_y > 0, first_y, 2**30), axis=0)
    row_hi = tl.max(first_y + count_y, axis=0)
    base = tl.load(offsets_ptr + b64) + c * (height * width) + left + first_x
    acc = tl.zeros((ROWS, LANES), dtype=tl.float32)
    tap = tl.arange(0, TAPS)[:, None]
    # TAPS horizontal taps at a time, their weights computed once for every row
    k0 = 0
    taps_x = tl.max(count_x, axis=0)
    while k0 < taps_x:
        k = k0 + tap
        use = k < count_x[None, :]
        w_x = tl.where(use, _cubic((first_x[None, :] + k - centre_x[None, :] + 0.5) * inv_x),
                       0.0)
        at_row0 = base[None, :] + k
        r = row_lo
        while r < row_hi:
            at = at_row0 + (top + r) * width
            inside = use & (at >= 0) & (at < numel)  # in range even when checks were skipped
            pixel = tl.load(data_ptr + at, mask=inside, other=0).to(tl.float32)
            filtered = tl.sum(w_x * pixel, axis=0)
            dy = r - first_y
            w_y = tl.where((dy >= 0) & (dy < count_y), _cubic((r - centre_y + 0.5) * inv_y),
                           0.0)
            acc += w_y[:, None] * filtered[None, :]
            r += 1
        k0 += TAPS
    value = acc / (total_y[:, None] * total_x[None, :])
    value = tl.minimum(tl.maximum(value, 0.0), 255.0)
    scale = tl.where(c == 0, scale0, tl.where(c == 1, scale1, scale2))
    shift = tl.where(c == 0, shift0, tl.where(c == 1, shift1, shift2))
    value = value * scale[None, :] + shift[None, :]
    yy = y[:, None].to(tl.int64)
    if PATCHES:
        token = b64 * (S // p) * grid_w + (yy // p) * grid_w + j[None, :]
        offset = (token * p + yy % p) * (3 * p) + n[None, :]
    else:
        offset = ((b64 * 3 + c[None, :]) * S + yy) * S + x[None, :]
    tl.store(out_ptr + offset, value.to(out_ptr.dtype.element_ty),
             mask=(yy < S) & valid[None, :])


def _normalisation(mean, std) -> tuple[list[float], list[float]]:
    """x / 255 then (x - mean) / std as x * scale + shift, per channel."""
    return ([1.0 / (255.0 * s) for s in std], [-m / s for m, s in zip(mean, std)])


def _resized_crop_triton(data: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor,
                         boxes: torch.Tensor, flips: torch.Tensor, size: int,
                         mean: list[float], std: list[float], dtype: torch.dtype,
                         patch_size: int) -> torch.Tensor:
    B, S, p = boxes.shape[0], size, patch_size
    if p:
        out = torch.empty(B, (S // p) ** 2, p * p * 3, dtype=dtype, device=data.device)
        run = triton.next_power_of_2(3 * p)
        lanes = max(run, PATCH_LANES)
        columns = triton.cdiv(S // p, lanes // run)
    else:
        out = torch.empty(B, 3, S, S, dtype=dtype, device=data.device)
        run = min(ROW_LANES, triton.next_power_of_2(S))
        lanes = 4 * run  # three channels and one idle
        columns = triton.cdiv(S, run)
    if B == 0:
        return out
    scale, shift = _normalisation(mean, std)
    row_tiles = triton.cdiv(S, ROWS)
    with torch.cuda.device_of(data):
        wrap_triton(_resized_crop_kernel)[(B * row_tiles, columns)](
            data, offsets, shapes, boxes, flips, out, data.numel(), S, max(p, 1),
            S // p if p else 0, row_tiles, *scale, *shift,
            PATCHES=bool(p), ROWS=ROWS, LANES=lanes, RUN=run, TAPS=TAPS,
        )
    return out


def _weights(crop: torch.Tensor, size: int):
    """One axis's antialiased bicubic weights for each sample: (B, size, max crop) matrices, row
    i holding output pixel i's normalised weights over the crop, and each row's first and end
    nonzero columns (B, size)."""
    scale = crop.float() / size
    support = 2 * scale.clamp(min=1)
    inv = torch.where(scale >= 1, 1 / scale, 1.0)[:, None, None]
    centre = scale[:, None] * (torch.arange(size, dtype=torch.float32) + 0.5)
    first = (centre - support[:, None] + 0.5).int().clamp(min=0)
    end = torch.minimum((centre + support[:, None] + 0.5).int(), crop[:, None].int())
    k = torch.arange(int((end - first).max()))
    distance = ((first[..., None] + k - centre[..., None] + 0.5) * inv).abs()
    near = (1.5 * distance - 2.5) * distance * distance + 1
    far = ((-0.5 * distance + 2.5) * distance - 4) * distance + 2
    w = torch.where(distance < 1, near, torch.where(distance < 2, far, 0.0))
    w = torch.where(first[..., None] + k < end[..., None], w, 0.0)
    w = w / w.sum(-1, keepdim=True)
    columns = (first[..., None] + k).clamp(max=int(crop.max()) - 1)
    matrix = torch.zeros(crop.shape[0], size, int(crop.max()))
    return matrix.scatter_add_(2, columns.long(), w), first, end


def _banded(weights: torch.Tensor, first: list[int], end: list[int], x: torch.Tensor,
            out: torch.Tensor, dim: int) -> None:
    """out = weights applied to x along `dim` (-1: columns, -2: rows), as matmuls of BAND output
    pixels each over the span of input their weights cover (the dense product does ~S/BAND
    times the work: the matrices are banded)."""
    for a in range(0, weights.shape[0], BAND):
        z = min(a + BAND, weights.shape[0])
        lo, hi = min(first[a:z]), max(end[a:z])
        if dim == -1:
            out[..., a:z] = x[..., lo:hi] @ weights[a:z, lo:hi].T
        else:
            out[..., a:z, :] = weights[a:z, lo:hi] @ x[..., lo:hi, :]


def _resized_crop_cpu(data: torch.Tensor, offsets: torch.Tensor, shapes: torch.Tensor,
                      boxes: torch.Tensor, flips: torch.Tensor, size: int, mean: list[float],
                      std: list[float], dtype: torch.dtype, patch_size: int) -> torch.Tensor:
    B = boxes.shape[0]
    out = torch.empty(B, 3, size, size)
    if B:
        rows, first_y, end_y = _weights(boxes[:, 2], size)
        columns, first_x, end_x = _weights(boxes[:, 3], size)
        for b, (offset, (H, W), (top, left, h, w), flip) in enumerate(zip(
                offsets.tolist(), shapes.tolist(), boxes.tolist(), flips.tolist())):
            crop = data[offset:offset + 3 * H * W].view(3, H, W)[:, top:top + h, left:left + w]
            across, first, end = columns[b], first_x[b], end_x[b]
            if flip:  # output column x takes source column S - 1 - x's weights
                across, first, end = across.flip(0), first.flip(0), end.flip(0)
            filtered = torch.empty(3, h, size)
            _banded(across, first.tolist(), end.tolist(), crop.float(), filtered, -1)
            _banded(rows[b], first_y[b].tolist(), end_y[b].tolist(), filtered, out[b], -2)
    scale, shift = _normalisation(mean, std)
    out = out.clamp_(0, 255).mul_(torch.tensor(scale).view(3, 1, 1))
    out = out.add_(torch.tensor(shift).view(3, 1, 1)).to(dtype)
    if patch_size:
        return reference.patchify(out, patch_size).contiguous()
    return out


def _resized_crop_fake(data, offsets, shapes, boxes, flips, size, mean, std, dtype, patch_size):
    # The CPU kernel reads the boxes on the host (its loop and matrix sizes): not traceable,
    # so the fake gives the output's metadata, which depends on no data.
    B = boxes.shape[0]
    if patch_size:
        return data.new_empty(B, (size // patch_size) ** 2, patch_size**2 * 3, dtype=dtype)
    return data.new_empty(B, 3, size, size, dtype=dtype)


resized_crop_op = device_op("resized_crop", _resized_crop_triton, _resized_crop_cpu)
resized_crop_op.register_fake(_resized_crop_fake)

OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pack(images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data, offsets, shapes) of a list of (3, H_i, W_i) uint8 images: the packed form."""
    if not isinstance(images, (list, tuple)) or not images:
        raise TypeError("images must be a non-empty list of (3, H, W) uint8 tensors or a packed "
                        f"1-D uint8 buffer, got {type(images).__name__}")
    for i, img in enumerate(images):
        _checks.tensor(f"images[{i}]", img, 3, dtype=torch.uint8)
        if img.shape[0] != 3:
            raise ValueError(f"images[{i}] must be (3, H, W) RGB, got shape {tuple(img.shape)}")
    _checks.same_device(**{f"images[{i}]": img for i, img in enumerate(images)})
    device = images[0].device
    shapes = torch.tensor([img.shape[1:] for img in images], dtype=torch.int64, device=device)
    sizes = torch.tensor([img.numel() for img in images], dtype=torch.int64)
    offsets = (torch.cumsum(sizes, 0) - sizes).to(device)
    return torch.cat([img.reshape(-1) for img in images]), offsets, shapes


def _check_packed(data, offsets, shapes, boxes) -> torch.Tensor:
    """The checked offsets (one image after another when None)."""
    B = boxes.shape[0]
    _checks.tensor("shapes", shapes, 2, dtype=torch.int64)
    if tuple(shapes.shape) != (B, 2):
        raise ValueError(f"shapes must be (B, 2) = {(B, 2)} (H, W per image), got "
                         f"{tuple(shapes.shape)}")
    if offsets is None:
        sizes = 3 * shapes[:, 0] * shapes[:, 1]
        offsets = torch.cumsum(sizes, 0) - sizes
    _checks.tensor("offsets", offsets, 1, dtype=torch.int64)
    if offsets.shape[0] != B:
        raise ValueError(f"offsets must have {B} entries (one per box), got {offsets.shape[0]}")
    _checks.same_device(data=data, offsets=offsets, shapes=shapes, boxes=boxes)
    if not _checks._checking(boxes):
        return offsets
    if bool((shapes < 1).any()):
        raise ValueError("shapes must hold image sizes >= 1")
    ends = offsets + 3 * shapes[:, 0] * shapes[:, 1]
    if bool((offsets < 0).any()) or bool((ends > data.numel()).any()):
        raise ValueError(f"offsets put an image outside data ({data.numel()} bytes)")
    top, left, height, width = boxes.unbind(1)
    if bool(((height < 1) | (width < 1)).any()):
        raise ValueError("boxes must have height and width >= 1")
    outside = (top < 0) | (left < 0) | (top + height > shapes[:, 0]) | (left + width > shapes[:, 1])
    if bool(outside.any()):
        b = int(outside.int().argmax())
        raise ValueError(f"boxes[{b}] = {boxes[b].tolist()} (top, left, height, width) is not "
                         f"inside its image of {tuple(shapes[b].tolist())}")
    return offsets


def _three(name: str, value) -> list[float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise TypeError(f"{name} must be 3 numbers (R, G, B), got {value!r}")
    return [_checks.real_number(f"{name}[{i}]", v) for i, v in enumerate(value)]


def resized_crop(images, boxes: torch.Tensor, size: int, flips: torch.Tensor | None = None, *,
                 shapes: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: torch.dtype = torch.float32,
                 patch_size: int | None = None) -> torch.Tensor:
    """Crop each image to its box (top, left, height, width), resize it to size x size (bicubic,
    antialiased when downscaling), flip it where `flips` (B,) is true, x / 255, (x - mean) / std:
    (B, 3, size, size) in `dtype`, or `patchify`'s (B, L, p*p*3) when `patch_size` is given.

    `images`: a list of (3, H_i, W_i) uint8 tensors, or one packed 1-D uint8 buffer holding each
    image CHW with `shapes` (B, 2) int64 (H, W) and `offsets` (B,) int64 (default: one after
    another). Reference: `reference.resized_crop` (torchvision v2's `resized_crop`, BICUBIC,
    antialias=True, then hflip and normalise), within 1e-3 of it in 1/255 units before the
    normalisation; so within 0.5/255 (its rounding) of torchvision's uint8 output where that
    computes in float (CUDA). torchvision's uint8 CPU kernel and Pillow round between the two
    passes: on photographs 0.27/255 apart on average, 0.95/255 at the 99.9th percentile.
    Not differentiable (data)."""
    if isinstance(images, torch.Tensor):
        _checks.tensor("images", images, 1, dtype=torch.uint8)
        if shapes is None:
            raise ValueError("shapes is required with a packed images buffer: (B, 2) (H, W)")
        data = images
    else:
        if shapes is not None or offsets is not None:
            raise ValueError("shapes and offsets go with a packed images buffer, not a list")
        data, offsets, shapes = pack(images)
    _checks.tensor("boxes", boxes, 2)
    if boxes.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"boxes must be int64 (or int32), got {boxes.dtype}")
    if boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (B, 4) (top, left, height, width), got "
                         f"{tuple(boxes.shape)}")
    boxes = boxes.long()
    B = boxes.shape[0]
    _checks.integer("size", size, 1)
    if patch_size is not None:
        _checks.integer("patch_size", patch_size, 1)
        if size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide size {size}")
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    mean, std = _three("mean", mean), _three("std", std)
    if min(std) <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    if flips is None:
        flips = torch.zeros(B, dtype=torch.bool, device=data.device)
    _checks.tensor("flips", flips, 1, dtype=torch.bool)
    if flips.shape[0] != B:
        raise ValueError(f"flips must have {B} entries (one per box), got {flips.shape[0]}")
    _checks.same_device(data=data, flips=flips)
    offsets = _check_packed(data, offsets, shapes, boxes)
    if USE_REFERENCE:
        images = [data[o:o + 3 * h * w].view(3, h, w)
                  for o, (h, w) in zip(offsets.tolist(), shapes.tolist())]
        return reference.resized_crop(images, boxes, size, flips, mean, std, dtype, patch_size)
    return resized_crop_op(data, offsets.contiguous(), shapes.contiguous(), boxes.contiguous(),
                           flips.contiguous(), size, mean, std, dtype, patch_size or 0)


def step_generator(seed: int, epoch: int, rank: int, step: int,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded by (seed, epoch, rank, step) alone, through NumPy's
    SeedSequence: every step's draws are reproducible on their own, so a resumed run
    continues with the same boxes."""
    words = [_checks.integer(name, value, 0) for name, value in
             (("seed", seed), ("epoch", epoch), ("rank", rank), ("step", step))]
    state = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1
    return torch.Generator(device=device).manual_seed(state)


def _ordered_pair(name: str, value) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (low, high), got {value!r}")
    lo, hi = (_checks.real_number(f"{name}[{i}]", v) for i, v in enumerate(value))
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must satisfy 0 < low <= high, got {value!r}")
    return lo, hi


def random_resized_crop_boxes(shapes: torch.Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                              generator: torch.Generator | None = None,
                              attempts: int = 10) -> torch.Tensor:
    """(B, 4) int64 boxes (top, left, height, width) for images of `shapes` (B, 2) (H, W), drawn
    as torchvision's `RandomResizedCrop.get_params` draws one: up to `attempts` tries of an area
    fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`, sides rounded, the
    first that fits placed uniformly; else the centre crop clamped to `ratio`. All samples and
    tries at once, on the device of `shapes` (and `generator`)."""
    _checks.tensor("shapes", shapes, 2, dtype=torch.int64)
    if shapes.shape[1] != 2:
        raise ValueError(f"shapes must be (B, 2) (H, W), got {tuple(shapes.shape)}")
    s_lo, s_hi = _ordered_pair("scale", scale)
    r_lo, r_hi = _ordered_pair("ratio", ratio)
    _checks.integer("attempts", attempts, 1)
    B, device = shapes.shape[0], shapes.device
    if generator is not None and generator.device != device:
        raise ValueError(f"generator is on {generator.device} but shapes is on {device}")
    if _checks._checking(shapes) and bool((shapes < 1).any()):
        raise ValueError("shapes must hold image sizes >= 1")
    H, W = shapes.double().unbind(1)
    u = torch.rand(B, attempts, 2, generator=generator, device=device, dtype=torch.float64)
    place = torch.rand(B, 2, generator=generator, device=device, dtype=torch.float64)
    area = (H * W)[:, None] * (s_lo + (s_hi - s_lo) * u[..., 0])
    aspect = torch.exp(math.log(r_lo) + (math.log(r_hi) - math.log(r_lo)) * u[..., 1])
    w = torch.sqrt(area * aspect).round()  # round half to even, as Python's round
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = torch.floor(place[:, 0] * (H - h + 1))
    left = torch.floor(place[:, 1] * (W - w + 1))
    # no try fits: the whole image, cut to the nearest allowed ratio
    wide, tall = W / H > r_hi, W / H < r_lo
    centre_h = torch.where(tall, (W / r_lo).round(), H)
    centre_w = torch.where(wide, (H * r_hi).round(), W)
    found = fits.any(1)
    h, w = torch.where(found, h, centre_h), torch.where(found, w, centre_w)
    top = torch.where(found, top, torch.div(H - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(W - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], 1).long()
