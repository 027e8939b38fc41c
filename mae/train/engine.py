"""What `mae pretrain` and `mae finetune` share: the data loader, the epoch loop (per-iteration
lr schedule, gradient accumulation, AMP, DDP, a non-finite loss check without a host sync per
step), exact resume and atomic checkpoints."""
from __future__ import annotations

import contextlib
import itertools
import json
import random
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..checkpoints import sharded
from ..checkpoints.files import (
    LAST_CHECKPOINT,
    CheckpointError,
    atomic_save,
    checkpoints_newest_first,
    link_atomically,
    load_checkpoint,
    load_weights,
    remove_stale_temporaries,
    weights_kind,
    write_atomically,
)
from ..data.images import collate_skipping
from ..data.prefetch import DEFAULT_DEPTH, DeviceLoader, Prefetcher
from . import distributed, fsdp, preemption, tracking
from .optim import lr_at, set_lr
from .preemption import Preempted

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
# a stop's save of more model and optimizer state than this is written by every rank (DCP)
PARALLEL_SAVE_BYTES = 2**30
# the values a mid-epoch checkpoint resumes only with (the epoch's order, crops and steps)
MID_EPOCH_KEYS = ("seed", "batch_size", "accum_iter", "data_path", "dataset_size", "train_size")


class NonFiniteLossError(RuntimeError):
    pass


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Every random stream a step draws from (torch, Python, NumPy: masking noise, augmentation,
    mixup, drop path, the loader's worker seeds) as a function of (seed, epoch, rank), so a
    resumed run draws exactly what an uninterrupted one would, on every rank."""
    value = (seed * 1_000_003 + epoch) * 1_009 + rank
    numpy_seed = value % 2**32
    if rank >= 1_009:  # where the value above repeats one of the next epoch's: a hash of
        # all three with its top bit set, which no rank below 1,009 draws (theirs stay as ever)
        value = 2**63 | int(np.random.SeedSequence([seed, epoch, rank]).generate_state(
            1, np.uint64)[0])
        numpy_seed = [value % 2**32, value >> 32]
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(numpy_seed)


class JsonLog:
    """log.jsonl, and each record also to `sinks` (mae.train.tracking: TensorBoard, W&B)."""

    def __init__(self, path: Path | None, sinks=()):
        self.path = path
        self.sinks = list(sinks)

    def write(self, **record) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # made when a run first writes
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def continue_from(self, x: int, saved_args: dict) -> None:
        """A resumed run logs again from `x` on the epoch_1000x axis: the sinks hear it
        (TensorBoard purges what a killed run logged from there, W&B continues its run)."""
        for sink in self.sinks:
            sink.continue_from(x, saved_args)

    def records(self, kind: str) -> list[dict]:
        """The log's records of `kind` so far (none on a rank that does not write it), read as
        `mae plot` reads them."""
        if self.path is None or not self.path.is_file():
            return []
        from ..eval.figures import read_log

        return [r for r in read_log(self.path.parent) if r.get("kind") == kind]

    def drop_from(self, epoch: int, step: int | None = None) -> None:
        """Forgets the records of `epoch` and later (a resumed run writes them again) and any
        line a kill cut short; with `step` (the global step a run resumed mid-epoch continues
        at), the step records of `epoch` before it stay."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("epoch", -1) < epoch or (
                    step is not None and record.get("epoch") == epoch
                    and record.get("step", step) < step):
                kept.append(line + "\n")
        write_atomically(self.path, lambda f: f.write("".join(kept).encode()))


def check_output_dir(args) -> None:
    """--output-dir holding another command's run (its recipe.json says which) is refused: this
    run's checkpoints and log would overwrite that one's (`mae linprobe` after `mae pretrain`,
    both at the default ./output_dir, would replace the checkpoint-last.pth it probes)."""
    recipe = Path(args.output_dir) / "recipe.json"
    try:
        command = json.loads(recipe.read_text()).get("command")
    except (OSError, ValueError, AttributeError):  # no run there, or no recipe to tell
        return
    if command is not None and command != args.command:
        raise ValueError(f"--output-dir {args.output_dir} holds a `mae {command}` run "
                         f"({recipe}): `mae {args.command}` would overwrite its checkpoints "
                         f"and log; give it a folder of its own")


