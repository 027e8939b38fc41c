"""Video data sets, as clips (C, T, H, W) normalised like the images, with one crop and flip per
clip (every frame gets the same), drawn from (seed, epoch, index) as the image data sets are.

- `MovingShapesDataset`: the built-in videos: each clip pans a window across a larger drawing
  of one of the ten shapes/textures of the image data set, so the content moves steadily; the
  class is the shape's. No download.
- `VideoFolderDataset`: DIR/[split/]<class>/<clip>, where a clip is a folder of frames (sorted by
  name) or a video file (needs PyAV: the `[video]` extra). `num_frames` frames are taken
  `sampling_rate` apart (VideoMAE's sampling), from a random start when training, the middle
  otherwise; clips shorter than that repeat their last frame. Only the sampled frames are read:
  a frame folder opens those images, a video file seeks to the key frame before the first and
  decodes forward to the last.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch
from PIL import Image

from .images import (
    IMAGE_SUFFIXES,
    Augmented,
    BuiltIn,
    center_resize,
    check_no_empty_class,
    draw_shape,
    random_resized_crop,
    to_rgb,
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
            state = rng.getstate()
            crops = []
            for frame in frames:
                rng.setstate(state)
                crops.append(random_resized_crop(frame, self.size, rng))
            # drawn after the crop's numbers, so it does not depend on them
            if rng.random() < 0.5:
                crops = [frame.transpose(Image.FLIP_LEFT_RIGHT) for frame in crops]
            frames = crops
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
        if classes:
            check_no_empty_class(base, classes, {label for _, label in self.samples},
                                 VIDEO_SUFFIXES | {"<folder of frames>"})
        self.classes = classes or ["videos"]
        if not self.samples:
            raise FileNotFoundError(f"no clips (frame folders or video files) found under {base}")

    def __len__(self):
        return len(self.samples)

    def load(self, index, rng):
        path, label = self.samples[index]

        def choose(count: int) -> list[int]:
            span = (self.num_frames - 1) * self.sampling_rate + 1
            spare = max(count - span, 0)
            start = rng.randint(0, spare) if self.train else spare // 2
            return [min(start + k * self.sampling_rate, count - 1)
                    for k in range(self.num_frames)]

        try:
            return read_clip(path, choose), label
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping unreadable clip {path}: {exc}", RuntimeWarning,
                          stacklevel=2)
            return None, label


def _is_frame_dir(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())


def read_clip(path: Path, choose) -> list:
    """The frames `choose(frame_count) -> indices` picks from a frame folder or a video file, as
    RGB PIL images, reading only those (and, in a video, what decoding them needs)."""
    if not path.is_dir():
        return _read_video(path, choose)
    names = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise ValueError("no frames")
    picks = choose(len(names))
    images = {}
    for k in sorted(set(picks)):
        with Image.open(names[k]) as img:
            images[k] = to_rgb(img)
    return [images[k] for k in picks]


def _read_video(path: Path, choose) -> list:
    try:
        import av
    except ImportError as exc:
        raise SystemExit(f"reading video files ({path.name}) needs PyAV: pip install -e "
                         f"\".[video]\" (or extract the frames into folders)") from exc
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            count = stream.frames  # 0 where the container does not record it (mkv, webm)
            if not count and rate and container.duration:
                count = round(container.duration * rate / av.time_base)
            if not count or not rate:
                raise ValueError("the video stream gives no frame count or frame rate")
            picks = choose(count)
            wanted = sorted(set(picks))
            start = stream.start_time or 0

            def index(frame) -> int:
                if frame.pts is None:  # unseekable as well: refused like any unreadable clip
                    raise ValueError("a decoded frame has no timestamp")
                return round((frame.pts - start) * stream.time_base * rate)

            if wanted[0] > 0:  # to the key frame at or before the first pick
                container.seek(start + int(wanted[0] / rate / stream.time_base), stream=stream)
            shown = _frames_on_screen(((index(f), f) for f in container.decode(stream)), wanted)
            images = {id(f): f.to_image() for f in shown.values()}
            return [images[id(shown[k])] for k in picks]
    except av.FFmpegError as exc:
        raise ValueError(str(exc)) from exc


def _frames_on_screen(frames, wanted: list[int]) -> dict:
    """{k: the frame on screen at index k} for the sorted indices `wanted`: the last of `frames`
    ((index, frame) pairs in display order) at or before k, the first one if none is; reading
    stops at the last index wanted."""
    shown, j, current = {}, 0, None
    for k, frame in frames:
        while j < len(wanted) and wanted[j] < k and current is not None:
            shown[wanted[j]] = current
            j += 1
        current = frame
        if k >= wanted[-1]:
            break
    if current is None:
        raise ValueError("no frames")
    for k in wanted[j:]:
        shown[k] = current
    return shown


def build_video_dataset(data_path, size, num_frames: int, split: str, augment: bool,
                        seed: int = 0, length: int | None = None, sampling_rate: int = 4,
                        required: bool = True):
    """The `split` of a clip folder, or of the built-in moving shapes."""
    if data_path:
        return VideoFolderDataset(data_path, size, num_frames, sampling_rate, train=augment,
                                  seed=seed, split=split, required=required)
    return MovingShapesDataset(size, num_frames, train=augment, seed=seed, split=split,
                               length=length or (2048 if split == "train" else 512))
