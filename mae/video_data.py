"""Video data sets, as clips (C, T, H, W) normalised like the images, with one crop and flip per
clip (every frame gets the same), drawn from (seed, epoch, index) as the image data sets are.

- `MovingShapesDataset`: the built-in videos: each clip pans a window across a larger drawing
  of one of the ten shapes/textures of the image data set, so the content moves steadily; the
  class is the shape's. No download.
- `VideoFolderDataset`: DIR/[split/]<class>/<clip>, where a clip is a folder of frames (sorted by
  name) or a video file (needs PyAV: the `[video]` extra). `num_frames` frames are taken
  `sampling_rate` apart (VideoMAE's sampling), from a random start when training, the middle
  otherwise; clips shorter than that repeat their last frame.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch
from PIL import Image

from .data import (
    IMAGE_SUFFIXES,
    Augmented,
    BuiltIn,
    center_resize,
    draw_shape,
    random_resized_crop,
    to_tensor,
)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


class Clips(Augmented):
    """Shared sampling and augmentation: subclasses provide `load(index, rng) -> (list of PIL
    frames | None, label)`."""

    def __init__(self, size, num_frames: int, train: bool, seed: int):
        super().__init__(size, train, seed)
        self.num_frames = num_frames

    def __getitem__(self, index: int):
        rng = random.Random((self.seed * 1_000_003 + self.epoch * self.train) * 1_000_003 + index)
        frames, label = self.load(index, rng)
        if frames is None:
            return None
        if self.train:  # the same crop and flip for every frame
            state, flip = rng.getstate(), rng.random() < 0.5
            out = []
            for frame in frames:
                rng.setstate(state)
                frame = random_resized_crop(frame, self.size, rng)
                out.append(frame.transpose(Image.FLIP_LEFT_RIGHT) if flip else frame)
            frames = out
        else:
            frames = [center_resize(frame, self.size) for frame in frames]
        return torch.stack([to_tensor(f) for f in frames], dim=1), label


class MovingShapesDataset(BuiltIn, Clips):
    """The built-in videos: `length` clips of the ten classes."""

    def __init__(self, size=32, num_frames: int = 8, train: bool = True, length: int = 2048,
                 seed: int = 0, split: str | None = None):
        super().__init__(size, num_frames, train, seed)
        self._set_split(length, split, train)

    def load(self, index, rng):
        label, draw = self.drawing(index)
        canvas = draw_shape(label, draw, size=96)
        # a 64x64 window moving at a constant velocity across the 96x96 drawing
        x0, y0 = draw.uniform(0, 32), draw.uniform(0, 32)
        x1, y1 = draw.uniform(0, 32), draw.uniform(0, 32)
        steps = max(self.num_frames - 1, 1)
        frames = []
        for k in range(self.num_frames):
            x = x0 + (x1 - x0) * k / steps
            y = y0 + (y1 - y0) * k / steps
            frames.append(canvas.crop((round(x), round(y), round(x) + 64, round(y) + 64)))
        return frames, label


class VideoFolderDataset(Clips):
    def __init__(self, root, size, num_frames: int, sampling_rate: int = 4, train: bool = True,
                 seed: int = 0, split: str | None = None, required: bool = False):
        super().__init__(size, num_frames, train, seed)
        self.sampling_rate = sampling_rate
        root = Path(root)
        split = split or ("train" if train else "val")
        if not root.is_dir():
            raise FileNotFoundError(f"--data-path {root} is not a directory")
        if required and not (root / split).is_dir():
            raise FileNotFoundError(f"--data-path {root} has no {split!r} split: expected "
                                    f"{root / split}/<class>/<clip> folders")
        base = root / split if (root / split).is_dir() else root
        classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not _is_frame_dir(d))
        groups = [(base / c, i) for i, c in enumerate(classes)] if classes else [(base, 0)]
        self.samples = [(clip, label) for folder, label in groups
                        for clip in sorted(folder.iterdir())
                        if _is_frame_dir(clip) or clip.suffix.lower() in VIDEO_SUFFIXES]
        self.classes = classes or ["videos"]
        if not self.samples:
            raise FileNotFoundError(f"no clips (frame folders or video files) found under {base}")

    def __len__(self):
        return len(self.samples)

    def load(self, index, rng):
        path, label = self.samples[index]
        try:
            frames = _read_clip(path)
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping unreadable clip {path}: {exc}", RuntimeWarning,
                          stacklevel=2)
            return None, label
        span = (self.num_frames - 1) * self.sampling_rate + 1
        spare = max(len(frames) - span, 0)
        start = rng.randint(0, spare) if self.train else spare // 2
        picks = [min(start + k * self.sampling_rate, len(frames) - 1)
                 for k in range(self.num_frames)]
        return [frames[k] for k in picks], label


def _is_frame_dir(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())


def _read_clip(path: Path) -> list:
    """Every frame of a frame folder or a video file, as RGB PIL images."""
    if path.is_dir():
        frames = []
        for frame in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            with Image.open(frame) as img:
                frames.append(img.convert("RGB"))
    else:
        try:
            import av
        except ImportError as exc:
            raise SystemExit(f"reading video files ({path.name}) needs PyAV: pip install -e "
                             f"\".[video]\" (or extract the frames into folders)") from exc
        try:
            with av.open(str(path)) as container:
                frames = [f.to_image() for f in container.decode(video=0)]
        except av.FFmpegError as exc:
            raise ValueError(str(exc)) from exc
    if not frames:
        raise ValueError("no frames")
    return frames


def build_video_dataset(data_path, size, num_frames: int, split: str, augment: bool,
                        seed: int = 0, length: int | None = None, sampling_rate: int = 4,
                        required: bool = True):
    """The `split` of a clip folder, or of the built-in moving shapes."""
    if data_path:
        return VideoFolderDataset(data_path, size, num_frames, sampling_rate, train=augment,
                                  seed=seed, split=split, required=required)
    return MovingShapesDataset(size, num_frames, train=augment, seed=seed, split=split,
                               length=length or (2048 if split == "train" else 512))
