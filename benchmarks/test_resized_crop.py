"""The input pipeline's op, resized_crop, against its reference (the per-sample loop of
crop + antialiased bicubic resize + flip + normalise), eager and compiled.

Batches of ImageNet-like photos (300-500 pixels a side, packed in one uint8 buffer), MAE's
boxes (RandomResizedCrop with scale (0.2, 1)) and flips, to 224: float32 images (B, 3, 224,
224) and bfloat16 patches (B, 196, 768). GPU: B in {64, 256}; CPU: B = 8. The bandwidth
floor counts each crop's pixels read once and the output written once.
"""
from __future__ import annotations

import pytest
import torch

import mae_kernels

from .common import CUDA, GPU_SIZES, run_case
from .test_ops import IMPLS, _select

DEVICE = "cuda" if CUDA else "cpu"
BATCHES = [64, 256] if GPU_SIZES else [8]
# the GPU plan's loader extras (scripts/gpu_plan.py) select these and the loader's stages
pytestmark = pytest.mark.loader
SIZE, PATCH = 224, 16


def _photos(B: int):
    """A packed batch (data, offsets, shapes), its boxes and flips, and the images as views."""
    shapes = torch.randint(300, 501, (B, 2), device=DEVICE)
    sizes = 3 * shapes[:, 0] * shapes[:, 1]
    offsets = torch.cumsum(sizes, 0) - sizes
    data = torch.randint(0, 256, (int(sizes.sum()),), dtype=torch.uint8, device=DEVICE)
    boxes = mae_kernels.random_resized_crop_boxes(shapes, scale=(0.2, 1.0))
    flips = torch.rand(B, device=DEVICE) < 0.5
    images = [data[o:o + 3 * h * w].view(3, h, w)
              for o, (h, w) in zip(offsets.tolist(), shapes.tolist())]
    return data, offsets, shapes, boxes, flips, images


@pytest.mark.parametrize("layout", ["images", "patches"])
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_resized_crop(benchmark, impl, B, layout):
    op = _select(benchmark, impl, "resized_crop")
    dtype, patch_size = ((torch.float32, None) if layout == "images"
                         else (torch.bfloat16, PATCH))

    def run(data, offsets, shapes, boxes, flips, images):
        if impl == "ours":
            return op(data, boxes, SIZE, flips, shapes=shapes, offsets=offsets, dtype=dtype,
                      patch_size=patch_size)
        return op(images, boxes, SIZE, flips, dtype=dtype, patch_size=patch_size)

    inputs = _photos(B)
    crops = int((inputs[3][:, 2] * inputs[3][:, 3]).sum()) * 3
    es = torch.tensor([], dtype=dtype).element_size()
    run_case(benchmark, run, lambda: _photos(B), crops + B * 3 * SIZE * SIZE * es,
             op="resized_crop", impl=impl, shape=[B, 3, SIZE, SIZE], dtype=str(dtype),
             direction="fwd", layout=layout)
