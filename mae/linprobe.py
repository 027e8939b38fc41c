"""`mae linprobe`: the frozen encoder's cls-token (or mean-pooled) features, a BatchNorm without
affine parameters and a linear classifier on top, as in the official recipe; reports top-1."""
from __future__ import annotations

import json

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import build_dataset, collate_skipping
from .optim import lr_at, set_lr
from .pretrain import model_from_checkpoint
from .video import VideoMAE


@torch.no_grad()
def extract_features(model, dataset, device, batch_size: int, global_pool: bool, quiet: bool):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=collate_skipping)
    feats, labels = [], []
    model.eval()
    for imgs, y, _ in tqdm(loader, desc="features", disable=quiet, leave=False):
        if imgs is None:
            continue
        out = model.encode(imgs.to(device))
        feats.append((out.patch_mean if global_pool else out.cls_token).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def linprobe(args) -> dict:
    device = torch.device(args.device)
    model, config = model_from_checkpoint(args.checkpoint, load_weights=not args.random_init,
                                          trust=args.unsafe_trust_checkpoint)
    if isinstance(model, VideoMAE):
        raise ValueError(f"--checkpoint {args.checkpoint} holds a VideoMAE; linprobe probes "
                         "image encoders")
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    size = config["input_size"]
    train_set = build_dataset(args.data_path, size, "train", augment=False,
                              length=args.train_size)
    val_set = build_dataset(args.data_path, size, "val", augment=False, length=args.val_size)
    torch.manual_seed(args.seed)
    x_train, y_train = extract_features(model, train_set, device, args.batch_size,
                                        args.global_pool, args.quiet)
    x_val, y_val = extract_features(model, val_set, device, args.batch_size, args.global_pool,
                                    args.quiet)
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(x_train.shape[1], affine=False, eps=1e-6),
                         nn.Linear(x_train.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    lr = args.blr * args.batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9,
                                weight_decay=args.weight_decay)
    steps = (len(x_train) + args.batch_size - 1) // args.batch_size
    for epoch in range(args.epochs):
        head.train()
        order = torch.randperm(len(x_train))
        for i in range(steps):
            set_lr(optimizer, lr_at(epoch + i / steps, lr, 0.0, args.warmup_epochs, args.epochs))
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = nn.functional.cross_entropy(head(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.eval()
    with torch.no_grad():
        top1 = (head(x_val).argmax(1) == y_val).float().mean().item() * 100
        train_top1 = (head(x_train).argmax(1) == y_train).float().mean().item() * 100
    result = {"checkpoint": str(args.checkpoint), "random_init": args.random_init,
              "top1": top1, "train_top1": train_top1, "num_classes": num_classes,
              "train_images": len(x_train), "val_images": len(x_val)}
    print(json.dumps(result))
    return result
