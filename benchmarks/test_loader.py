"""The input pipeline per image: what one DataLoader worker process does for `--data-loader pil`
(decode, the official RandomResizedCrop(224, scale=(0.2, 1)) + flip in Pillow, normalise, a
float32 tensor) and for `--data-loader gpu` (read the file's bytes and its header), and what the
main process then does for the gpu loader (decode the batch, one `resized_crop` call).

The images are ImageNet-sized JPEGs (500x375, quality 90) cut from the real photographs that
scikit-image bundles, written to a temporary folder by the benchmark (none is committed).
`images_per_sec` is per process (one worker, or the main process's batch step);
`bytes_per_image` is what a worker sends to the main process for each image.

    pytest benchmarks/ -k loader --benchmark-json=loader.json
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mae.data import gpu as gpu_data
from mae.data.images import ImageFolderDataset
from mae_kernels.augment import IMAGENET_MEAN, IMAGENET_STD

from .common import CUDA, GPU_SIZES, jpeg_set

# the GPU plan's loader extras (scripts/gpu_plan.py) select these and resized_crop's cases
pytestmark = pytest.mark.loader

IMAGES = 64  # files in the generated set; every case cycles through all of them
SIZE = 224


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return jpeg_set(tmp_path_factory.mktemp("photos"), IMAGES)


def _per_image(benchmark, fn, count: int, **info):
    """Times `fn()`, which handles `count` images, and records the rate per image."""
    benchmark.group = "loader"
    benchmark.extra_info.update(op="loader", **info)
    benchmark(fn)
    if not benchmark.disabled:
        benchmark.extra_info["images_per_sec"] = count / benchmark.stats.stats.median


@pytest.mark.parametrize("impl", ["pil", "bytes"])
def test_loader_worker(benchmark, jpeg_folder, impl):
    """One worker process's work for every image of the set, as `__getitem__` does it."""
    if impl == "pil":
        dataset = ImageFolderDataset(jpeg_folder, SIZE, train=True, split="train")
    else:
        dataset = gpu_data.EncodedDataset(ImageFolderDataset(jpeg_folder, SIZE, split="train"),
                                          ship_jpegs=True)
    first = dataset[0]
    sent = (first[0].numel() * first[0].element_size() if impl == "pil"
            else int(np.mean([len(dataset[i].payload) for i in range(len(dataset))])))

    def epoch():
        for i in range(len(dataset)):
            dataset[i]

    _per_image(benchmark, epoch, len(dataset), impl=impl, stage="worker",
               bytes_per_image=sent)


def _torchvision_loop(batch, boxes, flips, device):
    """The per-sample way on a GPU batch: torchvision.io's batched decode, then one
    torchvision v2 resized_crop (BICUBIC, antialias), flip and normalise call per sample."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    bounds = batch.bounds.tolist()
    images = decode_jpeg([batch.data[a:b] for a, b in zip(bounds, bounds[1:])], device=device)
    out = []
    for img, (top, left, h, w), flip in zip(images, boxes.tolist(), flips.tolist()):
        crop = F.resized_crop(img, top, left, h, w, [SIZE, SIZE], InterpolationMode.BICUBIC,
                              antialias=True)
        crop = F.horizontal_flip(crop) if flip else crop
        out.append(F.normalize(crop.float() / 255, IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(out)


# On a GPU: the fused path (nvJPEG + one resized_crop) against the torchvision loop; on the CPU
# the fused path's CPU step (torchvision.io where it is installed, else Pillow, then the op).
MAIN_IMPLS = ["ours", pytest.param("torchvision_loop", marks=pytest.mark.gpu)] if GPU_SIZES \
    else ["ours"]


@pytest.mark.parametrize("impl", MAIN_IMPLS)
@pytest.mark.parametrize("B", [256] if GPU_SIZES else [32])
def test_loader_main_process(benchmark, jpeg_folder, B, impl):
    """The gpu loader's main-process step for a batch: decode (nvJPEG on CUDA; on the CPU the
    workers decode, so this is the op alone) and one resized_crop call with the official boxes
    (RandomResizedCrop, scale (0.2, 1))."""
    device = torch.device("cuda" if CUDA else "cpu")
    dataset = gpu_data.EncodedDataset(ImageFolderDataset(jpeg_folder, SIZE, split="train"),
                                      ship_jpegs=gpu_data.jpeg_decoder(device) is not None)
    batch, labels, _ = gpu_data.collate_packed([dataset[i % len(dataset)] for i in range(B)])
    if CUDA:
        batch = batch.pin_memory()
    prepare = gpu_data.GpuBatches(SIZE, device, seed=0, train=True, scale=(0.2, 1.0))
    if impl == "torchvision_loop":
        pytest.importorskip("torchvision")
        boxes, flips = prepare.boxes(batch.shapes, epoch=0, step=0)

    def step():
        if impl == "ours":
            imgs, _, skipped = prepare(batch, labels, epoch=0, step=0)
            assert skipped == 0 and imgs.shape == (B, 3, SIZE, SIZE)
        else:
            imgs = _torchvision_loop(batch, boxes, flips, device)
        if CUDA:
            torch.cuda.synchronize()
        return imgs

    _per_image(benchmark, step, B, impl=impl, stage="main", batch=B)
