"""What `mae pretrain` and `mae finetune` share: the data loader, the epoch loop (per-iteration
lr schedule, gradient accumulation, AMP, DDP, a non-finite loss check without a host sync per
step), exact resume and atomic checkpoints."""
from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed
from .checkpoint import (
    CheckpointError,
    checkpoints_newest_first,
    load_checkpoint,
    load_weights,
    remove_stale_temporaries,
    save_training_state,
    weights_kind,
    write_atomically,
)
from .data import collate_skipping
from .optim import lr_at, set_lr

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class NonFiniteLossError(RuntimeError):
    pass


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every random stream a step draws from (torch, Python, NumPy: masking noise, augmentation,
    mixup, drop path, the loader's worker seeds) as a function of (seed, epoch, rank), so a
    resumed run draws exactly what an uninterrupted one would, on every rank."""
    value = (seed * 1_000_003 + epoch) * 1_009 + rank
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


class JsonLog:
    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # made when a run first writes
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def drop_from(self, epoch: int) -> None:
        """Forgets the records of `epoch` and later (a resumed run writes them again) and any
        line a kill cut short."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("epoch", -1) < epoch:
                kept.append(line + "\n")
        write_atomically(self.path, lambda f: f.write("".join(kept).encode()))


def start_run(args):
    """Joins the process group (torchrun), opens the log (rank 0 writes) and seeds torch;
    returns (rank, world_size, device, log). The output folder is made by the first write
    (log, checkpoint, figure), so a run that fails before training leaves no folder."""
    rank, world_size, device = distributed.init(args.device)
    args.world_size = world_size
    output_dir = Path(args.output_dir)
    if rank == 0:
        stale = remove_stale_temporaries(output_dir)
        if stale:
            print(f"removed {len(stale)} partial file(s) an interrupted save left in "
                  f"{output_dir}: {', '.join(p.name for p in stale)}")
    log = JsonLog(output_dir / "log.jsonl" if rank == 0 else None)
    torch.manual_seed(args.seed)
    return rank, world_size, device, log


def make_loader(dataset, args, rank: int, world_size: int, device, train: bool = True):
    """(sampler, loader) over this rank's share; a training loader drops the last partial
    batch, an evaluation one keeps every image."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                 seed=args.seed, drop_last=train)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                        num_workers=args.num_workers, drop_last=train,
                        collate_fn=collate_skipping, pin_memory=device.type == "cuda")
    if train and len(loader) == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the data set per "
                         f"process ({len(sampler)} images)")
    return sampler, loader


def wrap_for_training(model, args, world_size: int, device):
    """torch.compile (--compile) and DistributedDataParallel around the model."""
    train_model = torch.compile(model) if args.compile else model
    if world_size > 1:
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return train_model


def train_one_epoch(model, loader, optimizer, scaler, device, epoch, args, log, lr, loss_fn):
    """One pass over the loader, `loss_fn(model, imgs, labels) -> loss` per step; returns the
    epoch's mean loss and the skipped-image count (an epoch that read no image is an error)."""
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
    for i, (imgs, labels, n_skipped) in enumerate(bar):
        skipped += n_skipped
        iteration = epoch * steps_per_epoch + i
        if imgs is not None:
            if i % args.accum_iter == 0:
                set_lr(optimizer, lr_at(i / steps_per_epoch + epoch, lr, args.min_lr,
                                        args.warmup_epochs, args.epochs))
            imgs = imgs.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            boundary = (i + 1) % args.accum_iter == 0 or i + 1 == steps_per_epoch
            sync = contextlib.nullcontext()
            if isinstance(model, DistributedDataParallel) and not boundary:
                sync = model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = loss_fn(model, imgs, labels)
                scaler.scale(loss / args.accum_iter).backward()
            if boundary:
                if args.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
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
            current_lr = max(group["lr"] for group in optimizer.param_groups)
            bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{current_lr:.2e}",
                            img_s=f"{images_per_sec:.0f}")
            log.write(kind="step", epoch=epoch, step=iteration, loss=window_loss, lr=current_lr,
                      images_per_sec=images_per_sec)
            window_sum.zero_()
            window_steps = window_seen = 0
            window_start = time.perf_counter()
    # With every file unreadable the loop "trains" at loss 0 and would save an untrained model.
    if int(distributed.all_reduce_max(torch.tensor(seen, device=device))) == 0:
        mean = distributed.all_reduce_mean(torch.tensor(float(skipped), device=device))
        unreadable = round(float(mean) * args.world_size)
        raise ValueError(f"epoch {epoch} read no image: all {unreadable} files it drew from "
                         f"--data-path {args.data_path} were unreadable (see the warnings); "
                         f"nothing of this epoch was saved")
    mean_loss = float(distributed.all_reduce_mean(loss_sum / max(seen, 1)))
    return mean_loss, skipped


