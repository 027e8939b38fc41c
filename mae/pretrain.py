"""`mae pretrain`: the official MAE pre-training recipe, on one process or many (torchrun)."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed
from .checkpoint import atomic_save, latest_checkpoint, load_checkpoint
from .data import build_dataset, collate_skipping
from .figures import save_reconstruction_figure
from .models import MODELS
from .optim import build_optimizer, lr_at, set_lr

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class NonFiniteLossError(RuntimeError):
    pass


def build_model(config: dict):
    """The model a run's arguments (or a checkpoint's saved arguments) describe."""
    kwargs = {"img_size": config["input_size"], "norm_pix_loss": config["norm_pix_loss"],
              "use_kernels": not config.get("no_kernels", False)}
    if config.get("patch_size"):
        kwargs["patch_size"] = config["patch_size"]
    if config["model"] not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {config['model']!r}")
    return MODELS[config["model"]](**kwargs)


def model_from_checkpoint(path, load_weights: bool = True):
    """(model, saved arguments) of a `mae pretrain` checkpoint; random weights if told so."""
    state = load_checkpoint(path)
    config = dict(state["args"])
    model = build_model(config)
    if load_weights:
        model.load_state_dict(state["model"])
    return model, config


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # Re-seeding per epoch makes the masking noise a function of (seed, epoch, rank), so a
    # resumed run draws exactly what an uninterrupted one would, on every rank.
    return (seed * 1_000_003 + epoch) * 1_009 + rank


class JsonLog:
    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train_one_epoch(model, loader, optimizer, scaler, device, epoch, args, log, lr):
    """One pass over the loader; returns the epoch's mean loss and the skipped-image count."""
    model.train()
    amp_dtype = AMP_DTYPES[args.amp]
    steps_per_epoch = len(loader)
    main = distributed.is_main()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not main or args.quiet, leave=False,
               dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    window_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    seen = window_steps = window_seen = skipped = 0
    window_start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (imgs, _, n_skipped) in enumerate(bar):
        skipped += n_skipped
        iteration = epoch * steps_per_epoch + i
        if imgs is not None:
            if i % args.accum_iter == 0:
                set_lr(optimizer, lr_at(i / steps_per_epoch + epoch, lr, args.min_lr,
                                        args.warmup_epochs, args.epochs))
            imgs = imgs.to(device, non_blocking=True)
            boundary = (i + 1) % args.accum_iter == 0 or i + 1 == steps_per_epoch
            sync = contextlib.nullcontext()
            if isinstance(model, DistributedDataParallel) and not boundary:
                sync = model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, _, _ = model(imgs, mask_ratio=args.mask_ratio)
                scaler.scale(loss / args.accum_iter).backward()
            if boundary:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            loss = loss.detach().float()
            # Tracked on the device: no host sync per step, checked when we log.
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), iteration, first_bad)
            loss_sum += loss
            window_sum += loss
            seen += 1
            window_steps += 1
            window_seen += imgs.shape[0]
        if (i + 1) % args.log_every == 0 or i + 1 == steps_per_epoch:
            bad = int(distributed.all_reduce_max(first_bad))  # every rank stops together
            if bad >= 0:
                raise NonFiniteLossError(
                    f"non-finite loss at step {bad} (epoch {epoch}, iteration "
                    f"{bad - epoch * steps_per_epoch}); stopping. Checkpoints already written "
                    f"in {args.output_dir} are intact."
                )
            window_loss = float(distributed.all_reduce_mean(window_sum / max(window_steps, 1)))
            elapsed = time.perf_counter() - window_start
            images_per_sec = window_seen * args.world_size / max(elapsed, 1e-9)
            current_lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{current_lr:.2e}",
                            img_s=f"{images_per_sec:.0f}")
            log.write(kind="step", epoch=epoch, step=iteration, loss=window_loss, lr=current_lr,
                      images_per_sec=images_per_sec)
            window_sum.zero_()
            window_steps = window_seen = 0
            window_start = time.perf_counter()
    mean_loss = float(distributed.all_reduce_mean(loss_sum / max(seen, 1)))
    return mean_loss, skipped


def pretrain(args) -> dict:
    rank, world_size, device = distributed.init(args.device)
    args.world_size = world_size
    main = rank == 0
    output_dir = Path(args.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    log = JsonLog(output_dir / "log.jsonl" if main else None)

    torch.manual_seed(args.seed)
    dataset = build_dataset(args.data_path, args.input_size, "train", augment=True,
                            seed=args.seed, length=args.dataset_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                        num_workers=args.num_workers, drop_last=True,
                        collate_fn=collate_skipping, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the data set per "
                         f"process ({len(sampler)} images)")

    model = build_model(vars(args)).to(device)
    eff_batch = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    optimizer = build_optimizer(model, lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    start_epoch = 0
    resume = latest_checkpoint(output_dir) if args.resume == "auto" else args.resume
    if resume:
        state = load_checkpoint(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        if main:
            print(f"resumed from {resume} (epoch {state['epoch']}, step {state['step']})")

    train_model = torch.compile(model) if args.compile else model
    if world_size > 1:
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    preview = build_dataset(args.data_path, args.input_size, "val", augment=False, length=4)
    readable = [item[0] for item in map(preview.__getitem__, range(min(4, len(preview))))
                if item is not None]
    preview_imgs = torch.stack(readable).to(device) if readable else None
    preview_noise = torch.rand(len(readable), model.patch_embed.num_patches,
                               generator=torch.Generator().manual_seed(args.seed)).to(device)
    if main:
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"{len(dataset)} images, effective batch {eff_batch}, lr {lr:.2e}, "
              f"{world_size} process(es) on {device.type}")

    summary = {"epochs": [], "skipped_images": 0}
    steps_per_epoch = len(loader)
    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(_epoch_seed(args.seed, epoch, rank))
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        start = time.perf_counter()
        loss, skipped = train_one_epoch(train_model, loader, optimizer, scaler, device, epoch,
                                        args, log, lr)
        summary["skipped_images"] += skipped
        record = dict(kind="epoch", epoch=epoch, loss=loss, skipped_images=skipped,
                      seconds=time.perf_counter() - start)
        summary["epochs"].append(record)
        if not main:
            continue
        log.write(**record)
        print(f"epoch {epoch}: loss {loss:.4f}" + (f", {skipped} unreadable images skipped"
                                                  if skipped else ""))
        if preview_imgs is not None:
            save_reconstruction_figure(model, preview_imgs,
                                       output_dir / f"reconstruction-{epoch:03d}.png",
                                       args.mask_ratio, preview_noise, title=f"epoch {epoch}")
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch,
                         "step": (epoch + 1) * steps_per_epoch, "args": vars(args)},
                        output_dir / f"checkpoint-{epoch}.pth")
    return summary
