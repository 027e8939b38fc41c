"""`--data-loader gpu`: DataLoader workers read the files, the run's device decodes the JPEGs
and crops every image in one fused call.

Workers (`EncodedDataset` over an image folder or the built-in shapes, `ShardDataset` over tar
shards) read each file and its header. A JPEG the device decodes (baseline or progressive, RGB
or greyscale, no EXIF orientation to apply) travels as its bytes; every other file (PNG, WebP,
CMYK, 16-bit, an EXIF-rotated JPEG, or any file when the device has no JPEG decoder, as on the
CPU) is decoded in the worker by Pillow exactly as the pil path reads it, and travels as its
(3, H, W) pixels. `collate_packed` packs a batch into one uint8 tensor (`PackedBatch`), which
reaches the main process through shared memory and is pinned there on CUDA: nothing is
pickled per image.

`GpuBatches` prepares a batch in the loader thread (`mae.data.prefetch`): boxes and flips drawn
on the CPU from `step_generator(seed, epoch, rank, step)`, so a resumed run crops exactly as an
uninterrupted one on any device; the JPEGs decoded in one batched call (nvJPEG, through
TorchCodec where it loads, else torchvision.io); the decoded and the shipped images packed on
the device; then one `resized_crop` call (within the op's stated bound of torchvision v2's
`resized_crop(BICUBIC, antialias=True)`). Nothing on this path synchronises the host with the
training stream; sizes come from the headers.

Never silent: a batched decode that fails is split until the files it fails on are found. Each
is given to Pillow: skipped, named and counted where Pillow cannot read it either, decoded on
the CPU and counted as a fallback where it can. A decoder that fails on every JPEG of a batch
Pillow reads is broken, not the files: one warning names the cause and the CPU decodes from
then on (counted), in the loader thread until the DataLoader workers start again, then in the
workers; or, under an explicit `--data-loader gpu`, the run stops with that line.

Evaluation's centre crop is a box in source pixels (`center_crop_boxes`) where `center_resize`
resizes the whole image then crops: within half a source pixel of the same region.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import sys
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from mae_kernels import random_resized_crop_boxes, resized_crop, skip_index_checks, step_generator

from .images import UNREADABLE, ImageFolderDataset, read_rgb, to_rgb

# decoded uint8 bytes per sub-batch: bounds the memory a batch of huge images takes
DECODE_BUDGET = 1 << 30
PRETRAIN_SCALE = (0.2, 1.0)  # main_pretrain.py's RandomResizedCrop scale
# readable JPEGs the device decoder failed on, with no success between them, that make it
# broken (a batch holding two odd files is not a broken decoder)
BROKEN_AFTER = 8
EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass
class WorkerItem:
    """One sample as a worker sends it: `payload` is the file's JPEG bytes (`jpeg`: for the
    device to decode) or its (3, H, W) uint8 pixels; `shape` (H, W) from the header."""
    payload: bytes | np.ndarray
    label: int
    name: str
    shape: tuple[int, int]
    jpeg: bool


def device_decodes(img: Image.Image, data: bytes) -> bool:
    """Whether nvJPEG decodes an opened file as Pillow would: a whole JPEG (it ends with the
    end-of-image marker: Pillow refuses a cut one, nvJPEG might not) in RGB or greyscale with no
    EXIF orientation (TorchCodec applies it, torchvision and Pillow do not)."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and data.endswith(b"\xff\xd9")
            and img.getexif().get(EXIF_ORIENTATION, 1) == 1)


