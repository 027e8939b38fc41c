"""`--data-loader gpu`: bytes-only DataLoader workers, decoding and augmentation in the main
process on the run's device.

Workers read each file's bytes and label, and its (H, W) from the header (Pillow's `Image.open`
reads only the header): `EncodedDataset` over an image folder or the built-in shapes (each
drawn image encoded as PNG in the worker: lossless, so the pixels are exactly the Pillow path's),
`collate_encoded` into an `EncodedBatch`. The main process (`GpuBatches`, called by the epoch
loop with the step) draws the batch's boxes and flips from `step_generator(seed, epoch, rank,
step)`, so a resumed run crops exactly as an uninterrupted one, then `decode_resized_crop`:
JPEGs (RGB) decoded in sub-batches by `torchvision.io.decode_jpeg` (batched nvJPEG on CUDA),
every other file (PNG, CMYK, greyscale, 16-bit, or no torchvision) by Pillow on the CPU as
`.images.to_rgb` reads it, each image cut to its box at once, then `mae_kernels.resized_crop`
writes the normalised (B, 3, S, S) float32 batch (one call while the crops fit the byte budget).

Numerically (the op's docstring states the bounds): the op filters in float and rounds once;
Pillow rounds to uint8 between its two passes. Evaluation's centre crop is a box in source
pixels (`center_crop_boxes`), rounded to whole pixels, where `center_resize` resizes the whole
image then crops: within half a source pixel of the same region, and the filter does not reach
outside the box.
"""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mae_kernels import random_resized_crop_boxes, resized_crop, step_generator

from .images import UNREADABLE, ImageFolderDataset, read_rgb

# decoded uint8 bytes in flight per sub-batch: bounds the memory a batch of huge images takes
DECODE_BUDGET = 1 << 30
PRETRAIN_SCALE = (0.2, 1.0)  # main_pretrain.py's RandomResizedCrop scale


@dataclass
class EncodedItem:
    """One sample as a worker sends it: file bytes, label, name (for warnings), (H, W), and
    whether it is an RGB JPEG (decodable by torchvision.io, on the GPU too)."""
    data: bytes
    label: int
    name: str
    shape: tuple[int, int]
    jpeg: bool


def encoded_item(data: bytes, label: int, name: str) -> EncodedItem | None:
    """The item of a file's bytes; None, with a warning naming it, when its header is not an
    image Pillow reads (counted as skipped, as the Pillow path counts it)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            jpeg = img.format == "JPEG" and img.mode == "RGB"
    except UNREADABLE as exc:
        warnings.warn(f"skipping unreadable image {name}: {exc}", RuntimeWarning, stacklevel=2)
        return None
    return EncodedItem(data, int(label), str(name), (height, width), jpeg)


@dataclass
class EncodedBatch:
    """A batch of readable headers: bytes, names, (B, 2) int64 shapes (H, W), RGB-JPEG flags."""
    data: list[bytes]
    names: list[str]
    shapes: torch.Tensor
    jpeg: list[bool]

    def __len__(self):
        return len(self.data)


def collate_encoded(batch):
    """`collate_skipping` for bytes: (EncodedBatch or None, labels or None, skipped count)."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    encoded = EncodedBatch([item.data for item in kept], [item.name for item in kept],
                           torch.tensor([item.shape for item in kept], dtype=torch.int64),
                           [item.jpeg for item in kept])
    return encoded, torch.tensor([item.label for item in kept]), skipped


class EncodedDataset(torch.utils.data.Dataset):
    """Bytes-only items (`EncodedItem`, or None for a file that cannot be read) of a Pillow data
    set: an `ImageFolderDataset`'s files, or the built-in shapes encoded as PNG."""

    collate = staticmethod(collate_encoded)

    def __init__(self, base):
        self.base = base
        self.classes = base.classes

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the boxes are drawn in the main process from (epoch, step)."""

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index: int) -> EncodedItem | None:
        if isinstance(self.base, ImageFolderDataset):
            path, label = self.base.samples[index]
            try:
                data = path.read_bytes()
            except OSError as exc:
                warnings.warn(f"skipping unreadable image {path}: {exc}", RuntimeWarning,
                              stacklevel=2)
                return None
            return encoded_item(data, label, str(path))
        img, label = self.base.load(index)
        buffer = io.BytesIO()
        img.save(buffer, "PNG", compress_level=1)  # lossless; level 1: the cheapest to write
        return encoded_item(buffer.getvalue(), label, f"built-in image {index}")


def center_crop_boxes(shapes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 4) boxes (top, left, height, width) in source pixels of `mae.data.images.center_resize`'s
    crop: the short side resized to size * 256 / 224, the centre size x size kept; its region
    mapped back to the source and rounded to whole pixels (within half a pixel of it)."""
    boxes = []
    for H, W in shapes.tolist():
        scale = max(size / H, size / W) * 256 / 224
        resized_h, resized_w = max(size, round(H * scale)), max(size, round(W * scale))
        top, left = (resized_h - size) // 2, (resized_w - size) // 2
        h = min(H, max(1, round(size * H / resized_h)))
        w = min(W, max(1, round(size * W / resized_w)))
        boxes.append((min(round(top * H / resized_h), H - h),
                      min(round(left * W / resized_w), W - w), h, w))
    return torch.tensor(boxes, dtype=torch.int64).view(-1, 4)


