"""The reconstruction figure of the official demo: original / masked / reconstruction /
reconstruction with the visible patches pasted back; for videos, each of those as a row of
frames."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mae_kernels import reference  # noqa: E402

from .data import denormalize, normalize  # noqa: E402

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float = 0.75, noise=None):
    """The four panels for normalised `imgs`, in [0, 1]: each (B, 3, H, W) for images,
    (B, T, 3, H, W) for videos (B, 3, T, H, W)."""
    if getattr(model, "target", "pixel") != "pixel":
        raise ValueError(f"this model predicts {model.target} features, not pixels: there is no "
                         "reconstruction to draw")
    was_training = model.training
    model.eval()
    _, pred, mask = model.predict(imgs, mask_ratio, noise)
    model.train(was_training)
    pred, imgs = pred.float(), imgs.float()
    if imgs.dim() == 5:
        tubelet = (model.tubelet_size, model.patch_size, model.patch_size)

        def unpatchify(x):  # frames first, so that denormalize sees (..., 3, H, W)
            return reference.unpatchify3d(x, tubelet, model.grid_size,
                                          model.in_chans).transpose(1, 2)
        # VideoMAE predicts un-normalised pixels (per channel of each tubelet with norm-pix):
        # back to those pixels, then into the input's normalisation like the other panels
        raw = reference.videomae_targets(imgs, model.tubelet_size, model.patch_size, False,
                                         torch.float32, model.data_mean, model.data_std)
        if model.norm_pix_loss:
            mean, std = reference.videomae_stats(raw, model.in_chans)
            pred = pred * std + mean
        recon = unpatchify(pred)
        if model.data_mean is not None:
            recon = normalize(recon)
        imgs = imgs.transpose(1, 2)
    else:
        def unpatchify(x):
            return reference.unpatchify(x, model.patch_size, model.grid_size, model.in_chans)
        if model.norm_pix_loss:  # per-patch normalised units: undo with the target's stats
            mean, std = reference.norm_pix_stats(reference.patchify(imgs, model.patch_size))
            pred = pred * std + mean
        recon = unpatchify(pred)
    removed = unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    grey = torch.full_like(imgs, 0.5)
    return (denormalize(imgs), denormalize(imgs) * (1 - removed) + grey * removed,
            denormalize(recon), denormalize(imgs * (1 - removed) + recon * removed))


def save_reconstruction_figure(model, imgs: torch.Tensor, path, mask_ratio: float = 0.75,
                               noise=None, title: str | None = None) -> Path:
    panels = reconstruct(model, imgs, mask_ratio, noise)
    video = imgs.dim() == 5
    if video:  # a row of frames per panel, for the first two clips
        cells = [(name, [panel[b, t] for t in range(imgs.shape[2])])
                 for b in range(min(2, imgs.shape[0])) for name, panel in zip(PANELS, panels)]
        titles = [f"frame {t}" for t in range(imgs.shape[2])]
    else:  # a row of panels per image
        cells = [("", [panel[r] for panel in panels]) for r in range(imgs.shape[0])]
        titles = list(PANELS)
    rows, cols = len(cells), len(titles)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    for r, (label, images) in enumerate(cells):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
        axes[r][0].set_ylabel(label)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=100)


def save_figure(fig, path, dpi: int) -> Path:
    """Lays out, writes (creating the folder) and closes a matplotlib figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