def start_run(args):
    """Joins the process group (torchrun), opens the log (rank 0 writes) and seeds torch;
    returns (rank, world_size, device, log). The output folder is made by the first write
    (log, checkpoint, figure), so a run that fails before training leaves no folder."""
    check_output_dir(args)
    rank, world_size, device = distributed.init(args.device)
    args.world_size = world_size
    output_dir = Path(args.output_dir)
    if rank == 0:
        stale = remove_stale_temporaries(output_dir)
        if stale:
            print(f"removed {len(stale)} partial file(s) an interrupted save left in "
                  f"{output_dir}: {', '.join(p.name for p in stale)}")
    log = (JsonLog(output_dir / "log.jsonl", tracking.open_sinks(args)) if rank == 0
           else JsonLog(None))
    torch.manual_seed(args.seed)
    return rank, world_size, device, log


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: after `skip_batches(n, size)` the
    epoch's first n batches are left out (their indices are never handed to the data set, so
    nothing is read or decoded), until the next `set_epoch`. Its length stays the epoch's, so
    the loader's length is still the steps per epoch that steps are numbered in."""

    skipped = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skipped = 0

    def skip_batches(self, batches: int, batch_size: int) -> None:
        self.skipped = batches * batch_size

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skipped, None)


def make_loader(dataset, args, rank: int, world_size: int, device, train: bool = True):
    """(sampler, loader) over this rank's share; a training loader drops the last partial
    batch, an evaluation one scores every image exactly once over the ranks. Workers leave the
    stop signals to the main process (see `preemption`). Tar shards (an IterableDataset) split
    themselves across the ranks and workers; bytes-only data sets (`--data-loader gpu`) bring
    their own collation."""
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    if iterable:
        sampler = dataset.split(rank, world_size, args.batch_size, train)
    elif train:
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                   seed=args.seed, drop_last=True)
    else:  # every image once over the ranks (DistributedSampler would repeat some to even out)
        sampler = range(rank, len(dataset), world_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=None if iterable else sampler,
                        num_workers=args.num_workers, drop_last=train,
                        collate_fn=getattr(dataset, "collate", collate_skipping),
                        pin_memory=device.type == "cuda",
                        worker_init_fn=preemption.ignore_stop_signals)
    if train and len(loader) == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the data set per "
                         f"process ({len(sampler)} images)")
    return sampler, loader


def evaluation_loader(dataset, args, rank: int, world_size: int, device,
                      prepare=None) -> DeviceLoader:
    """Every image of `dataset` once over the ranks, made ready on the device ahead of the
    step by the loader thread (`--prefetch` deep), through `prepare` where the workers send
    files (`--data-loader gpu`: centre crops)."""
    _, loader = make_loader(dataset, args, rank, world_size, device, train=False)
    return DeviceLoader(loader, device, prepare, getattr(args, "prefetch", DEFAULT_DEPTH))


def wrap_for_training(model, args, world_size: int, device):
    """Activation checkpointing (--grad-checkpointing), then FSDP2 in place (--fsdp; compiled
    per block), or DistributedDataParallel around the model and torch.compile (--compile)
    around that, as PyTorch recommends: dynamo then splits the graph at DDP's buckets, so each
    bucket's all-reduce overlaps the rest of the backward (a compiled model inside DDP would
    finish its whole backward before the first). Build the optimizer after this: FSDP2
    replaces the parameters by sharded ones."""
    if getattr(args, "grad_checkpointing", False):
        fsdp.set_grad_checkpointing(model)
    if getattr(args, "fsdp", False):
        if world_size == 1:
            print("--fsdp on one process: FSDP2 over a group of one (nothing is sharded; the "
                  "checkpoints are sharded ones, which resume on any number of processes)")
        return fsdp.shard_model(model, device, args.amp, args.compile)
    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return torch.compile(train_model) if args.compile else train_model


