"""The official MAE optimiser recipe: AdamW(0.9, 0.95), no weight decay on biases and norms,
lr = blr * effective batch / 256, per-iteration half-cycle cosine after a linear warmup; and the
linear probe's LARS."""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Learning rate at a fractional epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr`, times its `lr_scale` where it has one (layer-wise lr decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class LARS(torch.optim.Optimizer):
    """main_linprobe.py's optimiser (MAE's util/lars.py, from MoCo v3): SGD with momentum where
    each matrix's step is scaled by the trust ratio `trust_coefficient * |w| / |g + wd * w|`;
    parameters of one dimension or none (biases, norms) get neither weight decay nor the ratio.
    timm.optim.Lars differs: it adapts only where weight_decay != 0 unless always_adapt, treats
    every parameter alike, divides by |g| + wd * |w| + eps, and has no momentum by default."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * w_norm / u_norm
                    # no scaling where either norm is 0 (a zero-initialised matrix, no gradient)
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), ratio, 1.0)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
