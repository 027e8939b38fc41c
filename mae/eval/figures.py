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

from ..data.images import denormalize, normalize  # noqa: E402

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


CURVES = "curves.png"


def read_log(run_dir) -> list[dict]:
    """The records of a run folder's log.jsonl (lines a kill cut short are passed over)."""
    import json

    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no log.jsonl: not the --output-dir of a `mae "
                                f"pretrain` or `mae finetune` run")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def save_curves(run_dir, path=None) -> Path:
    """The training curves of a run folder from its log: loss and lr per logged step (x in
    epochs, the epoch_1000x axis / 1000), and the probe's (or validation) top-1 per epoch."""
    records = read_log(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not steps and not epochs:
        raise ValueError(f"{Path(run_dir) / 'log.jsonl'} holds no step or epoch records yet")

    def x(r):
        return r["epoch_1000x"] / 1000 if "epoch_1000x" in r else r["epoch"]

    accuracy = [(key, label) for key, label in (("probe_top1", "online probe top-1 (val)"),
                                                ("val_top1", "val top-1"))
                if any(key in r for r in epochs)]
    panels = 2 + bool(accuracy)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), squeeze=False)
    loss_ax, lr_ax = axes[0][0], axes[0][1]
    loss_ax.plot([x(r) for r in steps], [r["loss"] for r in steps], lw=1, label="logged steps")
    loss_ax.plot([r["epoch"] + 1 for r in epochs], [r["loss"] for r in epochs], "o-", ms=3,
                 label="epoch mean")
    loss_ax.set(title="training loss", xlabel="epoch")
    loss_ax.legend(fontsize=8)
    lr_ax.plot([x(r) for r in steps], [r["lr"] for r in steps], lw=1)
    lr_ax.set(title="learning rate", xlabel="epoch")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if accuracy:
        acc_ax = axes[0][2]
        for key, label in accuracy:
            held = [r for r in epochs if key in r]
            acc_ax.plot([r["epoch"] + 1 for r in held], [r[key] for r in held], "o-", ms=3,
                        label=label)
        acc_ax.set(title="top-1 (%)", xlabel="epoch")
        acc_ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return save_figure(fig, path or Path(run_dir) / CURVES, dpi=100)