class EpochResult(NamedTuple):
    loss: float  # the mean over the epoch's steps and the processes
    skipped: int  # this process's images that could not be read or were left out with them
    data_wait_ms: float  # the training thread's wait for its batches, ms per step


def epoch_record(epoch: int, result: EpochResult, seconds: float, prepare=None, **more) -> dict:
    """The log's record of an epoch: its loss, its data (images skipped, the data wait, and with
    the gpu loader's `prepare` the files its device decoder failed on, decoded on the CPU)."""
    record = dict(kind="epoch", epoch=epoch, loss=result.loss, skipped_images=result.skipped,
                  data_wait_ms=result.data_wait_ms, seconds=seconds)
    if prepare is not None:
        record["decode_fallbacks"] = prepare.take_fallbacks()
    return {**record, **more}


def train_one_epoch(model, loader, optimizer, scaler, device, epoch, args, log, lr, loss_fn,
                    resumed=None, prepare=None, *, saves) -> EpochResult:
    """One pass over the loader, `loss_fn(model, imgs, labels) -> loss` per step (an epoch that
    read no image is an error). `resumed` (a mid-epoch `Start`; its sampler skips the steps
    done) continues at its step with its random streams and the epoch's sums so far. Under
    `mae`'s stop signals (`preemption`), saves `saves` (the model unwrapped: no DDP, no compile)
    and the optimizer at the step at which the ranks agreed to stop (never the epoch's last one:
    the epoch then ends as usual) in checkpoint-last, then raises `Preempted`, its DataLoader
    workers shut down. The batches are made ready ahead of the step by a loader thread
    (`data.prefetch`, `--prefetch` batches deep): `prepare(batch, labels, epoch, step) ->
    (images, labels, unreadable)` turns what a bytes-only loader yields into the step's images
    (`data.gpu.GpuBatches`); a step at which any rank has no image is skipped by every rank."""
    model.train()
    first = resumed.step if resumed is not None else 0  # `i` below is the true step
    batches = Prefetcher(loader, device, prepare, epoch=epoch, first=first,
                         depth=getattr(args, "prefetch", DEFAULT_DEPTH),
                         group=distributed.data_group())  # draws the workers' seed, as ever
    try:
        if resumed is not None:
            restore_rng(resumed.rng, device)
        return _epoch(model, batches, len(loader), first, optimizer, scaler, device, epoch,
                      args, log, lr, loss_fn, resumed, saves)
    finally:
        batches.close()  # the workers exit now, not with the process


