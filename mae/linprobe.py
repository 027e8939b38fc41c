"""`mae linprobe`: a linear classifier on the frozen encoder's cls-token (or mean-pooled)
features, behind a BatchNorm without affine parameters, as facebookresearch/mae's
main_linprobe.py trains it; reports top-1 on the held-out split.

Two recipes. With --data-path or --model, main_linprobe.py's: batch 512 (x --accum-iter), LARS,
base lr 0.1, no weight decay, 90 epochs with 10 of warm-up, each step's images through
RandomResizedCrop (bicubic, area 8-100%) and a flip then the frozen encoder, evaluation on the
resized centre crop. Without either (the built-in demo) the settings the README measured:
batch 256, SGD with momentum 0.9 on features extracted once from the un-augmented images.
"""
from __future__ import annotations

import json
import random

import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import CheckpointError, load_checkpoint, model_weights
from .data import collate_skipping, random_resized_crop, to_tensor
from .gpu_data import DecodedLoader, GpuBatches, loader_for_size
from .models import MAE, MODEL_CONFIGS, config_of
from .online_probe import build_head
from .optim import LARS, lr_at, set_lr
from .pretrain import model_from_checkpoint
from .recipe import announce, fill, linprobe_recipe
from .shards import open_dataset
from .video import VideoMAE

DEMO_BATCH, OFFICIAL_BATCH = 256, 512
OFFICIAL_SIZE = 224  # main_linprobe.py crops to 224 whatever the model
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as main_linprobe.py uses it
CROP_RATIO = (3 / 4, 4 / 3)
AUGMENTATION_FLAGS = ("scale", "ratio", "hflip")


def apply_defaults(args) -> bool:
    """The recipe's batch size where --batch-size is unset; True for the demo, which probes
    un-augmented features, so an augmentation flag given to it is an error."""
    args.demo = args.data_path is None and args.model is None
    fill(args, {"batch_size": DEMO_BATCH if args.demo else OFFICIAL_BATCH},
         "demo" if args.demo else "official")
    sources = getattr(args, "sources", {})
    given = [k for k in AUGMENTATION_FLAGS if sources.get(k) in ("flag", "config")]
    if args.demo and given:
        raise ValueError(f"--{given[0]} sets the augmentation of the official recipe "
                         f"(--data-path or --model); the demo probes features of the "
                         f"un-augmented images, extracted once")
    return args.demo


class ProbeTrainSet(torch.utils.data.Dataset):
    """main_linprobe.py's weak augmentation over an image data set's PIL images: random
    resized crop (area fraction in `scale`, aspect ratio in `ratio`) and horizontal flip
    (probability `hflip`), drawn from (seed, epoch, index) so runs repeat."""

    def __init__(self, base, size, seed: int, scale=CROP_SCALE, ratio=CROP_RATIO,
                 hflip: float = 0.5):
        self.base, self.seed, self.epoch = base, seed, 0
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base.load(index)
        if img is None:
            return None
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
        img = random_resized_crop(img, self.size, rng, scale=self.scale, ratio=self.ratio)
        if rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img), label


def load_encoder(args):
    """(model, input size): ours as its checkpoint saved it; a checkpoint that does not say
    (an official one) as the named --model at 224px, its encoder weights loaded."""
    if args.model is None:
        model, saved = model_from_checkpoint(args.checkpoint, load_weights=not args.random_init,
                                             trust=args.unsafe_trust_checkpoint)
        return model, saved["input_size"]
    name = args.model if args.model.startswith("mae_") else f"mae_{args.model}"
    if name not in MODEL_CONFIGS:
        names = sorted(k.removeprefix("mae_") for k in MODEL_CONFIGS)
        raise ValueError(f"--model must be one of {names}, got {args.model!r}")
    state = load_checkpoint(args.checkpoint, trust=args.unsafe_trust_checkpoint)
    saved = state.get("args")
    if isinstance(saved, dict) and (saved.get("model_config") or saved.get("model")):
        model, saved = model_from_checkpoint(args.checkpoint, load_weights=not args.random_init,
                                             trust=args.unsafe_trust_checkpoint)
        named = MODEL_CONFIGS[name]
        if (model.config["encoder_dim"], model.config["encoder_layers"]) != \
                (named["encoder_dim"], named["encoder_layers"]):
            raise ValueError(f"--model {args.model} does not match --finetune "
                             f"{args.checkpoint}, a {model.config['encoder_dim']}-wide "
                             f"{model.config['encoder_layers']}-block encoder")
        return model, saved["input_size"]
    model = MAE(config_of(name, img_size=OFFICIAL_SIZE))
    if not args.random_init:
        encoder = {k: v for k, v in model_weights(state).items()
                   if not k.startswith(("decoder", "mask_token", "head", "fc_norm"))}
        try:
            result = model.load_state_dict(encoder, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"--finetune {args.checkpoint}: its encoder does not fit "
                                  f"--model {args.model}: {exc}") from exc
        missing = [k for k in result.missing_keys if not k.startswith(("decoder", "mask_token"))]
        if missing:
            raise CheckpointError(f"--finetune {args.checkpoint}: no weights for {missing} "
                                  f"of --model {args.model}")
    return model, OFFICIAL_SIZE