@functools.cache
def _torchvision_io():
    """torchvision.io where torchvision imports (its decoders are faster), else None."""
    try:
        import torchvision.io
    except ImportError:  # the default install has no torchvision: Pillow decodes
        return None
    except RuntimeError as exc:  # one built for another torch: its ops do not register
        warnings.warn(f"torchvision does not import ({str(exc).splitlines()[0]}): Pillow "
                      f"decodes the images on the CPU", RuntimeWarning, stacklevel=2)
        return None
    return torchvision.io


def default_loader(device, video: bool = False) -> str:
    """--data-loader's default: gpu on CUDA where torchvision.io imports (nvJPEG decodes
    there), else pil; without torchvision the main process would decode every image with
    Pillow alone, where pil's DataLoader workers decode in parallel."""
    cuda = torch.device(device).type == "cuda"
    return "gpu" if cuda and not video and _torchvision_io() is not None else "pil"


def pillow_fallback_warning(device) -> str | None:
    """The warning for an explicit --data-loader gpu on CUDA without torchvision.io."""
    if torch.device(device).type == "cuda" and _torchvision_io() is None:
        return ("warning: --data-loader gpu without torchvision: the main process decodes "
                "every image with Pillow (install torchvision for nvJPEG, or use --data-loader "
                "pil to decode in the DataLoader workers)")
    return None


def square_side(size) -> int:
    """The side of a square input size (an int, or a checkpoint's [H, W] with H == W): the
    op writes size x size crops (`resized_crop` takes one side)."""
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ValueError(f"--data-loader gpu needs a square --input-size, got {height}x{width}; "
                         f"use --data-loader pil")
    return int(height)


def loader_for_size(args, size) -> None:
    """Resolves --data-loader gpu against the run's input size once it is known (a
    fine-tuning or probe takes a checkpoint's, possibly [H, W]): a non-square size goes
    through the Pillow path with one line saying so, or, where --data-loader gpu was asked
    for (flag or --config), is refused (ValueError)."""
    if args.data_loader != "gpu" or isinstance(size, int) or size[0] == size[1]:
        return
    if getattr(args, "sources", {}).get("data_loader") in ("flag", "config"):
        square_side(size)  # raises, naming the flag
    print(f"--data-loader pil: the input size {size[0]}x{size[1]} is not square, and the gpu "
          f"loader crops squares")
    args.data_loader = "pil"


def _pillow_decode(data: bytes, name: str) -> torch.Tensor | None:
    """(3, H, W) uint8 on the CPU, as the Pillow path reads the file (`to_rgb`)."""
    img = read_rgb(io.BytesIO(data), name)
    if img is None:
        return None
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _decode(batch: EncodedBatch, indices: list[int], device: torch.device):
    """{index: (3, H, W) uint8 (on `device` or the CPU) or None} for a sub-batch: RGB JPEGs
    through torchvision.io in one batched call (on the device when it is CUDA), the rest, and
    any file that call refuses, by Pillow."""
    tvio = _torchvision_io()
    images = {}
    jpegs = [b for b in indices if batch.jpeg[b]] if tvio is not None else []
    if jpegs:
        where = device if device.type == "cuda" else torch.device("cpu")
        encoded = [torch.frombuffer(bytearray(batch.data[b]), dtype=torch.uint8) for b in jpegs]
        try:
            if where.type == "cuda":
                # NOTE: nvJPEG may write into memory the caching allocator reuses from tensors
                # that kernels still queued on the stream read (pytorch/vision PR #9606,
                # meta-pytorch/torchcodec #1634): let them finish first
                torch.cuda.current_stream(where).synchronize()
            decoded = tvio.decode_jpeg(encoded, mode=tvio.ImageReadMode.RGB, device=where)
        except RuntimeError:  # one bad file fails the call: those files go one by one below
            decoded = [None] * len(jpegs)
        images.update(zip(jpegs, decoded))
    for b in indices:
        if images.get(b) is None:
            images[b] = _pillow_decode(batch.data[b], batch.names[b])
    return images