def _epoch(model, batches, steps_per_epoch, first, optimizer, scaler, device, epoch, args, log,
           lr, loss_fn, resumed, saves) -> EpochResult:
    amp_dtype = AMP_DTYPES[args.amp]
    main = distributed.is_main()
    stop = preemption.active()
    bar = tqdm(batches, desc=f"epoch {epoch}", disable=not main or args.quiet, leave=False,
               dynamic_ncols=True, total=steps_per_epoch, initial=first)
    loss_sum = torch.zeros((), device=device)
    window_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    seen = window_steps = window_seen = skipped = 0
    if resumed is not None:  # the epoch's sums so far: its mean and log windows as ever
        loss_sum, window_sum, first_bad = (t.to(device) for t in resumed.totals["sums"])
        seen, window_steps, window_seen, skipped = resumed.totals["counts"]
    window_start, window_first, window_wait = time.perf_counter(), first, 0.0
    optimizer.zero_grad(set_to_none=True)
    stopped = None
    for i, (imgs, labels, n_skipped) in enumerate(bar, first):
        skipped += n_skipped
        iteration = epoch * steps_per_epoch + i
        if imgs is not None:
            if i % args.accum_iter == 0:
                set_lr(optimizer, lr_at(i / steps_per_epoch + epoch, lr, args.min_lr,
                                        args.warmup_epochs, args.epochs))
            boundary = (i + 1) % args.accum_iter == 0 or i + 1 == steps_per_epoch
            loss = _step(model, imgs, labels, optimizer, scaler, device, amp_dtype, args,
                         loss_fn, boundary)
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
            wait_ms = (batches.wait_s - window_wait) * 1000 / (i + 1 - window_first)
            current_lr = max(group["lr"] for group in optimizer.param_groups)
            bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{current_lr:.2e}",
                            img_s=f"{images_per_sec:.0f}", data_ms=f"{wait_ms:.0f}")
            log.write(kind="step", epoch=epoch, step=iteration, loss=window_loss, lr=current_lr,
                      images_per_sec=images_per_sec, data_wait_ms=wait_ms,
                      epoch_1000x=int((i / steps_per_epoch + epoch) * 1000))  # TensorBoard's x
            window_sum.zero_()
            window_steps = window_seen = 0
            window_start, window_first, window_wait = time.perf_counter(), i + 1, batches.wait_s
        may_stop = (i + 1) % args.accum_iter == 0 and i + 1 < steps_per_epoch
        if stop is not None and stop.after_step(iteration, may_stop):
            totals = {"sums": [t.cpu() for t in (loss_sum, window_sum, first_bad)],
                      "counts": [seen, window_steps, window_seen, skipped]}
            stopped = Preempted(stop.signum, epoch, i + 1, steps_per_epoch,
                                distributed.gather_to_main({**rng_state(device),
                                                            "totals": totals}))
            break
    if stopped is not None:
        bar.close()
        del bar
        batches.close()  # the workers exit before the save
        save_stopped(args, saves, optimizer, scaler, stopped)
        raise stopped
    # With every file unreadable the loop "trains" at loss 0 and would save an untrained model.
    if int(distributed.all_reduce_max(torch.tensor(seen, device=device))) == 0:
        mean = distributed.all_reduce_mean(torch.tensor(float(skipped), device=device))
        unreadable = round(float(mean) * args.world_size)
        raise ValueError(f"epoch {epoch} read no image: all {unreadable} files it drew from "
                         f"--data-path {args.data_path} were unreadable (see the warnings); "
                         f"nothing of this epoch was saved")
    mean_loss = float(distributed.all_reduce_mean(loss_sum / max(seen, 1)))
    return EpochResult(mean_loss, skipped,
                       batches.wait_s * 1000 / max(1, steps_per_epoch - first))


def _step(model, imgs, labels, optimizer, scaler, device, amp_dtype, args, loss_fn,
          boundary: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch, the optimizer step at an accumulation
    `boundary` (where DDP and FSDP reduce the gradients); returns the detached float loss."""
    sync = contextlib.nullcontext()
    ddp = getattr(model, "_orig_mod", model)  # --compile wraps DDP (wrap_for_training)
    if isinstance(ddp, DistributedDataParallel) and not boundary:
        sync = ddp.no_sync()
    if isinstance(model, FSDPModule):  # FSDP2's no_sync: reduce-scatter at the boundary
        model.set_requires_gradient_sync(boundary)
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
    return loss.detach().float()


def evaluate(model, loader, device, amp_dtype) -> dict:
    """Top-1, top-5 (%) and cross-entropy of a classifier over the loader (each rank its share
    of the images, summed over the ranks), as main_finetune.py / main_linprobe.py evaluate.
    Every rank scores with rank 0's buffers (a BatchNorm's running statistics), which are what
    it saves: DDP copies them over only at the start of each training forward. Through the gpu
    loader, also `decode_fallbacks`: the files its device decoder failed on (over the ranks)."""
    if torch.distributed.is_initialized():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    model.eval()
    # top1, top5, loss, images, the files decoded on the CPU after the device decoder failed
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    batches = loader if isinstance(loader, DeviceLoader) else DeviceLoader(loader, device)
    counts_fallbacks = hasattr(batches.prepare, "take_fallbacks")
    if counts_fallbacks:
        batches.prepare.take_fallbacks()  # this evaluation's alone
    for imgs, labels, _ in batches:  # on the device, made ready ahead by the loader thread
        if imgs is None:
            continue
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype,
                                             enabled=amp_dtype is not None):
            logits = model(imgs).float()
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        totals[:4] += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), loss,
                                   torch.tensor(imgs.shape[0], device=device)]).double()
    if counts_fallbacks:
        totals[4] += batches.prepare.take_fallbacks()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    n = max(totals[3].item(), 1.0)
    stats = {"top1": 100 * totals[0].item() / n, "top5": 100 * totals[1].item() / n,
             "loss": totals[2].item() / n, "images": int(totals[3].item())}
    if counts_fallbacks:
        stats["decode_fallbacks"] = int(totals[4].item())
    return stats


def evaluation_text(stats: dict | None) -> str:
    """The end of an epoch's line: its evaluation, or why it has none (`stop_pending`)."""
    if not stats:
        return "stopping: no evaluation, checkpoint-last alone"
    return (f"val top-1 {stats['top1']:.1f} top-5 {stats['top5']:.1f} ({stats['images']} "
            f"images)")