def _resume_state(args, main: bool):
    """(contents, path) of `--resume`; for 'auto' the run's newest checkpoint that loads, saying
    which ones it passed over; (None, None) when there is nothing to resume."""
    if not args.resume:
        return None, None
    if args.resume != "auto":
        return load_checkpoint(args.resume, trust=args.unsafe_trust_checkpoint), args.resume
    unreadable = []
    for path in checkpoints_newest_first(args.output_dir):
        try:
            state = load_checkpoint(path, trust=args.unsafe_trust_checkpoint)
        except CheckpointError as exc:
            unreadable.append(str(exc))
            continue
        if unreadable and main:
            print(f"--resume auto: passed over {len(unreadable)} unreadable checkpoint(s) "
                  f"({'; '.join(unreadable)}); resuming from {path}, the newest that loads")
        return state, path
    if unreadable:
        raise CheckpointError(f"--resume auto: no checkpoint in {args.output_dir} loads "
                              f"({'; '.join(unreadable)})")
    return None, None


def check_resumable(args, state: dict, path) -> None:
    """`--resume` of `mae pretrain` takes pre-training checkpoints, of `mae finetune` fine-tuning
    ones; the other kind is an error naming the flag that takes it."""
    held = weights_kind(state)
    if held == "fine-tuning" and args.command != "finetune":
        raise CheckpointError(f"--resume {path} holds fine-tuning weights (a classifier), not a "
                              f"`mae pretrain` run: continue it with `mae finetune --resume`")
    if held == "pre-training" and args.command == "finetune":
        raise CheckpointError(f"--resume {path} holds pre-training weights (an MAE): to "
                              f"fine-tune from them use --finetune {path}")


def resume_from(args, model, optimizer, scaler, main: bool, log: JsonLog) -> int:
    """Loads `--resume` (a path, or 'auto': the run's newest checkpoint that loads) into the
    model, optimizer and loss scaler; returns the epoch to start at (0 without a checkpoint),
    after dropping the log's records from that epoch on. The fp16 loss scaler's state carries
    over only where both runs scale (`--amp fp16`)."""
    state, path = _resume_state(args, main)
    if state is None:
        return 0
    check_resumable(args, state, path)
    missing = {"optimizer", "epoch"} - set(state)
    if missing:
        raise CheckpointError(f"--resume {path}: not a training checkpoint (no "
                              f"{', '.join(sorted(missing))}); to start from its weights use "
                              f"the command's weight-loading flag instead")
    load_weights(model, state, f"--resume {path}",
                 "the model this run builds (pass the flags or --config it was trained with)")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"--resume {path}: its optimizer state does not fit this run's "
                              f"optimizer ({exc})") from exc
    saved_scaler = state.get("scaler") or {}
    saved_amp = (state.get("args") or {}).get("amp", "unknown")
    note = ""
    if scaler.is_enabled() and saved_scaler:
        scaler.load_state_dict(saved_scaler)
    elif scaler.is_enabled():
        note = (f"; it was saved with --amp {saved_amp} (no fp16 loss scaling), so the loss "
                f"scale starts fresh")
    elif saved_scaler:
        note = f"; its fp16 loss-scaler state is not used with --amp {args.amp}"
    if main:
        print(f"resumed from {path} (epoch {state['epoch']}, step {state.get('step')}){note}")
    log.drop_from(state["epoch"] + 1)
    return state["epoch"] + 1


def save_epoch(args, model, optimizer, scaler, epoch: int, steps_per_epoch: int) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "epoch": epoch,
             "step": (epoch + 1) * steps_per_epoch, "args": vars(args)}
    save_training_state(state, args.output_dir, epoch, args.epochs, args.save_every)
