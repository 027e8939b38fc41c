"""`mae pretrain`: the official MAE pre-training recipe, on one process or many (torchrun)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data.gpu import GpuBatches
from ..data.shards import open_dataset
from ..data.video import build_video_dataset
from ..eval.figures import save_curves, save_reconstruction_figure
from ..models import build_model
from ..models.image import MODEL_CONFIGS, resolve_config
from ..models.video import VIDEO_MODEL_CONFIGS
from .engine import (
    enter_epoch,
    make_loader,
    resume_from,
    save_epoch,
    seed_epoch,
    start_run,
    train_one_epoch,
    wrap_for_training,
)
from .online_probe import start_probe
from .optim import build_optimizer
from .recipe import announce, pretrain_recipe
from .tracking import closes_sinks

# Without --model, --data-path or model keys in --config, `mae pretrain` is the built-in demo
# (minutes on a CPU); anything else gets the official model and recipe defaults
# (facebookresearch/mae main_pretrain.py, with PRETRAIN.md's base lr; VideoMAE's for --video).
DEMO_DEFAULTS = dict(model="mae_vit_tiny_patch16", input_size=32, patch_size=8, blr=5e-3,
                     epochs=40, warmup_epochs=1, mask_ratio=0.75)
OFFICIAL_DEFAULTS = dict(model="mae_vit_large_patch16", input_size=224, blr=1.5e-4, epochs=400,
                         warmup_epochs=40, mask_ratio=0.75)
VIDEO_DEMO_DEFAULTS = dict(model="mae_videomae_tiny_patch16", input_size=32, patch_size=8,
                           num_frames=8, tubelet_size=2, blr=5e-3, epochs=10, warmup_epochs=1,
                           mask_ratio=0.9)
VIDEO_OFFICIAL_DEFAULTS = dict(model="mae_videomae_base_patch16", input_size=224, num_frames=16,
                               tubelet_size=2, blr=1.5e-4, epochs=800, warmup_epochs=40,
                               mask_ratio=0.9)


def apply_defaults(args) -> None:
    """Fills the flags left unset with the demo's or the official defaults, then resolves the
    model config (named model, --config keys, then flags) into `args.model_config`."""
    file_config = dict(args.model_config or {})
    args.demo = args.model is None and args.data_path is None and not file_config
    if args.video:
        defaults = VIDEO_DEMO_DEFAULTS if args.demo else VIDEO_OFFICIAL_DEFAULTS
    else:
        defaults = DEMO_DEFAULTS if args.demo else OFFICIAL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None and not (key == "model" and file_config):
            setattr(args, key, value)
    names = VIDEO_MODEL_CONFIGS if args.video else MODEL_CONFIGS
    if args.model is not None and args.model not in names:
        raise ValueError(f"--model must be one of {sorted(names)}"
                         f"{' with --video' if args.video else ''}, got {args.model!r}")
    config = {**names.get(args.model, {}), **file_config,
              "img_size": args.input_size, "mask_ratio": args.mask_ratio,
              "norm_pix_loss": args.norm_pix_loss, "use_kernels": not args.no_kernels}
    if args.video:
        config.update(num_frames=args.num_frames, tubelet_size=args.tubelet_size)
    elif args.num_frames or args.tubelet_size:
        raise ValueError("--num-frames and --tubelet-size are for --video")
    if args.mask_type:
        config["mask_type"] = args.mask_type
    if args.target == "norm_pix":
        args.norm_pix_loss = config["norm_pix_loss"] = True
    elif args.target:
        config["target"] = args.target
    if args.patch_size:
        config["patch_size"] = args.patch_size
    if args.decoder_depth is not None:  # 0 too: the official code's block-less decoder
        config["decoder_layers"] = args.decoder_depth
    args.model_config = resolve_config(config)


@closes_sinks
def pretrain(args) -> dict:
    apply_defaults(args)
    rank, world_size, device, log = start_run(args)
    main = rank == 0
    loader_kind = getattr(args, "data_loader", "pil")

    def data(split: str, augment: bool, length, loader: str = "pil"):
        if args.video:
            return build_video_dataset(args.data_path, args.input_size, args.num_frames, split,
                                       augment, seed=args.seed, length=length,
                                       sampling_rate=args.sampling_rate, required=False)
        return open_dataset(args.data_path, args.input_size, split, augment, seed=args.seed,
                            length=length, required=False, loader=loader)

    dataset = data("train", True, args.dataset_size, loader_kind)
    # --data-loader gpu: the workers send bytes, each step decodes and crops on the device
    prepare = (GpuBatches(args.input_size, device, args.seed, rank) if loader_kind == "gpu"
               else None)
    sampler, loader = make_loader(dataset, args, rank, world_size, device)

    model = build_model(args.model_config).to(device)
    eff_batch = args.batch_size * args.accum_iter * world_size
    probe, probe_val = start_probe(args, model, device, eff_batch)  # draws no random numbers
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    train_model = wrap_for_training(model, args, world_size, device)  # before the optimizer
    optimizer = build_optimizer(model, lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_at = resume_from(args, model, optimizer, scaler, main, log)

    preview = data("val", False, 4)
    readable = [item[0] for item in map(preview.__getitem__, range(min(4, len(preview))))
                if item is not None]
    # the epoch figures show pixels: none for a model that predicts HOG features
    pixels = args.model_config["target"] == "pixel"
    # a sharded model runs only where every rank calls it: no figures (draw from `mae export`)
    preview_imgs = (torch.stack(readable).to(device) if readable and pixels and not args.fsdp
                    else None)
    preview_noise = model.draw_noise(len(readable),
                                     torch.Generator().manual_seed(args.seed)).to(device)
    if main:
        setting = "built-in demo settings" if args.demo else "official recipe defaults"
        print(f"{args.model or 'custom config'} ({setting}): {args.input_size}px, patch "
              f"{args.model_config['patch_size']}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"{len(dataset)} {'clips' if args.video else 'images'}, effective batch "
              f"{eff_batch}, lr {lr:.2e}, {world_size} process(es) on {device.type}")
        announce("pretrain", pretrain_recipe(args, eff_batch, lr), log, args.output_dir)

    def loss_fn(m, imgs, labels):
        loss = m(imgs, args.mask_ratio).loss
        if probe is not None:  # on the features of the forward just run, detached
            probe.step(labels)
        return loss

    summary = {"epochs": [], "skipped_images": 0}
    for epoch in range(start_at.epoch, args.epochs):
        seed_epoch(args.seed, epoch, rank)
        dataset.set_epoch(epoch)  # for shards also the sampler: setting it again keeps a skip
        resumed = enter_epoch(sampler, epoch, start_at, args)
        start = time.perf_counter()
        loss, skipped = train_one_epoch(train_model, loader, optimizer, scaler, device,
                                        epoch, args, log, lr, loss_fn, resumed, prepare,
                                        saves=model)
        summary["skipped_images"] += skipped
        record = dict(kind="epoch", epoch=epoch, loss=loss, skipped_images=skipped,
                      seconds=time.perf_counter() - start)
        if probe is not None and main:
            record.update(probe_loss=probe.train_loss(),
                          probe_top1=probe.evaluate(probe_val, args.mask_ratio, args.seed,
                                                    args.batch_size))
        summary["epochs"].append(record)
        if main:
            log.write(**record)
            print(f"epoch {epoch}: loss {loss:.4f}"
                  + (f", online probe top-1 {record['probe_top1']:.1f}" if probe else "")
                  + (f", {skipped} unreadable images skipped" if skipped else ""))
        save_epoch(args, model, optimizer, scaler, epoch, len(loader))  # the work first
        if not main:
            continue
        if preview_imgs is not None:
            save_reconstruction_figure(model, preview_imgs,
                                       Path(args.output_dir) / f"reconstruction-{epoch:03d}.png",
                                       args.mask_ratio, preview_noise, title=f"epoch {epoch}")
    if main and summary["epochs"]:
        save_curves(Path(args.output_dir))
    return summary
