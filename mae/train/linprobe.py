"""`mae linprobe`: a linear classifier on the frozen encoder's cls-token (or mean-pooled)
features, behind a BatchNorm without affine parameters, as facebookresearch/mae's
main_linprobe.py trains it; reports top-1 on the held-out split.

Two recipes. With --data-path or --model, main_linprobe.py's: batch 512 per process (x
--accum-iter x processes), LARS, base lr 0.1, no weight decay, 90 epochs with 10 of warm-up,
each step's images through RandomResizedCrop (bicubic, area 8-100%) and a flip then the frozen
encoder, evaluation on the resized centre crop after every epoch. It runs on the training
engine: torchrun or srun, `--amp`, checkpoints of the head and its optimizer in --output-dir
every epoch (the encoder is --finetune's), `--resume auto` bit for bit mid-epoch after a stop
signal, `--eval`. Without either (the built-in demo) the settings the README measured: batch
256, SGD with momentum 0.9 on features extracted once from the un-augmented images, one
process, nothing written.
"""
from __future__ import annotations

import hashlib
import json
import random
import time

import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoints.files import CheckpointError, load_checkpoint, load_weights, model_weights
from ..checkpoints.pretrained import model_from_checkpoint
from ..data.gpu import GpuBatches, explicit_gpu_loader, jpeg_decoder, loader_for_size
from ..data.images import collate_skipping, random_resized_crop, to_tensor
from ..data.prefetch import DeviceLoader
from ..data.shards import open_dataset
from ..models import build_model
from ..models.image import MODEL_CONFIGS, config_of
from ..models.video import VideoMAE
from .engine import (
    AMP_DTYPES,
    checkpoint_to_evaluate,
    enter_epoch,
    epoch_record,
    evaluate,
    evaluation_loader,
    evaluation_text,
    make_loader,
    resume_from,
    save_epoch,
    seed_epoch,
    start_run,
    stop_pending,
    train_one_epoch,
    wrap_for_training,
)
from .online_probe import build_head
from .optim import LARS, lr_at, set_lr
from .recipe import announce, fill, linprobe_recipe
from .tracking import closes_sinks

DEMO_BATCH, OFFICIAL_BATCH = 256, 512
OFFICIAL_SIZE = 224  # main_linprobe.py crops to 224 whatever the model
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as main_linprobe.py uses it
CROP_RATIO = (3 / 4, 4 / 3)
AUGMENTATION_FLAGS = ("scale", "ratio", "hflip")
# the official recipe's run on the training engine; the demo runs in a minute and writes nothing
RUN_FLAGS = ("output_dir", "resume", "eval", "requeue", "save_every", "log_every", "log_dir",
             "wandb", "amp")


def is_demo(args) -> bool:
    """Without --data-path or --model the run is the demo (see the module doc)."""
    return args.data_path is None and args.model is None


def apply_defaults(args) -> bool:
    """The recipe's batch size where --batch-size is unset; True for the demo, which probes
    un-augmented features in one process, so an augmentation or run flag given to it is an
    error."""
    args.demo = is_demo(args)
    fill(args, {"batch_size": DEMO_BATCH if args.demo else OFFICIAL_BATCH},
         "demo" if args.demo else "official")
    sources = getattr(args, "sources", {})
    given = [k for k in AUGMENTATION_FLAGS if sources.get(k) in ("flag", "config")]
    if args.demo and given:
        raise ValueError(f"--{given[0]} sets the augmentation of the official recipe "
                         f"(--data-path or --model); the demo probes features of the "
                         f"un-augmented images, extracted once")
    given = [k for k in RUN_FLAGS if sources.get(k) in ("flag", "config")]
    if args.demo and given:
        raise ValueError(f"--{given[0].replace('_', '-')} is for the official recipe "
                         f"(--data-path or --model), which trains on the engine and "
                         f"checkpoints; the demo runs in a minute in one process and writes "
                         f"nothing")
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
    (an official one) as the named --model at 224px, its encoder weights loaded. A
    --random-init encoder is drawn from --seed."""
    torch.manual_seed(args.seed)
    if args.model is None:
        model, saved = model_from_checkpoint(args.checkpoint, load_weights=not args.random_init,
                                             trust=args.unsafe_trust_checkpoint)
        return model, saved["input_size"]
    name = args.model if args.model in MODEL_CONFIGS else f"mae_{args.model}"
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
    # the named model at its recipe's size: main_linprobe.py's 224, Pixio's 256
    model = build_model(config_of(name))
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
    return model, model.config["img_size"]


# CrossMAE with weight_fm has no last norm
FINGERPRINTED = ("patch_embed.proj.weight", "cls_token", "norm.weight", "norm.bias")


def encoder_fingerprint(model) -> str:
    """What tells one encoder's weights from another's, cheaply (the patch embedding, the cls
    token and the last norm): saved with a probe, so that it resumes on the same encoder."""
    weights = model.state_dict()
    digest = hashlib.sha256()
    for name in (n for n in FINGERPRINTED if n in weights):
        digest.update(weights[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def features(model, imgs: torch.Tensor, global_pool: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model.encode(imgs)
    return (out.patch_mean if global_pool else out.cls_token).float()


def extract_features(model, dataset, device, args, desc: str, prepare=None):
    """The demo's features of every image of `dataset`, in order, in this process; through
    `prepare` where it is bytes-only (--data-loader gpu: decoded and cropped on the device)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):  # tar shards: all of them here
        dataset.split(0, 1, args.batch_size, False)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=getattr(dataset, "collate", collate_skipping))
    feats, labels = [], []
    for imgs, y, _ in tqdm(DeviceLoader(loader, device, prepare, args.prefetch), desc=desc,
                           disable=args.quiet, leave=False):
        if imgs is not None:
            feats.append(features(model, imgs, args.global_pool))
            labels.append(y)
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