def _chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of indices whose sizes add up to at most `budget` (or one alone)."""
    runs, total = [[]], 0
    for b, n in enumerate(sizes):
        if runs[-1] and total + n > budget:
            runs.append([])
            total = 0
        runs[-1].append(b)
        total += n
    return runs if runs[0] else []


def decode_resized_crop(batch: EncodedBatch, boxes: torch.Tensor, flips: torch.Tensor,
                        size: int, device, budget: int = DECODE_BUDGET):
    """Decode `batch`, crop each image to its box (top, left, height, width in the header's
    (H, W)), resize to size x size, flip, normalise: ((K, 3, size, size) float32 on `device`,
    the K indices into the batch that decoded). A file that does not decode is skipped with a
    warning naming it.

    Memory: images are decoded in sub-batches of at most `budget` decoded bytes (one image
    alone when it is larger) and cut to their box at once; the op runs on the crops gathered
    so far whenever the next sub-batch would take them past the budget (once per batch when
    they fit): at most about twice `budget` bytes are held, or one image and its crop where a
    single image is larger, whatever the batch holds."""
    device = torch.device(device)
    boxes, flips = boxes.cpu(), flips.cpu()
    sizes = [3 * h * w for h, w in batch.shapes.tolist()]
    out = torch.empty(len(batch), 3, size, size, device=device)
    pending, held, kept = [], 0, []

    def run_op():
        nonlocal held
        if pending:
            index = [b for b, _ in pending]
            crops = [crop for _, crop in pending]
            whole = torch.tensor([[0, 0, c.shape[1], c.shape[2]] for c in crops],
                                 dtype=torch.int64, device=device)
            out[index] = resized_crop(crops, whole, size, flips[index].to(device))
            kept.extend(index)
            pending.clear()
            held = 0

    for chunk in _chunks(sizes, budget):
        if held + sum(sizes[b] for b in chunk) > budget:
            run_op()
        for b, img in _decode(batch, chunk, device).items():
            name = batch.names[b]
            if img is not None and tuple(img.shape[1:]) != tuple(batch.shapes[b].tolist()):
                warnings.warn(f"skipping image {name}: it decoded to {tuple(img.shape[1:])}, "
                              f"its header says {tuple(batch.shapes[b].tolist())}",
                              RuntimeWarning, stacklevel=2)
                img = None
            if img is None:
                continue
            top, left, h, w = boxes[b].tolist()
            crop = img[:, top:top + h, left:left + w]
            if crop.numel() < img.numel() or crop.device != device:
                # a copy of the box alone (the upload of a CPU-decoded one), so the whole
                # decoded image is freed with its sub-batch
                crop = crop.to(device, copy=True, memory_format=torch.contiguous_format)
            pending.append((b, crop))
            held += crop.numel()
    run_op()
    kept_sorted = sorted(kept)
    return out[kept_sorted], kept_sorted


class GpuBatches:
    """The main-process step of `--data-loader gpu`: called as `prepare(batch, labels, epoch,
    step)` on what the loader yields (an `EncodedBatch` or None), it returns (images (B, 3, S, S)
    float32 on `device` or None, labels on `device` or None, files that did not decode).

    Training boxes: `random_resized_crop_boxes(scale, ratio)` and flips (probability `hflip`)
    from `step_generator(seed, epoch, rank, step, device)`; evaluation (`train=False`): the
    centre crop (`center_crop_boxes`), no flip."""

    def __init__(self, size: int, device, seed: int = 0, rank: int = 0, train: bool = True,
                 scale=PRETRAIN_SCALE, ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 budget: int = DECODE_BUDGET):
        self.size, self.device = square_side(size), torch.device(device)
        self.seed, self.rank, self.train = seed, rank, train
        self.scale, self.ratio, self.hflip, self.budget = tuple(scale), tuple(ratio), hflip, budget

    def boxes(self, shapes: torch.Tensor, epoch: int, step: int):
        """(boxes (B, 4), flips (B,)) for a batch of `shapes` (B, 2) at (epoch, step)."""
        if not self.train:
            return center_crop_boxes(shapes, self.size), torch.zeros(len(shapes), dtype=torch.bool)
        generator = step_generator(self.seed, epoch, self.rank, step, self.device)
        boxes = random_resized_crop_boxes(shapes.to(self.device), self.scale, self.ratio,
                                          generator=generator)
        flips = torch.rand(len(shapes), generator=generator, device=self.device) < self.hflip
        return boxes, flips

    def __call__(self, batch: EncodedBatch | None, labels, epoch: int, step: int):
        if batch is None:
            return None, None, 0
        boxes, flips = self.boxes(batch.shapes, epoch, step)
        imgs, kept = decode_resized_crop(batch, boxes, flips, self.size, self.device,
                                         self.budget)
        if not kept:
            return None, None, len(batch)
        return imgs, labels[kept].to(self.device), len(batch) - len(kept)


class DecodedLoader:
    """A loader of `EncodedBatch`es as one of images: (images, labels, skipped) per step,
    through `prepare` (a `GpuBatches` of evaluation: centre boxes, the same every epoch); for
    the loops that iterate a loader themselves (evaluation, feature extraction). Training
    passes `prepare` to `engine.train_one_epoch`, which gives it the epoch and step."""

    def __init__(self, loader, prepare: GpuBatches):
        self.loader, self.prepare = loader, prepare

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for step, (batch, labels, skipped) in enumerate(self.loader):
            imgs, labels, unreadable = self.prepare(batch, labels, 0, step)
            yield imgs, labels, skipped + unreadable

