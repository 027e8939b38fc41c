"""`mae pretrain --online-probe`: a linear probe trained beside the MAE, as DailyMAE (erow/FastSSL,
`OnlineProb`) watches representation quality without stopping pre-training.

Features: the mean of the kept patch tokens at the encoder's output (after its final norm, the
cls token left out), read from the masked forward the training step runs anyway, through a
forward hook on the encoder's norm, detached. DailyMAE instead runs a second, no-grad forward of
the whole image (mean of the patch tokens before the norm): at a 75% mask that is an encoder
pass over four times the tokens each step, where this probe costs a BatchNorm and a linear layer.
The head is main_linprobe.py's (BatchNorm without affine, then a linear layer), trained each step
with its own optimizer (AdamW, or main_linprobe's LARS) in float32 outside autocast. At the end of
each epoch it is scored (top-1) on the val split through the same masked forward (noise from its
own seeded generator, the same masks each epoch), so it is scored on the features it learns from.
Scoring runs on rank 0 only (the other ranks wait at the next collective), over at most
--probe-val-size images (default 1024; of an image folder's val split a seeded random subset,
the same each epoch), read by --num-workers loader workers: one masked forward of those images
an epoch, about 1024 / (batch * steps per epoch) of an epoch's training forwards. The head and its
optimizer are not in the training checkpoint: a resumed run starts a fresh probe.

It never changes the MAE: no gradient reaches the model, the hook only reads, and every random
number it needs (the head's initialisation, the evaluation loader's seed) is drawn inside
`torch.random.fork_rng`, so the global streams the MAE's masking draws from are as without it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from ..data.images import build_dataset, collate_skipping
from . import distributed

OPTIMIZERS = ("adamw", "lars")
VAL_SIZE = 1024  # val images scored each epoch without --probe-val-size
ADAMW_LR = 1e-3  # NOTE: a constant rate; the probe trains on features that move anyway
LARS_BLR = 0.1  # main_linprobe.py's base lr (per 256 images)


def build_head(width: int, num_classes: int) -> nn.Sequential:
    """main_linprobe.py's head: BatchNorm1d(affine=False, eps=1e-6), then a linear layer with
    trunc-normal(0.01) weights (MoCo v3's) and zero bias."""
    head = nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6),
                         nn.Linear(width, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


class OnlineProbe:
    def __init__(self, model, num_classes: int, device, optimizer: str = "adamw",
                 lr: float | None = None, batch_size: int = 256, num_workers: int = 0):
        from .optim import LARS

        self.model, self.device, self.num_workers = model, device, num_workers
        self.prefix = getattr(model, "num_prefix_tokens", 0)  # cls tokens (VideoMAE: none)
        with self._own_random_streams():
            self.head = build_head(model.norm.normalized_shape[0], num_classes).to(device)
        params = self.head.parameters()
        if optimizer == "lars":
            self.optimizer = LARS(params, lr=lr or LARS_BLR * batch_size / 256)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=lr or ADAMW_LR, weight_decay=0.0)
        self.features = None
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.hook = model.norm.register_forward_hook(self._capture)

    def _own_random_streams(self):
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _capture(self, _module, _inputs, output):
        self.features = output[:, self.prefix:].mean(dim=1).detach()

    def step(self, labels: torch.Tensor) -> None:
        """One optimizer step of the head on the features of the forward just run."""
        features, self.features = self.features, None
        self.head.train()
        with torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
            loss = F.cross_entropy(self.head(features.float()), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        for p in self.head.parameters():  # the ranks' heads stay equal, as DDP's would
            if p.grad is not None:
                p.grad.copy_(distributed.all_reduce_mean(p.grad))
        self.optimizer.step()
        self.loss_sum += loss.detach()
        self.steps += 1

    def train_loss(self) -> float:
        """The mean training loss since the last call."""
        mean = float(self.loss_sum) / max(self.steps, 1)
        self.loss_sum.zero_()
        self.steps = 0
        return mean

    @torch.no_grad()
    def evaluate(self, dataset, mask_ratio: float, seed: int, batch_size: int) -> float:
        """Top-1 (%) of the head on `dataset`, through the masked encoder."""
        was_training = self.model.training
        self.model.eval()
        self.head.eval()
        generator = torch.Generator().manual_seed(seed)
        correct = total = 0
        with self._own_random_streams():
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                num_workers=self.num_workers, collate_fn=collate_skipping)
            for imgs, labels, _ in loader:
                if imgs is None:
                    continue
                noise = self.model.draw_noise(imgs.shape[0], generator).to(self.device)
                self.model.forward_encoder(imgs.to(self.device), mask_ratio, noise)
                logits = self.head(self.features.float())
                self.features = None
                correct += int((logits.argmax(dim=1).cpu() == labels).sum())
                total += imgs.shape[0]
        self.model.train(was_training)
        return 100.0 * correct / max(total, 1)

    def close(self) -> None:
        self.hook.remove()


def start_probe(args, model, device, eff_batch: int):
    """The probe and its val split for a `mae pretrain` run with --online-probe, else
    (None, None); a run the probe cannot serve is a ValueError naming the flag."""
    if not getattr(args, "online_probe", False):
        return None, None
    if getattr(args, "fsdp", False):
        raise ValueError("--online-probe evaluates the model on one process; it does not "
                         "run with --fsdp")
    if not hasattr(model, "norm"):
        raise ValueError("--online-probe reads the encoder's last norm; CrossMAE with "
                         "weight_fm has none (its decoder blocks normalise their own mixtures)")
    from ..data.shards import shard_urls

    if args.data_path and shard_urls(args.data_path, "train", False) is not None:
        raise ValueError(f"--online-probe scores on an image folder's val/ split; --data-path "
                         f"{args.data_path} names tar shards, which it does not read")
    size = args.probe_val_size or VAL_SIZE
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            val = build_dataset(args.data_path, args.input_size, "val", augment=False,
                                seed=args.seed, length=size, required=True)
    except FileNotFoundError as exc:
        raise ValueError(f"--online-probe scores on the labelled val split: {exc}") from exc
    num_classes = len(val.classes)
    if num_classes < 2:
        raise ValueError(f"--online-probe needs labelled data (class folders under "
                         f"--data-path {args.data_path}/val), found {num_classes} class")
    if len(val) > size:  # a folder's split (the built-in one is `size` long already)
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))
        val = Subset(val, sorted(order[:size].tolist()))
    probe = OnlineProbe(model, num_classes, device, args.probe_optimizer, args.probe_lr,
                        eff_batch, args.num_workers)
    return probe, val