def resume_state(args, main: bool):
    """(contents, path) of `--resume`; for 'auto' the run's newest checkpoint that loads, saying
    which ones it passed over; (None, None) when there is nothing to resume. Under 'auto' rank 0
    alone chooses and tells the others (ranks globbing the folder each on its own could pick
    different ones: a transient read error, NFS attribute caching, a `.old` directory put back
    meanwhile). Where any rank cannot read the checkpoint, or reads another position in it,
    every rank stops with that error: one rank alone would leave the rest hanging."""
    if not args.resume:
        return None, None
    state = error = None
    path = args.resume
    if args.resume == "auto":
        if main:
            state, path, error = _newest_loadable(args)
        path, error = distributed.broadcast_from_main((path, error))
        if path is None and error is not None:
            raise CheckpointError(error)
        if path is None:
            return None, None
    if state is None:
        try:
            state = _read_resumable(args, path)
        except CheckpointError as exc:
            error = str(exc)
    position = None if state is None else (state.get("epoch"), state.get("step"))
    read = distributed.all_gather((error, position))
    where = "" if len(read) == 1 else f" (process {{}} of {len(read)})"
    for rank, (failed, held) in enumerate(read):
        if failed is not None:
            raise CheckpointError(failed + where.format(rank))
        if held != read[0][1]:
            raise CheckpointError(f"--resume {args.resume}: {path} held (epoch, step) {held} "
                                  f"on process {rank} but {read[0][1]} on rank 0: it changed "
                                  f"while they read it")
    return state, path


def _read_resumable(args, path) -> dict:
    """A checkpoint's contents; of a sharded one its extras only (the shards load in place)."""
    if sharded.is_sharded(path):
        return sharded.read_extras(path)
    return load_checkpoint(path, trust=args.unsafe_trust_checkpoint)


def _newest_loadable(args):
    """Rank 0 under --resume auto: (contents, path, None) of the newest checkpoint that loads,
    (None, None, None) without any, (None, None, error) when none loads."""
    unreadable = []
    for path in checkpoints_newest_first(args.output_dir):
        try:
            state = _read_resumable(args, path)
        except CheckpointError as exc:
            unreadable.append(str(exc))
            continue
        if unreadable:
            print(f"--resume auto: passed over {len(unreadable)} unreadable checkpoint(s) "
                  f"({'; '.join(unreadable)}); resuming from {path}, the newest that loads")
        return state, path, None
    if unreadable:
        return None, None, (f"--resume auto: no checkpoint in {args.output_dir} loads "
                            f"({'; '.join(unreadable)})")
    return None, None, None


def checkpoint_to_evaluate(args, main: bool):
    """--eval's (contents, path): --resume's checkpoint (a path, or 'auto': the run's newest),
    one of this command's."""
    if not args.resume:
        raise ValueError("--eval needs the trained weights: --resume CHECKPOINT (or auto)")
    state, path = resume_state(args, main)
    if state is None:
        raise CheckpointError(f"--eval --resume auto: no checkpoint in {args.output_dir}")
    check_resumable(args, state, path)
    return state, path