def worker_item(data: bytes, label: int, name: str, ship_jpegs: bool) -> WorkerItem | None:
    """A worker's item of a file's bytes: JPEG bytes the device decodes when `ship_jpegs`,
    else the pixels as the Pillow path reads them (`to_rgb`); None, with a warning naming the
    file, when Pillow cannot read it (counted as skipped, as the Pillow path counts it)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if ship_jpegs and device_decodes(img, data):
                return WorkerItem(data, int(label), str(name), (height, width), True)
            rgb = to_rgb(img)
    except UNREADABLE as exc:
        warnings.warn(f"skipping unreadable image {name}: {exc}", RuntimeWarning, stacklevel=2)
        return None
    return pixels_item(rgb, label, name)


def pixels_item(rgb: Image.Image, label: int, name: str) -> WorkerItem:
    pixels = np.asarray(rgb).transpose(2, 0, 1)  # (3, H, W), a view: packing copies it once
    return WorkerItem(pixels, int(label), str(name), tuple(pixels.shape[1:]), False)


@dataclasses.dataclass
class PackedBatch:
    """A batch as one uint8 buffer: item b is `data[bounds[b]:bounds[b + 1]]`, JPEG bytes where
    `jpeg[b]`, else its (3, H, W) pixels; `shapes` (B, 2) int64 (H, W) from the headers."""
    data: torch.Tensor
    bounds: torch.Tensor
    shapes: torch.Tensor
    jpeg: torch.Tensor
    names: list[str]

    def __len__(self):
        return len(self.names)

    def pin_memory(self):
        """The DataLoader's pinning (on CUDA): the buffer the loader thread copies from."""
        return dataclasses.replace(self, data=self.data.pin_memory())


def collate_packed(batch):
    """`collate_skipping` for worker items: (PackedBatch or None, labels or None, skipped)."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    bounds = np.cumsum([0] + [len(item.payload) if item.jpeg else item.payload.size
                              for item in kept])
    data = _buffer(int(bounds[-1]))
    flat = data.numpy()
    for item, start, stop in zip(kept, bounds, bounds[1:]):
        if item.jpeg:
            flat[start:stop] = np.frombuffer(item.payload, np.uint8)
        else:  # (3, H, W) from Pillow's (H, W, 3): one strided copy
            flat[start:stop].reshape(item.payload.shape)[...] = item.payload
    packed = PackedBatch(data, torch.from_numpy(bounds),
                         torch.tensor([item.shape for item in kept], dtype=torch.int64),
                         torch.tensor([item.jpeg for item in kept]), [item.name for item in kept])
    return packed, torch.tensor([item.label for item in kept]), skipped


def _buffer(numel: int) -> torch.Tensor:
    """A uint8 buffer; in a DataLoader worker, in shared memory from the start, as PyTorch's
    default collation makes its batches: it then reaches the main process without a copy."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(numel, dtype=torch.uint8)
    empty = torch.empty(0, dtype=torch.uint8)
    return empty.new(empty._typed_storage()._new_shared(numel, device="cpu"))


class EncodedDataset(torch.utils.data.Dataset):
    """The worker items of a Pillow data set: an `ImageFolderDataset`'s files (JPEG bytes for
    the device where `ship_jpegs`, else pixels), or the built-in shapes (drawn, as pixels)."""

    collate = staticmethod(collate_packed)

    def __init__(self, base, ship_jpegs: bool = False):
        self.base, self.ship_jpegs = base, ship_jpegs
        self.classes = base.classes

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the boxes are drawn in the main process from (epoch, step)."""

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index: int) -> WorkerItem | None:
        if isinstance(self.base, ImageFolderDataset):
            path, label = self.base.samples[index]
            try:
                data = path.read_bytes()
            except OSError as exc:
                warnings.warn(f"skipping unreadable image {path}: {exc}", RuntimeWarning,
                              stacklevel=2)
                return None
            return worker_item(data, label, str(path), self.ship_jpegs)
        img, label = self.base.load(index)
        return pixels_item(img, label, f"built-in image {index}")


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


@dataclasses.dataclass(frozen=True)
class JpegDecoder:
    """A batched JPEG decoder: `decode(list of 1-D uint8 CPU tensors, device)` -> (3, H, W)
    uint8 tensors on `device`, RGB; raises RuntimeError when any file fails."""
    name: str
    decode: Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


@functools.cache
def torchcodec_decoder() -> tuple[JpegDecoder | None, str | None]:
    """TorchCodec's decoder where it loads with this torch, else (None, why not)."""
    try:
        import torchcodec
        from torchcodec.decoders import decode_jpeg
    except ImportError:
        return None, None
    except (OSError, RuntimeError) as exc:  # built for another torch or CUDA: its library
        return None, f"torchcodec is installed but does not load ({str(exc).splitlines()[0]})"

    def decode(tensors, device):
        return decode_jpeg(tensors, mode="RGB", device=device)

    return JpegDecoder(f"torchcodec {torchcodec.__version__}", decode), None