class FrozenEncoderProbe(nn.Module):
    """main_linprobe.py's model: the head on the frozen encoder's features. The encoder is held
    outside the module tree, so the state dict (each checkpoint: the head's few weights), the
    optimizer and DistributedDataParallel see the head alone, and `train()` leaves the encoder
    in eval mode; a resumed run takes it from --finetune again."""

    def __init__(self, encoder: nn.Module, head: nn.Module, global_pool: bool):
        super().__init__()
        object.__setattr__(self, "encoder", encoder)  # not a submodule (see above)
        self.head, self.global_pool = head, global_pool

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(features(self.encoder, imgs, self.global_pool))


def linprobe(args) -> dict:
    demo = apply_defaults(args)  # first: a flag the demo does not take stops the run here
    model, size = load_encoder(args)
    if isinstance(model, VideoMAE):
        raise ValueError(f"--checkpoint {args.checkpoint} holds a VideoMAE; linprobe probes "
                         "image encoders")
    loader_for_size(args, size)
    for p in model.parameters():
        p.requires_grad_(False)
    # --model names an official checkpoint's encoder, probed at main_linprobe.py's size
    size_source = "official" if args.model is not None and size == OFFICIAL_SIZE else "checkpoint"
    return (probe_demo if demo else probe_images)(model.eval(), size, size_source, args)


def open_splits(args, size: int, device):
    ship_jpegs = jpeg_decoder(device) is not None
    train_base = open_dataset(args.data_path, size, "train", augment=False,
                              length=args.train_size, loader=args.data_loader,
                              ship_jpegs=ship_jpegs)
    val_set = open_dataset(args.data_path, size, "val", augment=False, length=args.val_size,
                           loader=args.data_loader, ship_jpegs=ship_jpegs)
    return train_base, val_set, args.nb_classes or len(train_base.classes)


def summary(args, recipe_name: str, top1: float, optimizer, num_classes: int, train_images: int,
            val_images: int, **extra) -> dict:
    return {"checkpoint": str(args.checkpoint), "random_init": args.random_init,
            "recipe": recipe_name, "top1": top1, **extra, "num_classes": num_classes,
            "batch_size": args.batch_size, "optimizer": type(optimizer).__name__,
            "train_images": train_images, "val_images": val_images}


def probe_demo(model, size: int, size_source: str, args) -> dict:
    """The demo: features of the un-augmented images extracted once, the head trained on them
    with SGD in this process."""
    device = torch.device(args.device)
    model = model.to(device)
    train_base, val_set, num_classes = open_splits(args, size, device)
    # --data-loader gpu: the images are decoded and centre-cropped on the device
    centre = (GpuBatches(size, device, train=False, strict=explicit_gpu_loader(args))
              if args.data_loader == "gpu" else None)
    torch.manual_seed(args.seed)
    head = build_head(model.config["encoder_dim"], num_classes).to(device)
    lr = args.lr if args.lr is not None else args.blr * args.batch_size * args.accum_iter / 256
    recipe = linprobe_recipe(args, model.config, size_source, "SGD", lr)
    announce("linprobe", recipe)
    x_train, y_train = extract_features(model, train_base, device, args, "train features",
                                        centre)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9,
                                weight_decay=args.weight_decay)
    steps = (len(x_train) + args.batch_size - 1) // args.batch_size

    def epoch_batches(_epoch):
        for idx in torch.randperm(len(x_train)).split(args.batch_size):
            yield x_train[idx], y_train[idx]

    losses = train_head(head, optimizer, epoch_batches, steps, args, lr, "linprobe (demo)")
    x_val, y_val = extract_features(model, val_set, device, args, "val features", centre)
    head.eval()
    with torch.no_grad():
        top1 = (head(x_val).argmax(1) == y_val).float().mean().item() * 100
        train_top1 = (head(x_train).argmax(1) == y_train).float().mean().item() * 100
    result = summary(args, "demo", top1, optimizer, num_classes, len(train_base), len(x_val),
                     train_top1=train_top1, loss=losses[-1])
    print(json.dumps(result))
    return {**result, "epoch_losses": losses, "recipe_values": recipe}


