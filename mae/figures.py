"""The reconstruction figure of the official demo: original / masked / reconstruction /
reconstruction with the visible patches pasted back."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mae_kernels import reference  # noqa: E402

from .data import denormalize  # noqa: E402

PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float = 0.75, noise=None):
    """The four panels, each (B, 3, H, W) in [0, 1], for normalised `imgs`."""
    was_training = model.training
    model.eval()
    _, pred, mask = model.predict(imgs, mask_ratio, noise)
    model.train(was_training)
    pred = pred.float()
    p = model.patch_size
    if model.norm_pix_loss:  # pred is in per-patch normalised units: undo with the target's stats
        mean, std = reference.norm_pix_stats(reference.patchify(imgs.float(), p))
        pred = pred * std + mean
    recon = reference.unpatchify(pred, p, model.grid_size, model.in_chans)
    removed = reference.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, pred.shape[-1]),
                                   p, model.grid_size, model.in_chans)
    imgs = imgs.float()
    grey = torch.full_like(imgs, 0.5)
    return (denormalize(imgs), denormalize(imgs) * (1 - removed) + grey * removed,
            denormalize(recon), denormalize(imgs * (1 - removed) + recon * removed))


def save_reconstruction_figure(model, imgs: torch.Tensor, path, mask_ratio: float = 0.75,
                               noise=None, title: str | None = None) -> Path:
    panels = reconstruct(model, imgs, mask_ratio, noise)
    rows = imgs.shape[0]
    fig, axes = plt.subplots(rows, len(PANELS), figsize=(2.4 * len(PANELS), 2.4 * rows),
                             squeeze=False)
    for r in range(rows):
        for c, (name, panel) in enumerate(zip(PANELS, panels)):
            ax = axes[r][c]
            ax.imshow(panel[r].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