QUIET = ".*TorchCodec"  # torchvision's deprecation of its decoders


@functools.cache
def torchvision_decoder() -> tuple[JpegDecoder | None, str | None]:
    """torchvision.io's decoder where torchvision imports, else (None, why not)."""
    try:
        import torchvision
        import torchvision.io as tvio
    except ImportError:
        return None, None
    except RuntimeError as exc:  # one built for another torch: its ops do not register
        return None, f"torchvision does not import ({str(exc).splitlines()[0]})"
    def decode(tensors, device):
        # torchvision >= 0.29 points each call to TorchCodec, which is chosen first where it
        # loads: said once in the recipe, not per batch (checked each call: a test harness
        # may reset the filters between calls)
        if not any(f[0] == "ignore" and f[1] is not None and f[1].pattern == QUIET
                   for f in warnings.filters):
            warnings.filterwarnings("ignore", message=QUIET, category=DeprecationWarning)
        return tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=device)

    return JpegDecoder(f"torchvision {torchvision.__version__}", decode), None


def jpeg_decoder(device) -> JpegDecoder | None:
    """The device's JPEG decoder: nvJPEG through TorchCodec, else torchvision.io, on CUDA;
    None on the CPU, where the DataLoader workers decode (in parallel, with Pillow)."""
    if torch.device(device).type != "cuda":
        return None
    return torchcodec_decoder()[0] or torchvision_decoder()[0]


def decoding_note(device) -> str:
    """Who decodes what under --data-loader gpu on `device`, for the recipe printout."""
    decoder = jpeg_decoder(device)
    if decoder is not None:
        note = (f"JPEGs decoded by {decoder.name} (nvJPEG), other files by Pillow in the "
                f"DataLoader workers; crops on {device}")
    elif torch.device(device).type == "cuda":
        note = (f"Pillow decodes in the DataLoader workers (no torchcodec or torchvision to "
                f"decode JPEGs on the GPU); crops on {device}")
    else:
        note = f"Pillow decodes in the DataLoader workers; crops on {device}"
    if torch.device(device).type == "cuda":  # why not the one before it
        note += "".join(f"; {why}" for why in (torchcodec_decoder()[1], torchvision_decoder()[1])
                        if why)
    return note


def default_loader(device, video: bool = False) -> str:
    """--data-loader's default: gpu on CUDA where a GPU JPEG decoder loads, else pil (whose
    workers also augment: without a decoder the gpu path only moves the crop)."""
    return "gpu" if not video and jpeg_decoder(device) is not None else "pil"


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
    if explicit_gpu_loader(args):
        square_side(size)  # raises, naming the flag
    print(f"--data-loader pil: the input size {size[0]}x{size[1]} is not square, and the gpu "
          f"loader crops squares")
    args.data_loader = "pil"