def evaluate_saved(args, probe, val_loader, device, amp_dtype, main: bool,
                   num_classes: int) -> dict:
    """--eval: the top-1 / top-5 of --resume's head (a path, or 'auto': the run's newest) on
    --finetune's encoder."""
    state, path = checkpoint_to_evaluate(args, main)
    load_weights(probe, state, f"--resume {path}",
                 f"the probe of --finetune {args.checkpoint}'s encoder with {num_classes} classes")
    stats = {"checkpoint": str(path), **evaluate(probe, val_loader, device, amp_dtype)}
    if main:
        print(json.dumps(stats))
    return stats


@closes_sinks
def probe_images(model, size: int, size_source: str, args) -> dict:
    """main_linprobe.py's recipe on the training engine (see the module doc)."""
    rank, world_size, device, log = start_run(args)
    main = rank == 0
    model = model.to(device)
    train_base, val_set, num_classes = open_splits(args, size, device)
    prepare = None
    strict = explicit_gpu_loader(args)
    if args.data_loader == "gpu":  # the same crop and flip, drawn per (epoch, rank, step)
        train_set = train_base
        prepare = GpuBatches(size, device, args.seed, rank, scale=args.scale, ratio=args.ratio,
                             hflip=args.hflip, strict=strict)
    elif isinstance(train_base, torch.utils.data.IterableDataset):
        raise ValueError("--data-path: the official linear probe on tar shards augments "
                         "on the device: pass --data-loader gpu")
    else:
        train_set = ProbeTrainSet(train_base, size, args.seed, args.scale, args.ratio,
                                  args.hflip)
    sampler, loader = make_loader(train_set, args, rank, world_size, device)
    # evaluation crops the centre box on the device with the gpu loader
    val_loader = evaluation_loader(val_set, args, rank, world_size, device, GpuBatches(
        size, device, train=False, strict=strict) if args.data_loader == "gpu" else None)
    torch.manual_seed(args.seed)
    probe = FrozenEncoderProbe(model, build_head(model.config["encoder_dim"], num_classes),
                               args.global_pool).to(device)
    eff_batch = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    optimizer = LARS(probe.parameters(), lr=lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    amp_dtype = AMP_DTYPES[args.amp]
    args.encoder_fingerprint = encoder_fingerprint(model)  # saved with the head (resume checks)
    if args.eval:
        return evaluate_saved(args, probe, val_loader, device, amp_dtype, main, num_classes)
    start_at = resume_from(args, probe, optimizer, scaler, main, log)
    history = [r for r in log.records("epoch") if r["epoch"] < start_at.epoch]
    train_model = wrap_for_training(probe, args, world_size, device)
    recipe = linprobe_recipe(args, model.config, size_source, "LARS", lr, eff_batch)
    if main:
        print(f"probing {args.checkpoint}: {size}px, {num_classes} classes, {len(train_set)} "
              f"images, effective batch {eff_batch}, lr {lr:.2e}, {world_size} process(es) on "
              f"{device.type}")
        announce("linprobe", recipe, log, args.output_dir)

    def loss_fn(m, imgs, labels):
        return nn.functional.cross_entropy(m(imgs), labels)

    records = list(history)  # a resumed run's summary covers its earlier epochs too
    stats = None
    for epoch in range(start_at.epoch, args.epochs):
        seed_epoch(args.seed, epoch, rank)
        train_set.set_epoch(epoch)  # the epoch's crops; for shards also the sampler's order
        resumed = enter_epoch(sampler, epoch, start_at, args)
        start = time.perf_counter()
        result = train_one_epoch(train_model, loader, optimizer, scaler, device, epoch, args,
                                 log, lr, loss_fn, resumed, prepare, saves=probe)
        stopping = stop_pending(args, epoch)  # then checkpoint-last alone on the way out
        stats = None if stopping else evaluate(probe, val_loader, device, amp_dtype)
        records.append(epoch_record(epoch, result, time.perf_counter() - start, prepare,
                                    **{f"val_{k}": v for k, v in (stats or {}).items()}))
        if main:
            log.write(**records[-1])
            print(f"epoch {epoch}: loss {result.loss:.4f}, {evaluation_text(stats)}")
        save_epoch(args, probe, optimizer, scaler, epoch, len(loader), stopping)
    if stats is None:  # resumed after its last epoch: the saved probe's accuracy
        stats = evaluate(probe, val_loader, device, amp_dtype)
    losses = [r["loss"] for r in records]
    result = summary(args, "official", stats["top1"], optimizer, num_classes, len(train_base),
                     stats["images"], top5=stats["top5"],
                     max_top1=max([r["val_top1"] for r in records if "val_top1" in r]
                                  or [stats["top1"]]),
                     loss=losses[-1] if losses else None)
    if main:
        print(json.dumps(result))
    return {**result, "epoch_losses": losses, "epochs": records, "recipe_values": recipe}
