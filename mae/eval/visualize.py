"""`mae visualize`: the reconstruction figure for any image, or for a clip (a video file or a
folder of frames) with a VideoMAE checkpoint: each panel as a row of frames."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..checkpoints.pretrained import model_from_checkpoint
from ..data.images import center_resize, to_rgb, to_tensor
from ..data.video import VIDEO_SUFFIXES, read_clip
from ..models.video import VideoMAE
from .figures import save_reconstruction_figure


def read_image(path, size) -> torch.Tensor:
    """(1, 3, H, W), normalised, centre-cropped to `size`."""
    try:
        with Image.open(path) as img:
            img = to_rgb(img)
    except OSError as exc:
        raise ValueError(f"--image {path}: cannot read it ({exc})") from exc
    return to_tensor(center_resize(img, size))[None]


def read_video(path, size, num_frames: int, sampling_rate: int) -> torch.Tensor:
    """(1, 3, T, H, W): `num_frames` frames `sampling_rate` apart from the middle of the clip,
    as VideoMAE samples for evaluation (a shorter clip repeats its last frame)."""
    path = Path(path)
    if not path.is_dir() and path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--image {path}: the checkpoint holds a VideoMAE, so give a video "
                         f"file ({', '.join(sorted(VIDEO_SUFFIXES))}) or a folder of frames")

    def middle(count: int) -> list[int]:
        start = max(count - (num_frames - 1) * sampling_rate - 1, 0) // 2
        return [min(start + k * sampling_rate, count - 1) for k in range(num_frames)]

    try:
        frames = read_clip(path, middle)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--image {path}: cannot read it as a clip ({exc})") from exc
    return torch.stack([to_tensor(center_resize(f, size)) for f in frames], dim=1)[None]


def visualize(args):
    model, saved = model_from_checkpoint(args.checkpoint, trust=args.unsafe_trust_checkpoint)
    size = model.patch_embed.img_size
    if isinstance(model, VideoMAE):
        x = read_video(args.image, size, model.grid_size[0] * model.tubelet_size,
                       saved.get("sampling_rate") or 4)
    else:
        x = read_image(args.image, size)
    noise = model.draw_noise(1, torch.Generator().manual_seed(args.seed))
    path = save_reconstruction_figure(model, x, args.output, args.mask_ratio, noise)
    print(f"wrote {path}")
    return path