def check_resumable(args, state: dict, path) -> None:
    """`--resume` of `mae pretrain` takes pre-training checkpoints, of `mae finetune` fine-tuning
    ones, of `mae linprobe` its own; another kind is an error naming the flag that takes it."""
    saved_args = state.get("args") or {}
    saved = saved_args.get("command")
    if args.command == "linprobe":
        if saved != "linprobe":
            raise CheckpointError(f"--resume {path} is not a `mae linprobe` run"
                                  + (f" (it is a `mae {saved}` one)" if saved else "")
                                  + ": the encoder to probe is --finetune")
        _check_probed_encoder(args, saved_args, path)
        return
    held = weights_kind(state)
    if held == "fine-tuning" and args.command != "finetune":
        raise CheckpointError(f"--resume {path} holds fine-tuning weights (a classifier), not a "
                              f"`mae pretrain` run: continue it with `mae finetune --resume`")
    if held == "pre-training" and args.command == "finetune":
        raise CheckpointError(f"--resume {path} holds pre-training weights (an MAE): to "
                              f"fine-tune from them use --finetune {path}")
    if saved is not None and saved != args.command:
        raise CheckpointError(f"--resume {path} is a `mae {saved}` run, not `mae {args.command}`")


def _check_probed_encoder(args, saved: dict, path) -> None:
    """A probe's head continues (or is scored) only on the encoder and features it was trained
    on: the same weights (by fingerprint, wherever the file now is) and pooling."""
    if saved.get("encoder_fingerprint") not in (None, args.encoder_fingerprint):
        raise CheckpointError(f"--resume {path} trained its head on another encoder (it was "
                              f"--finetune {saved.get('checkpoint')}"
                              + (" --random-init" if saved.get("random_init") else "")
                              + f"), not on --finetune {args.checkpoint}"
                              + (" --random-init" if args.random_init else ""))
    if saved.get("global_pool") not in (None, args.global_pool):
        pooled = "--global-pool" if saved["global_pool"] else "--cls-token"
        raise CheckpointError(f"--resume {path} trained its head on the features of "
                              f"{pooled}: pass {pooled}")


class Start(NamedTuple):
    """Where a run starts: `epoch`, `step` steps into it (a run stopped mid-epoch), with this
    rank's random streams `rng` and the epoch's loss sums and counts `totals` as they were
    after that step (None at an epoch's start)."""

    epoch: int
    step: int = 0
    rng: dict | None = None
    steps_per_epoch: int | None = None
    totals: dict | None = None


def _start_after(args, state: dict, path, log: JsonLog) -> Start:
    """Where a run continues after a checkpoint's `epoch` and `epoch_step`, the log's later
    records dropped. A mid-epoch checkpoint continues only with the process count it was saved
    with: the step's data and random streams are per process."""
    epoch, steps = state["epoch"], state.get("steps_per_epoch")
    done = state.get("epoch_step", steps)
    saved = state.get("args") or {}
    if steps is None or done >= steps:  # an epoch-end checkpoint
        log.drop_from(epoch + 1)
        log.continue_from((epoch + 1) * 1000 + 1, saved)  # after the epoch's own record
        if distributed.is_main():
            _catch_up_numbered(args, Path(path), epoch)
        return Start(epoch + 1)
    where = f"--resume {path} stopped mid-epoch (epoch {epoch} step {done})"
    streams = state.get("rng") or []
    if len(streams) != args.world_size:
        raise CheckpointError(f"{where} in a run of {len(streams)} process(es): continue it "
                              f"with {len(streams)}, not {args.world_size}")
    for key in MID_EPOCH_KEYS:  # what the rest of the epoch's data and steps depend on
        if key in saved and saved[key] != getattr(args, key, None):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"{where} with {flag} {saved[key]}, not {getattr(args, key)}: "
                                  f"a mid-epoch resume continues its epoch's data and random "
                                  f"streams only with the {flag} it was saved with")
    log.drop_from(epoch, epoch * steps + done)
    log.continue_from(int((done / steps + epoch) * 1000), saved)
    if distributed.is_main():
        print(f"continuing epoch {epoch} at step {done} of {steps}, its random streams restored")
    mine = dict(streams[distributed.rank()])
    totals = mine.pop("totals")
    return Start(epoch, done, mine, steps, totals)


