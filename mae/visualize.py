"""`mae visualize`: the reconstruction figure for any image."""
from __future__ import annotations

import torch
from PIL import Image

from .data import center_resize, to_tensor
from .figures import save_reconstruction_figure
from .pretrain import model_from_checkpoint


def visualize(args):
    model, config = model_from_checkpoint(args.checkpoint, trust=args.unsafe_trust_checkpoint)
    size = config["input_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    try:
        with Image.open(args.image) as img:
            img = img.convert("RGB")
    except OSError as exc:
        raise SystemExit(f"--image {args.image}: cannot read it ({exc})") from exc
    x = to_tensor(center_resize(img, size))[None]
    noise = model.draw_noise(1, torch.Generator().manual_seed(args.seed))
    path = save_reconstruction_figure(model, x, args.output, args.mask_ratio, noise)
    print(f"wrote {path}")
    return path
