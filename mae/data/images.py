"""Datasets and the official MAE augmentation, in Pillow (no torchvision needed).

- `ImageFolderDataset`: DIR/train/<class>/*.jpg|png (or DIR/<class>/..., or a flat folder).
  Unreadable images are skipped with a warning and counted, never crash a run (an epoch in
  which none was readable stops it: see `engine.train_one_epoch`). A class folder without an
  image is an error, as in torchvision's `ImageFolder`. 16-bit greyscale images are scaled to
  8 bits.
- `ShapesDataset`: the built-in data set: procedurally drawn shapes and textures in ten classes,
  deterministic per index, so a first run needs no download.
Augmentation randomness is drawn from (seed, epoch, index), so a resumed run sees exactly the
images an uninterrupted one would.
"""
from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from mae_kernels.augment import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


# Pillow's integer modes: 16-bit greyscale (PNG, TIFF) opens as "I;16*" or, in older Pillows, "I"
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB. `convert("RGB")` clips 16-bit values at 255 (a mid-grey
    16-bit PNG would load white), so those are scaled to 8 bits first."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.float32).clip(0, 65535) / 257
        img = Image.fromarray(values.round().astype(np.uint8), "L")
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32, normalised with the ImageNet mean and std."""
    return normalize(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) in [0, 1] -> normalised with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """(…, 3, H, W) normalised -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def random_resized_crop(img: Image.Image, size: tuple[int, int], rng: random.Random,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio` (log-uniform), then
    resize it bicubically, as torchvision's RandomResizedCrop does (`resize(box=)` would filter
    with the pixels around the box, not only those inside it); after ten misses, the centre
    crop at the nearest allowed ratio."""
    W, H = img.size
    area = W * H
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            left, top = rng.randint(0, W - w), rng.randint(0, H - h)
            break
    else:
        in_ratio = W / H
        if in_ratio < ratio[0]:
            w, h = W, round(W / ratio[0])
        elif in_ratio > ratio[1]:
            w, h = round(H * ratio[1]), H
        else:
            w, h = W, H
        left, top = (W - w) // 2, (H - h) // 2
    return img.crop((left, top, left + w, top + h)).resize((size[1], size[0]), Image.BICUBIC)


def center_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Evaluation transform: resize the short side to 256/224 of the target, centre crop."""
    W, H = img.size
    scale = max(size[0] / H, size[1] / W) * 256 / 224
    img = img.resize((max(size[1], round(W * scale)), max(size[0], round(H * scale))),
                     Image.BICUBIC)
    W, H = img.size
    left, top = (W - size[1]) // 2, (H - size[0]) // 2
    return img.crop((left, top, left + size[1], top + size[0]))


class Augmented(torch.utils.data.Dataset):
    """Shared epoch/seed handling: subclasses provide `load(index) -> (PIL image | None, label)`."""

    def __init__(self, size, train: bool, seed: int):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        img, label = self.load(index)
        if img is None:
            return None
        return self.transform(img, index), label

    def transform(self, img: Image.Image, index: int) -> torch.Tensor:
        """Item `index`'s augmented (or centre-cropped) image as a normalised tensor."""
        if self.train:
            rng = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
            img = random_resized_crop(img, self.size, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = center_resize(img, self.size)
        return to_tensor(img)


class ImageFolderDataset(Augmented):
    def __init__(self, root, size, train: bool = True, seed: int = 0, split: str | None = None,
                 required: bool = False):
        super().__init__(size, train, seed)
        root = Path(root)
        split = split or ("train" if train else "val")
        split_dir = root / split
        if not root.is_dir():
            raise FileNotFoundError(f"--data-path {root} is not a directory")
        if required and not split_dir.is_dir():
            raise FileNotFoundError(f"--data-path {root} has no {split!r} split: expected "
                                    f"{split_dir}/<class>/<image> folders")
        base = split_dir if split_dir.is_dir() else root
        classes = sorted(d.name for d in base.iterdir() if d.is_dir())
        if classes:
            self.samples = [(p, i) for i, c in enumerate(classes)
                            for p in sorted((base / c).rglob("*"))
                            if p.suffix.lower() in IMAGE_SUFFIXES]
            check_no_empty_class(base, classes, {label for _, label in self.samples},
                                 IMAGE_SUFFIXES)
        else:
            self.samples = [(p, 0) for p in sorted(base.iterdir())
                            if p.suffix.lower() in IMAGE_SUFFIXES]
        self.classes = classes or ["images"]
        if not self.samples:
            raise FileNotFoundError(f"no images found under {base}")

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        path, label = self.samples[index]
        return read_rgb(path, path), label


# what Pillow raises for a file it cannot read
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


def read_rgb(source, name) -> Image.Image | None:
    """An image file (a path or a file object) as 8-bit RGB; None, with a warning naming it,
    when it cannot be read."""
    try:
        with Image.open(source) as img:
            return to_rgb(img)
    except UNREADABLE as exc:
        warnings.warn(f"skipping unreadable image {name}: {exc}", RuntimeWarning, stacklevel=3)
        return None


def check_no_empty_class(base: Path, classes: list[str], found: set[int], suffixes) -> None:
    """A class folder holding no sample would still be a class (a label no sample has, a
    classifier output that never trains): an error, as torchvision's `ImageFolder` makes it."""
    empty = [c for i, c in enumerate(classes) if i not in found]
    if empty:
        raise FileNotFoundError(f"found no valid file for the classes {', '.join(empty)} under "
                                f"{base}; supported extensions are: "
                                f"{', '.join(sorted(suffixes))}")


SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes",
                 "checker", "dots", "diamond")


def draw_shape(label: int, rng: random.Random, size: int = 64) -> Image.Image:
    """One image of class `label`: a shape or texture in a random colour, place and size, on a
    random background with a faint gradient."""
    def colour():
        return tuple(rng.randint(0, 255) for _ in range(3))

    top = np.array(colour(), np.float32)
    bottom = np.clip(top + np.array([rng.uniform(-40, 40) for _ in range(3)], np.float32), 0, 255)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    background = (top * (1 - t) + bottom * t).repeat(size, axis=1)
    img = Image.fromarray(background.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    fg = colour()
    r = rng.uniform(0.25, 0.45) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    name = SHAPE_CLASSES[label]
    if name == "circle":
        d.ellipse(box, fill=fg)
    elif name == "square":
        d.rectangle(box, fill=fg)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == "ring":
        d.ellipse(box, outline=fg, width=max(2, int(r / 3)))
    elif name == "cross":
        w = r / 3
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
    elif name == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    else:  # textures fill the whole image
        period = rng.randint(6, 12)
        for a in range(0, size, period):
            for b in range(0, size, period):
                if name == "h-stripes" and b == 0:
                    d.rectangle((0, a, size, a + period // 2), fill=fg)
                elif name == "v-stripes" and b == 0:
                    d.rectangle((a, 0, a + period // 2, size), fill=fg)
                elif name == "checker" and (a // period + b // period) % 2 == 0:
                    d.rectangle((a, b, a + period - 1, b + period - 1), fill=fg)
                elif name == "dots":
                    q = period / 4
                    d.ellipse((a + q, b + q, a + 3 * q, b + 3 * q), fill=fg)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))


class BuiltIn:
    """The built-in data sets' splits: `length` items, class = index % 10; each split draws from
    its own stream of the generator, one seeded stream per item."""

    classes = list(SHAPE_CLASSES)
    SPLITS = ("train", "val")

    def _set_split(self, length: int, split: str | None, train: bool) -> None:
        self.length = length
        split = split or ("train" if train else "val")
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        self.split_seed = self.SPLITS.index(split)

    def __len__(self):
        return self.length

    def drawing(self, index: int) -> tuple[int, random.Random]:
        """(label, the generator that draws item `index`)."""
        return index % len(SHAPE_CLASSES), random.Random(self.split_seed * 10_000_019 + index)


class ShapesDataset(BuiltIn, Augmented):
    """The built-in data set: `length` images of the ten classes, drawn at 64x64."""

    def __init__(self, size=32, train: bool = True, length: int = 4096, seed: int = 0,
                 split: str | None = None):
        super().__init__(size, train, seed)
        self._set_split(length, split, train)

    def load(self, index):
        label, rng = self.drawing(index)
        return draw_shape(label, rng), label


def collate_skipping(batch):
    """Default collation over the readable samples; also returns how many were skipped."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    imgs, labels = torch.utils.data.default_collate(kept)
    return imgs, labels, skipped


def build_dataset(data_path, size, split: str, augment: bool, seed: int = 0,
                  length: int | None = None, required: bool = True):
    """The `split` ("train" or "val") of an image folder, or of the built-in shapes. A folder
    without DIR/<split> is an error when `required` (labelled splits: probing, fine-tuning),
    else its images are used as they are (pre-training needs no labels)."""
    if data_path:
        return ImageFolderDataset(data_path, size, train=augment, seed=seed, split=split,
                                  required=required)
    return ShapesDataset(size, train=augment, seed=seed, split=split,
                         length=length or (4096 if split == "train" else 1024))