def _catch_up_numbered(args, path: Path, epoch: int) -> None:
    """Rank 0, resuming the run's own epoch-end checkpoint-last: its numbered copy, where the
    save skipped it for a pending stop (`stop_pending`)."""
    own = (path.stem == Path(LAST_CHECKPOINT).stem
           and path.resolve().parent == Path(args.output_dir).resolve())
    if own and not (path.parent / f"checkpoint-{epoch}{path.suffix}").exists():
        copy_numbered(args, path, epoch)


def enter_epoch(sampler, epoch: int, start: Start, args) -> Start | None:
    """`sampler.set_epoch(epoch)`; returns `start` in the epoch a run resumed mid-way, its
    sampler skipping the steps done (for `train_one_epoch`), else None. Between epochs, a stop
    signal seen during the last one's final step or its end (evaluation, saving) stops the run
    here, at the checkpoint-last.pth that epoch wrote."""
    sampler.set_epoch(epoch)
    steps = len(sampler) // args.batch_size  # a training loader drops its partial batch
    stop = preemption.active()
    if epoch > start.epoch and stop is not None and stop.agree():
        stopped = Preempted(stop.signum, epoch - 1, steps, steps)
        stopped.path = last_checkpoint(args)
        raise stopped
    if epoch != start.epoch or not start.step:
        return None
    if start.steps_per_epoch != steps:
        raise CheckpointError(f"--resume: the checkpoint stopped at step {start.step} of an "
                              f"epoch of {start.steps_per_epoch} steps, but this run's epochs "
                              f"have {steps}: resume with the data, --batch-size and process "
                              f"count it was saved with")
    sampler.skip_batches(start.step, args.batch_size)
    return start