def explicit_gpu_loader(args) -> bool:
    """--data-loader gpu was asked for (flag or --config), not chosen as the default."""
    return getattr(args, "sources", {}).get("data_loader") in ("flag", "config")


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


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host synchronisation: pinned, copied
    asynchronously on the current stream (the caching host allocator keeps the pinned copy
    until the transfer is done)."""
    if device.type != "cuda":
        return tensor
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class GpuBatches:
    """`prepare(batch, labels, epoch, step)` of `--data-loader gpu`, on what the workers send
    (a `PackedBatch` or None): (images (K, 3, S, S) float32 on `device` or None, labels on
    `device` or None, files that did not decode). `fallbacks` counts the files the device
    decoder failed on that Pillow decoded.

    Training boxes: `random_resized_crop_boxes(scale, ratio)` and flips (probability `hflip`)
    from the CPU generator `step_generator(seed, epoch, rank, step)`; evaluation
    (`train=False`): the centre crop (`center_crop_boxes`), no flip. `decoder` (default: the
    device's, `jpeg_decoder`) takes the JPEG bytes; `strict`: a broken decoder stops the run."""

    def __init__(self, size: int, device, seed: int = 0, rank: int = 0, train: bool = True,
                 scale=PRETRAIN_SCALE, ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 budget: int = DECODE_BUDGET, decoder: JpegDecoder | None = None,
                 strict: bool = False):
        self.size, self.device = square_side(size), torch.device(device)
        self.seed, self.rank, self.train = seed, rank, train
        self.scale, self.ratio, self.hflip, self.budget = tuple(scale), tuple(ratio), hflip, budget
        self.decoder = decoder or jpeg_decoder(self.device)
        self.strict = strict
        self.fallbacks = 0
        self._failing = 0  # JPEGs Pillow read that the device failed on, since it last decoded

    def take_fallbacks(self) -> int:
        """The files decoded on the CPU after the device decoder failed, since the last call."""
        fallbacks, self.fallbacks = self.fallbacks, 0
        return fallbacks

    def boxes(self, shapes: torch.Tensor, epoch: int, step: int):
        """(boxes (B, 4), flips (B,)) on the CPU for a batch of `shapes` (B, 2) at (epoch, step)."""
        if not self.train:
            return center_crop_boxes(shapes, self.size), torch.zeros(len(shapes), dtype=torch.bool)
        generator = step_generator(self.seed, epoch, self.rank, step)
        boxes = random_resized_crop_boxes(shapes, self.scale, self.ratio, generator=generator)
        flips = torch.rand(len(shapes), generator=generator) < self.hflip
        return boxes, flips

    def __call__(self, batch: PackedBatch | None, labels, epoch: int, step: int):
        if batch is None:
            return None, None, 0
        boxes, flips = self.boxes(batch.shapes, epoch, step)
        shapes = batch.shapes.tolist()
        outputs, kept = [], []
        for chunk in _chunks([3 * h * w for h, w in shapes], self.budget):
            images = self._decode(batch, chunk, shapes)
            readable = [b for b in chunk if b in images]
            if readable:
                outputs.append(self._crop([images[b] for b in readable], boxes[readable],
                                          flips[readable]))
                kept += readable
        if not kept:
            return None, None, len(batch)
        imgs = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if len(kept) < len(batch):
            labels = labels[kept]
        return imgs, _to_device(labels, self.device), len(batch) - len(kept)

    def _crop(self, images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor):
        """One `resized_crop` call on decoded (3, H, W) images on the device; the boxes were
        drawn in their bounds (from the headers the decodes matched): no index checks."""
        sizes = torch.tensor([img.numel() for img in images])
        meta = torch.cat([torch.tensor([img.shape[1:] for img in images]).view(-1, 2),
                          (torch.cumsum(sizes, 0) - sizes)[:, None], boxes], 1)
        meta, flips = _to_device(meta, self.device), _to_device(flips, self.device)
        data = torch.cat([img.reshape(-1) for img in images])
        with skip_index_checks():
            return resized_crop(data, meta[:, 3:], self.size, flips, shapes=meta[:, :2],
                                offsets=meta[:, 2])

    def _decode(self, batch: PackedBatch, chunk: list[int], shapes) -> dict[int, torch.Tensor]:
        """{index: (3, H, W) uint8 on the device} of the files of `chunk` that decode to their
        header's size; a warning names each other one."""
        bounds, jpeg = batch.bounds.tolist(), batch.jpeg.tolist()
        views = {b: batch.data[bounds[b]:bounds[b + 1]] for b in chunk}
        images = {b: _to_device(views[b].view(3, *shapes[b]), self.device)
                  for b in chunk if not jpeg[b]}
        images.update(self._decode_jpegs([b for b in chunk if jpeg[b]], views, batch.names))
        for b, img in list(images.items()):
            if tuple(img.shape[1:]) != tuple(shapes[b]) or img.shape[0] != 3:
                warnings.warn(f"skipping image {batch.names[b]}: it decoded to "
                              f"{tuple(img.shape)}, its header says (3, {shapes[b][0]}, "
                              f"{shapes[b][1]})", RuntimeWarning, stacklevel=2)
                del images[b]
        return images

    def _decode_jpegs(self, ids: list[int], views, names) -> dict[int, torch.Tensor]:
        if not ids:
            return {}
        if self.decoder is None:  # the device decoder broke earlier in the run
            self.fallbacks += len(ids)
            return self._pillow(ids, views, names)
        if self.device.type == "cuda":
            # NOTE: nvJPEG may write into memory the caching allocator reuses from tensors
            # that kernels still queued on the stream read (pytorch/vision PR #9606,
            # meta-pytorch/torchcodec #1634): this thread's own stream finishes first. The
            # training stream is not waited for: what it reads was recorded on it.
            torch.cuda.current_stream(self.device).synchronize()
        decoded, error = self._bisect(ids, views)
        failed = [b for b in ids if decoded[b] is None]
        if len(failed) < len(ids):
            self._failing = 0  # the device decodes: whatever failed is the files' doing
        if not failed:
            return decoded
        rescued = self._pillow(failed, views, names)
        if len(failed) == len(ids):
            self._failing += len(rescued)
        if self._failing >= BROKEN_AFTER:
            self._broken(error)  # the decoder, not the files
        else:
            for b in rescued:
                warnings.warn(f"{self.decoder.name} failed on {names[b]} ({error}); decoded "
                              f"on the CPU by Pillow", RuntimeWarning, stacklevel=2)
        self.fallbacks += len(rescued)
        return {**{b: img for b, img in decoded.items() if img is not None}, **rescued}

    def _bisect(self, ids: list[int], views):
        """({index: decoded or None}, the last error): the batch decoded at once, or, where the
        call fails, each half of it, down to the files that fail alone."""
        try:
            return dict(zip(ids, self.decoder.decode([views[b] for b in ids], self.device))), None
        except RuntimeError as exc:  # torch.OutOfMemoryError too: nvJPEG uses cudaMalloc
            if self.device.type == "cuda" and isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(ids) == 1:
                return {ids[0]: None}, exc
            half = len(ids) // 2
            first, first_error = self._bisect(ids[:half], views)
            second, second_error = self._bisect(ids[half:], views)
            return {**first, **second}, second_error or first_error

    def _pillow(self, ids: list[int], views, names) -> dict[int, torch.Tensor]:
        """{index: pixels on the device} of the files Pillow reads (a warning names the others)."""
        images = {}
        for b in ids:
            rgb = read_rgb(io.BytesIO(views[b].numpy().tobytes()), names[b])
            if rgb is not None:
                pixels = torch.from_numpy(np.asarray(rgb).transpose(2, 0, 1).copy())
                images[b] = _to_device(pixels, self.device)
        return images

    def _broken(self, error) -> None:
        line = (f"{self.decoder.name} failed on {self._failing} JPEGs in a row that Pillow "
                f"decodes ({error})")
        if self.strict:
            raise ValueError(f"--data-loader gpu: {line}; use --data-loader pil (Pillow in the "
                             f"DataLoader workers)")
        print(f"warning: {line}: the CPU decodes the JPEGs from now on, in the loader thread "
              f"(counted as decode_fallbacks) until the DataLoader workers start again (the "
              f"next epoch) and decode them", file=sys.stderr)
        self.decoder = None

    def before_iteration(self, loader) -> None:
        """An iteration of `loader` starts (the Prefetcher calls this before its workers
        start): once the device decoder broke, the workers decode the JPEGs, in parallel, and
        the loader thread no longer does (the pixels are the same: Pillow's either way)."""
        dataset = getattr(loader, "dataset", None)
        if self.decoder is None and getattr(dataset, "ship_jpegs", False):
            dataset.ship_jpegs = False