def features(model, imgs: torch.Tensor, global_pool: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model.encode(imgs)
    return (out.patch_mean if global_pool else out.cls_token).float()


def probe_loader(dataset, args, train: bool, prepare: GpuBatches | None = None):
    """Batches of `dataset` (shuffled, whole batches when `train`); through `prepare` where it
    is bytes-only (--data-loader gpu: decoded and cropped on the device)."""
    train_order = {}
    if isinstance(dataset, torch.utils.data.IterableDataset):  # tar shards
        dataset.split(0, 1, args.batch_size, train)
    elif train:
        train_order = dict(shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    loader = DataLoader(dataset, batch_size=args.batch_size, drop_last=train,
                        num_workers=args.num_workers, **train_order,
                        collate_fn=getattr(dataset, "collate", collate_skipping))
    return loader if prepare is None else DecodedLoader(loader, prepare)


def extract_features(model, dataset, device, args, desc: str, prepare=None):
    loader = probe_loader(dataset, args, False, prepare)
    feats, labels = [], []
    for imgs, y, _ in tqdm(loader, desc=desc, disable=args.quiet, leave=False):
        if imgs is not None:
            feats.append(features(model, imgs.to(device), args.global_pool))
            labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def train_head(head, optimizer, epoch_batches, steps: int, args, lr: float,
               desc: str) -> list[float]:
    """The per-iteration warm-up + cosine schedule, gradient accumulation, one progress bar over
    the epochs; `epoch_batches(epoch)` yields (features, labels). Returns each epoch's loss."""
    bar = tqdm(range(args.epochs), desc=desc, disable=args.quiet, dynamic_ncols=True)
    losses = []
    for epoch in bar:
        head.train()
        loss_sum = torch.zeros(())
        for i, (x, y) in enumerate(epoch_batches(epoch)):
            if i % args.accum_iter == 0:
                set_lr(optimizer, lr_at(epoch + i / steps, lr, args.min_lr, args.warmup_epochs,
                                        args.epochs))
            loss = nn.functional.cross_entropy(head(x), y)
            (loss / args.accum_iter).backward()
            if (i + 1) % args.accum_iter == 0 or i + 1 == steps:
                optimizer.step()
                optimizer.zero_grad()
            loss_sum += loss.detach().cpu()
        losses.append(loss_sum.item() / steps)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def linprobe(args) -> dict:
    device = torch.device(args.device)
    model, size = load_encoder(args)
    if isinstance(model, VideoMAE):
        raise ValueError(f"--checkpoint {args.checkpoint} holds a VideoMAE; linprobe probes "
                         "image encoders")
    demo = apply_defaults(args)
    loader_for_size(args, size)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_base = open_dataset(args.data_path, size, "train", augment=False,
                              length=args.train_size, loader=args.data_loader)
    val_set = open_dataset(args.data_path, size, "val", augment=False, length=args.val_size,
                           loader=args.data_loader)
    # --data-loader gpu: evaluation crops the centre box on the device
    centre = GpuBatches(size, device, train=False) if args.data_loader == "gpu" else None
    torch.manual_seed(args.seed)
    num_classes = args.nb_classes or len(train_base.classes)
    head = build_head(model.config["encoder_dim"], num_classes).to(device)
    lr = args.lr if args.lr is not None else args.blr * args.batch_size * args.accum_iter / 256
    # --model names an official checkpoint's encoder, probed at main_linprobe.py's size
    size_source = "official" if args.model is not None and size == OFFICIAL_SIZE else "checkpoint"
    recipe = linprobe_recipe(args, model.config, size_source, "SGD" if demo else "LARS", lr)
    announce("linprobe", recipe)

    if demo:
        x_train, y_train = extract_features(model, train_base, device, args, "train features",
                                            centre)
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9,
                                    weight_decay=args.weight_decay)
        steps = (len(x_train) + args.batch_size - 1) // args.batch_size

        def epoch_batches(_epoch):
            for idx in torch.randperm(len(x_train)).split(args.batch_size):
                yield x_train[idx], y_train[idx]
    else:
        prepare = None
        if args.data_loader == "gpu":  # the same crop and flip, drawn per (epoch, step)
            train_set = train_base
            prepare = GpuBatches(size, device, args.seed, scale=args.scale, ratio=args.ratio,
                                 hflip=args.hflip)
        elif isinstance(train_base, torch.utils.data.IterableDataset):
            raise ValueError("--data-path: the official linear probe on tar shards augments "
                             "on the device: pass --data-loader gpu")
        else:
            train_set = ProbeTrainSet(train_base, size, args.seed, args.scale, args.ratio,
                                      args.hflip)
        loader = probe_loader(train_set, args, True, prepare)
        if len(loader) == 0:
            raise ValueError(f"--batch-size {args.batch_size} is larger than the training set "
                             f"({len(train_set)} images)")
        optimizer = LARS(head.parameters(), lr=lr, weight_decay=args.weight_decay)
        steps = len(loader)

        def epoch_batches(epoch):
            train_set.set_epoch(epoch)
            if prepare is not None:
                loader.epoch = epoch
            for imgs, y, _ in loader:
                if imgs is not None:
                    yield features(model, imgs.to(device), args.global_pool), y.to(device)

    losses = train_head(head, optimizer, epoch_batches, steps, args, lr,
                      "linprobe" + (" (demo)" if demo else ""))
    x_val, y_val = extract_features(model, val_set, device, args, "val features", centre)
    head.eval()
    with torch.no_grad():
        top1 = (head(x_val).argmax(1) == y_val).float().mean().item() * 100
        train_top1 = ((head(x_train).argmax(1) == y_train).float().mean().item() * 100
                      if demo else None)
    result = {"checkpoint": str(args.checkpoint), "random_init": args.random_init,
              "recipe": "demo" if demo else "official", "top1": top1, "train_top1": train_top1,
              "loss": losses[-1], "num_classes": num_classes, "batch_size": args.batch_size,
              "optimizer": type(optimizer).__name__, "train_images": len(train_base),
              "val_images": len(x_val)}
    print(json.dumps(result))
    return {**result, "epoch_losses": losses, "recipe_values": recipe}
