"""`mae pretrain`: the official MAE pre-training recipe, on one process or many (torchrun)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data.gpu import GpuBatches, explicit_gpu_loader, jpeg_decoder
from ..data.shards import open_dataset
from ..data.video import build_video_dataset
from ..eval.figures import save_curves, save_reconstruction_figure
from ..models import build_model
from ..models.crossmae import CROSSMAE_CONFIGS
from ..models.image import MODEL_CONFIGS, resolve_config
from ..models.pixio import PIXIO_CONFIGS
from ..models.video import VIDEO_MODEL_CONFIGS
from .engine import (
    enter_epoch,
    epoch_record,
    make_loader,
    resume_from,
    save_epoch,
    seed_epoch,
    start_run,
    stop_pending,
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
# Pixio's recipe (pretraining/scripts/pretrain_pixio_vith16_imagenet.sh; its epochs are 1605
# steps of 8192 images) and CrossMAE's (its README's ViT-B command) for their models.
PIXIO_OFFICIAL_DEFAULTS = dict(input_size=256, blr=2.5e-5, epochs=400, warmup_epochs=40,
                               mask_ratio=0.75, drop_path=0.4)
CROSSMAE_OFFICIAL_DEFAULTS = dict(input_size=224, blr=1.5e-4, epochs=800, warmup_epochs=40,
                                  mask_ratio=0.75)
# 5.5B parameters: 103 GiB of fp32 weights, gradients and AdamW states (mae.train.fsdp's table)
FSDP_ONLY = ("pixio_vit5b16_enc3072x48h32_dec512x32h16",)
# the flags that set Pixio's and CrossMAE's config keys (their names)
DECODER_SIDE = ("decoder", "predict_ratio", "weight_fm", "use_input", "self_attn", "mask_grid",
                "n_cls_tokens", "pos_embed", "drop_path")
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
    elif args.demo:
        defaults = DEMO_DEFAULTS
    else:
        defaults = (PIXIO_OFFICIAL_DEFAULTS if args.model in PIXIO_CONFIGS else
                    CROSSMAE_OFFICIAL_DEFAULTS if args.model in CROSSMAE_CONFIGS else
                    OFFICIAL_DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key) is None and not (key == "model" and file_config):
            setattr(args, key, value)
    names = VIDEO_MODEL_CONFIGS if args.video else MODEL_CONFIGS
    if args.model is not None and args.model not in names:
        raise ValueError(f"--model must be one of {sorted(names)}"
                         f"{' with --video' if args.video else ''}, got {args.model!r}")
    if args.model in FSDP_ONLY and not getattr(args, "fsdp", False):
        raise ValueError(f"--model {args.model} holds 103 GiB of weights, gradients and AdamW "
                         f"states: it trains under --fsdp only")
    sources = args.__dict__.setdefault("sources", {})
    if sources.get("norm_pix_loss") not in ("flag", "config") \
            and "norm_pix_loss" in names.get(args.model, {}):  # Pixio's and CrossMAE's recipes
        args.norm_pix_loss = names[args.model]["norm_pix_loss"]
        sources["norm_pix_loss"] = "official"
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
    config.update({key: getattr(args, key) for key in DECODER_SIDE
                   if getattr(args, key, None) is not None})
    args.model_config = resolve_config(config)
    args.lr_scale = lr_scale(args)


def lr_scale(args) -> float:
    """CrossMAE's factor on the lr a base lr gives: predict_ratio / mask_ratio (its
    kept_mask_ratio / mask_ratio), unless --no-lr-scale; 1 for every other model."""
    config = args.model_config
    if config["decoder"] != "cross" or config["predict_ratio"] is None \
            or getattr(args, "no_lr_scale", False):
        return 1.0
    return config["predict_ratio"] / config["mask_ratio"]


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
                            length=length, required=False, loader=loader,
                            ship_jpegs=jpeg_decoder(device) is not None)

    dataset = data("train", True, args.dataset_size, loader_kind)
    # --data-loader gpu: the workers send JPEG bytes, the loader thread decodes and crops them
    prepare = (GpuBatches(args.input_size, device, args.seed, rank,
                          strict=explicit_gpu_loader(args)) if loader_kind == "gpu" else None)
    sampler, loader = make_loader(dataset, args, rank, world_size, device)

    model = build_model(args.model_config).to(device)
    eff_batch = args.batch_size * args.accum_iter * world_size
    probe, probe_val = start_probe(args, model, device, eff_batch)  # draws no random numbers
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256 * args.lr_scale
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
        result = train_one_epoch(train_model, loader, optimizer, scaler, device, epoch, args,
                                 log, lr, loss_fn, resumed, prepare, saves=model)
        loss, skipped = result.loss, result.skipped
        summary["skipped_images"] += skipped
        record = epoch_record(epoch, result, time.perf_counter() - start, prepare)
        stopping = stop_pending(args, epoch)  # then checkpoint-last alone on the way out
        if probe is not None and main and not stopping:
            record.update(probe_loss=probe.train_loss(),
                          probe_top1=probe.evaluate(probe_val, args.mask_ratio, args.seed,
                                                    args.batch_size))
        summary["epochs"].append(record)
        if main:
            log.write(**record)
            print(f"epoch {epoch}: loss {loss:.4f}"
                  + (f", online probe top-1 {record['probe_top1']:.1f}"
                     if "probe_top1" in record else "")
                  + (f", {skipped} unreadable images skipped" if skipped else "")
                  + ("; stopping: saving checkpoint-last only" if stopping else ""))
        save_epoch(args, model, optimizer, scaler, epoch, len(loader), stopping)  # work first
        if not main or stopping:
            continue
        if preview_imgs is not None:
            save_reconstruction_figure(model, preview_imgs,
                                       Path(args.output_dir) / f"reconstruction-{epoch:03d}.png",
                                       args.mask_ratio, preview_noise, title=f"epoch {epoch}")
    if main and summary["epochs"]:
        save_curves(Path(args.output_dir))
    return summary