def rng_state(device) -> dict:
    """Every random stream of this process, in types `torch.load(weights_only=True)` reads."""
    numpy = np.random.get_state(legacy=False)
    numpy["state"]["key"] = torch.from_numpy(numpy["state"]["key"].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = {**state["numpy"], "state": {**state["numpy"]["state"]}}
    numpy["state"]["key"] = numpy["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def resume_from(args, model, optimizer, scaler, main: bool, log: JsonLog) -> Start:
    """Loads `--resume` (a path, or 'auto': the run's newest checkpoint that loads) into the
    model, optimizer and loss scaler; returns where to start (epoch 0 without a checkpoint;
    mid-epoch after a stop by a signal), after dropping the log's records from there on. The
    fp16 loss scaler's state carries over only where both runs scale (`--amp fp16`)."""
    state, path = resume_state(args, main)
    if state is None:
        return Start(0)
    if sharded.is_sharded(path):
        return _resume_sharded(args, model, optimizer, state, path, main, log)
    if getattr(args, "fsdp", False):
        raise CheckpointError(f"--resume {path}: a single-file checkpoint does not resume under "
                              f"--fsdp (its optimizer state is not keyed for sharding); resume "
                              f"it without --fsdp, or resume a sharded checkpoint-N/ folder")
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
    return _start_after(args, state, path, log)


def _resume_sharded(args, model, optimizer, extras: dict, path, main: bool,
                    log: JsonLog) -> Start:
    """`resume_from` for a sharded checkpoint (any world size, with or without --fsdp)."""
    saved = (extras.get("args") or {}).get("command")
    if saved is not None and saved != args.command:
        raise CheckpointError(f"--resume {path} is a `mae {saved}` run, not `mae {args.command}`")
    extras = sharded.load_sharded(model, optimizer, path, trust=args.unsafe_trust_checkpoint)
    if main:
        print(f"resumed from {path} (sharded; epoch {extras['epoch']}, step {extras['step']})")
    return _start_after(args, extras, path, log)


def training_extras(args, scaler, epoch: int, epoch_step: int, steps_per_epoch: int,
                    rng=None) -> dict:
    """What a checkpoint holds beside the model and optimizer: the scaler, where the run is
    (`epoch`, `epoch_step` steps into it of `steps_per_epoch`; `step` counts from the start),
    the arguments and, stopped mid-epoch, every rank's random streams."""
    extras = {"scaler": scaler.state_dict(), "epoch": epoch, "epoch_step": epoch_step,
              "steps_per_epoch": steps_per_epoch,
              "step": epoch * steps_per_epoch + epoch_step, "args": vars(args)}
    if rng is not None:
        extras["rng"] = rng
    return extras


def last_checkpoint(args) -> Path:
    """The rolling checkpoint: checkpoint-last.pth, or the sharded checkpoint-last/ (--fsdp)."""
    path = Path(args.output_dir) / LAST_CHECKPOINT
    return path.with_suffix("") if getattr(args, "fsdp", False) else path


def save_stopped(args, model, optimizer, scaler, stopped: Preempted) -> None:
    """Called by every rank on a mid-epoch stop: checkpoint-last at the step it stopped after.
    Under --fsdp every rank writes its shards. So does every rank of a run whose model and
    optimizer state passes PARALLEL_SAVE_BYTES, into checkpoint-last/ (DCP gives each rank its
    share of the replicated tensors: they write in parallel, where rank 0 alone would take N
    times as long); else rank 0 writes checkpoint-last.pth."""
    extras = training_extras(args, scaler, stopped.epoch, stopped.step, stopped.steps_per_epoch,
                             stopped.rng_states)
    path = last_checkpoint(args)
    parallel = args.world_size > 1 and state_bytes(model, optimizer) > PARALLEL_SAVE_BYTES
    if getattr(args, "fsdp", False) or parallel:
        path = sharded.save_sharded(model, optimizer, extras, path.with_suffix(""))
        if distributed.is_main():  # the epoch-end .pth before it, superseded
            (path.parent / LAST_CHECKPOINT).unlink(missing_ok=True)
    elif distributed.is_main():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extras}
        atomic_save(state, path)
    stopped.path = path


def state_bytes(model, optimizer) -> int:
    """The bytes a checkpoint of `model` and `optimizer` holds (this rank's, under FSDP)."""
    tensors = [*model.state_dict().values(),
               *(v for state in optimizer.state.values() for v in state.values())]
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def stop_pending(args, epoch: int) -> bool:
    """Every rank, at the end of `epoch` (before the run's last): whether the ranks agree that
    a stop signal came during its last step or since. The epoch then saves checkpoint-last and
    nothing else on the way out (no evaluation, figure or numbered copy: `resume_from` makes
    that copy), so that the stop fits the grace time."""
    stop = preemption.active()
    return epoch + 1 < args.epochs and stop is not None and stop.agree()


def save_epoch(args, model, optimizer, scaler, epoch: int, steps_per_epoch: int,
               stopping: bool = False) -> None:
    """Called by every rank at an epoch's end (one process may call it alone without --fsdp):
    checkpoint-last (under --fsdp every rank's shards, else rank 0's .pth file) and, at the
    cadence, checkpoint-<epoch> as a second name of its files, unless `stopping`."""
    extras = training_extras(args, scaler, epoch, steps_per_epoch, steps_per_epoch)
    path = last_checkpoint(args)
    if getattr(args, "fsdp", False):
        sharded.save_sharded(model, optimizer, extras, path)
    elif distributed.is_main():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extras}
        atomic_save(state, path)
        shutil.rmtree(path.with_suffix(""), ignore_errors=True)  # a stop's parallel save
    if not stopping and distributed.is_main():
        copy_numbered(args, path, epoch)


def copy_numbered(args, last: Path, epoch: int) -> None:
    """Rank 0: checkpoint-<epoch> (a .pth file, or a sharded folder, as `last` is), the rolling
    checkpoint `last` under its number, at the official cadence (epoch 0, every --save-every
    epochs, and the last); hard links, so it costs no write."""
    if epoch % args.save_every and epoch + 1 != args.epochs:
        return
    numbered = Path(args.output_dir) / f"checkpoint-{epoch}{last.suffix}"
    if last.is_dir():
        sharded.copy_sharded(last, numbered)
    else:
        link_atomically(last, numbered)
