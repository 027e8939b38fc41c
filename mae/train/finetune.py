"""`mae finetune`: end-to-end fine-tuning of a pre-trained MAE encoder for classification, with
the recipe of facebookresearch/mae's main_finetune.py and FINETUNE.md: a timm ViT with a
global-pool head and fc_norm, layer-wise lr decay, drop path, RandAugment, random erasing,
mixup/cutmix with label smoothing, warmup + half-cycle cosine, AMP, DDP, top-1/top-5.

timm (which needs torchvision) provides what the official code takes from it: the ViT, Mixup,
create_transform/RandAugment/RandomErasing, the soft-target losses, the layer-decay groups.
It is an extra: `pip install -e ".[finetune]"`.
"""
from __future__ import annotations

import json
import time
from functools import partial

import torch
import torch.nn as nn

from ..checkpoints.files import CheckpointError, load_checkpoint, load_weights, model_weights
from ..data.gpu import GpuBatches, explicit_gpu_loader, jpeg_decoder, loader_for_size
from ..data.images import IMAGENET_MEAN, IMAGENET_STD
from ..data.shards import open_dataset
from ..models.image import MODEL_CONFIGS, model_config_of, resolve_config
from ..models.pos_embed import interpolate_pos_embed
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
from .recipe import announce, fill, finetune_recipe
from .tracking import closes_sinks

# Without --data-path (the built-in data set) or --model the run is the demo: the README's
# ViT-Tiny at 32x32 with 8x8 patches, minutes on a CPU. NOTE: measured on the built-in data (8
# epochs of 2048 images from the README's encoder), the ImageNet recipe's regularisation is too
# strong for so short a run: layer decay 0.75 -> 1.0 took top-1 from 48 to 64, and mixup 0.8 +
# cutmix 1.0 + RandAugment + erasing 0.25 cost 21 points; so the demo leaves them off.
# Otherwise main_finetune.py's defaults with FINETUNE.md's recipe.
DEMO_DEFAULTS = dict(model="vit_tiny_patch16", input_size=32, patch_size=8, epochs=15,
                     warmup_epochs=2, blr=5e-3, layer_decay=1.0, mixup=0.0, cutmix=0.0,
                     aa="none", reprob=0.0)
OFFICIAL_DEFAULTS = dict(model="vit_large_patch16", input_size=224, epochs=50, warmup_epochs=5,
                         blr=1e-3, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1",
                         reprob=0.25)
# FINETUNE.md: 0.65 for ViT-B, 0.75 for ViT-L/H (and main_finetune.py's default elsewhere),
# keyed on the encoder's (width, depth), however it was named or read from the checkpoint.
VIT_B = (MODEL_CONFIGS["mae_vit_base_patch16"]["encoder_dim"],
         MODEL_CONFIGS["mae_vit_base_patch16"]["encoder_layers"])
LAYER_DECAY = {VIT_B: 0.65}


def matching_torchvision(torch_version: str) -> str:
    """The torchvision release line built for a torch 2.x: 0.(minor + 15), as every release
    since torch 2.0 / torchvision 0.15 pairs them (2.11: 0.26 ... 2.14: 0.29)."""
    major, minor = (int(part) for part in torch_version.split(".")[:2])
    if major != 2:
        raise ValueError(f"no torchvision pairing known for torch {torch_version}")
    return f"0.{minor + 15}"


def require_timm():
    """timm, and through it torchvision, importable: else one `error:` line naming the fix."""
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"error: mae finetune needs timm and torchvision ({exc}); install the extra: "
            f"pip install -e \".[finetune]\" (with torch 2.14.1: pip install torch==2.14.1 "
            f"torchvision==0.29.1 first, so pip keeps your torch)"
        ) from exc
    except RuntimeError as exc:
        # a torchvision built for another torch: its C++ ops do not register, and importing it
        # fails with "operator torchvision::nms does not exist"
        if "torchvision::" not in str(exc):
            raise
        import torch

        want = matching_torchvision(torch.__version__)
        raise SystemExit(
            f"error: the installed torchvision does not match torch {torch.__version__} "
            f"({str(exc).splitlines()[0]}): install torchvision {want}.x, the release for "
            f"torch {torch.__version__.rsplit('.', 1)[0]} (pip install \"torchvision=={want}.*\")"
        ) from exc


def vit_config(name: str, **overrides) -> dict:
    """The encoder of a named MAE model (`vit_base_patch16` or `mae_vit_base_patch16`; Pixio's
    and CrossMAE's by their names)."""
    key = name if name in MODEL_CONFIGS else f"mae_{name}"
    if key not in MODEL_CONFIGS:
        names = sorted(k.removeprefix("mae_") for k in MODEL_CONFIGS)
        raise ValueError(f"--model must be one of {names}, got {name!r}")
    return encoder_of(resolve_config({**MODEL_CONFIGS[key], **overrides}))


def encoder_of(mae_config: dict) -> dict:
    encoder = {k: mae_config[k] for k in ("img_size", "patch_size", "in_chans", "encoder_dim",
                                          "encoder_layers", "encoder_heads", "mlp_ratio",
                                          "encoder_mlp_dim")}
    # Pixio's 8 cls tokens; an imported HF ViTMAE's LayerNorm eps (fine-tunings saved before
    # either key was there: the defaults)
    return {**encoder, "n_cls_tokens": mae_config.get("n_cls_tokens", 1),
            "norm_eps": mae_config.get("norm_eps", 1e-6)}


def build_vit(config: dict, num_classes: int, drop_path: float, global_pool: bool):
    """main_finetune.py's model: timm's VisionTransformer with the MAE encoder's parameter names
    (so pre-trained weights load by name), a global-average-pool head with fc_norm (or the cls
    token with the final norm), drop path, head initialised at std 2e-5."""
    from timm.models.vision_transformer import VisionTransformer

    img = config["img_size"]
    model = VisionTransformer(
        img_size=tuple(img) if isinstance(img, list) else img, patch_size=config["patch_size"],
        in_chans=config["in_chans"], num_classes=num_classes, embed_dim=config["encoder_dim"],
        depth=config["encoder_layers"], num_heads=config["encoder_heads"],
        # timm takes a ratio only; int(1408 * (6144 / 1408)) is 6144 again (ViT-g)
        mlp_ratio=(config.get("encoder_mlp_dim") or config["encoder_dim"] * config["mlp_ratio"])
        / config["encoder_dim"], qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=config.get("norm_eps", 1e-6)),
        drop_path_rate=drop_path,
        global_pool="avg" if global_pool else "token", fc_norm=global_pool,
        # Pixio's 8 cls tokens: timm's cls token and 7 register tokens, in that order
        **({"reg_tokens": extra} if (extra := config.get("n_cls_tokens", 1) - 1) else {}),
    )
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    return model


def load_pretrained(model, state: dict, path) -> dict:
    """Loads the encoder of a pre-training checkpoint's contents (ours, an official MAE one, or a
    .safetensors export) into `model`, resizing the positional embedding to its grid; the decoder
    is dropped. Returns what was not loaded, checked as the official code does."""
    weights = dict(model_weights(state))
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in weights and weights[key].shape != own[key].shape:
            del weights[key]  # another data set's classifier
    # the decoder's (CrossMAE's: dec_norms, wfm) are dropped
    weights = {k: v for k, v in weights.items()
               if not k.startswith(("decoder", "mask_token", "dec_norms", "wfm"))}
    split_cls_tokens(model, weights)
    interpolate_pos_embed(model, weights, keys=("pos_embed",))
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"--finetune {path}: its encoder does not fit --model "
                              f"(pass the --model it was pre-trained as): {exc}") from exc
    allowed_missing = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    if set(result.missing_keys) - allowed_missing:
        raise CheckpointError(f"--finetune {path}: no weights for "
                              f"{sorted(set(result.missing_keys) - allowed_missing)}")
    return {"missing": result.missing_keys, "unexpected": result.unexpected_keys}


def split_cls_tokens(model, weights: dict) -> None:
    """Pixio's cls tokens (1, P, D) as timm holds them: cls_token (1, 1, D) and reg_token
    (1, P - 1, D), the same order in the sequence and in pos_embed (in place)."""
    if getattr(model, "reg_token", None) is not None and "cls_token" in weights \
            and "reg_token" not in weights:
        weights["reg_token"] = weights["cls_token"][:, 1:]
        weights["cls_token"] = weights["cls_token"][:, :1]


class TransformedDataset(torch.utils.data.Dataset):
    """An image data set's PIL images (`load(index)`) through a torchvision/timm transform."""

    def __init__(self, base, transform):
        self.base = base
        self.transform = transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base.load(index)
        return None if img is None else (self.transform(img), label)


def train_transform(args):
    from timm.data import create_transform

    size = args.input_size if isinstance(args.input_size, int) else tuple(args.input_size)
    return create_transform(input_size=size, is_training=True, scale=tuple(args.scale),
                            ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
                            color_jitter=args.color_jitter,
                            auto_augment=None if args.aa in ("", "none") else args.aa,
                            interpolation=args.train_interpolation, re_prob=args.reprob,
                            re_mode=args.remode, re_count=args.recount, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD)


def apply_defaults(args, pretrained_config: dict | None) -> None:
    """Demo (no --data-path, no --model) or official defaults for unset flags; the
    architecture of our own pre-training checkpoints is read from them."""
    args.demo = args.data_path is None and args.model is None
    defaults = DEMO_DEFAULTS if args.demo else OFFICIAL_DEFAULTS
    if pretrained_config is not None:  # the checkpoint says what it is
        fill(args, {"input_size": pretrained_config["img_size"],
                    "patch_size": pretrained_config["patch_size"]}, "checkpoint")
        defaults = {k: v for k, v in defaults.items() if k != "model"}
    fill(args, defaults, "demo" if args.demo else "official")
    if args.model is not None:
        config = dict(vit_config(args.model))
        if pretrained_config is not None:  # an HF ViTMAE's LayerNorm eps comes with its weights
            config["norm_eps"] = pretrained_config.get("norm_eps", config["norm_eps"])
    else:
        config = encoder_of(pretrained_config)
    config = {**config, "img_size": args.input_size}
    if args.patch_size:
        config["patch_size"] = args.patch_size
    args.vit_config = encoder_of(resolve_config(config))
    if args.layer_decay is None:
        architecture = (args.vit_config["encoder_dim"], args.vit_config["encoder_layers"])
        fill(args, {"layer_decay": LAYER_DECAY.get(architecture, 0.75)}, "official")


@closes_sinks
def finetune(args) -> dict:
    require_timm()
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay

    pretrained, pretrained_config = None, None
    if args.finetune:
        pretrained = load_checkpoint(args.finetune, trust=args.unsafe_trust_checkpoint)
        saved = pretrained.get("args")
        if isinstance(saved, dict) and saved.get("vit_config"):  # one of our fine-tunings
            pretrained_config = saved["vit_config"]
        elif isinstance(saved, dict) and (saved.get("model_config")
                                          or saved.get("model") in MODEL_CONFIGS):
            pretrained_config = encoder_of(model_config_of(saved))
    apply_defaults(args, pretrained_config)
    loader_for_size(args, args.input_size)
    rank, world_size, device, log = start_run(args)
    main = rank == 0
    size = args.input_size
    # timm's training augmentation (RandAugment, erasing) runs in Pillow workers whatever
    # --data-loader; the gpu loader decodes and centre-crops the evaluation images
    train_base = open_dataset(args.data_path, size, "train", augment=True, seed=args.seed,
                              length=args.dataset_size)
    val_set = open_dataset(args.data_path, size, "val", augment=False, length=args.val_size,
                           loader=args.data_loader, ship_jpegs=jpeg_decoder(device) is not None)
    if isinstance(train_base, torch.utils.data.IterableDataset):  # tar shards
        train_set = train_base.with_image_transform(train_transform(args))
    else:
        train_set = TransformedDataset(train_base, train_transform(args))
    num_classes = args.nb_classes or len(train_base.classes)
    sampler, loader = make_loader(train_set, args, rank, world_size, device)
    val_loader = evaluation_loader(val_set, args, rank, world_size, device, GpuBatches(
        size, device, train=False, strict=explicit_gpu_loader(args))
        if args.data_loader == "gpu" else None)

    model = build_vit(args.vit_config, num_classes, args.drop_path, args.global_pool)
    if args.finetune and not args.resume and not args.random_init:
        loaded = load_pretrained(model, pretrained, args.finetune)
        if main:
            print(f"loaded the encoder of {args.finetune}; not in it: {loaded['missing']}")
    model.to(device)
    eff_batch = args.batch_size * args.accum_iter * world_size
    lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    groups = param_groups_layer_decay(model, args.weight_decay,
                                      no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    amp_dtype = AMP_DTYPES[args.amp]

    if args.eval:
        source = args.resume or args.finetune
        if not source:
            raise ValueError("--eval needs the fine-tuned weights: --resume CHECKPOINT")
        if args.resume:
            state, source = checkpoint_to_evaluate(args, main)
            load_weights(model, state, f"--resume {source}",
                         "the ViT of --model (pass the --model it was fine-tuned as)")
        stats = {"checkpoint": str(source), **evaluate(model, val_loader, device, amp_dtype)}
        if main:
            print(json.dumps(stats))
        return stats
    start_at = resume_from(args, model, optimizer, scaler, main, log)
    train_model = wrap_for_training(model, args, world_size, device)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                      cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    def loss_fn(m, imgs, labels):
        if mixup is not None:
            if imgs.shape[0] % 2:  # mixup pairs images; a batch that lost an unreadable one
                imgs, labels = imgs[:-1], labels[:-1]
            imgs, labels = mixup(imgs, labels)
        return criterion(m(imgs), labels)

    if main:
        print(f"fine-tuning {args.model or 'the checkpoint encoder'}: {args.input_size}px, patch "
              f"{args.vit_config['patch_size']}, {num_classes} classes, {len(train_set)} "
              f"images, effective batch {eff_batch}, lr {lr:.2e}, layer decay "
              f"{args.layer_decay}, {world_size} process(es) on {device.type}")
        announce("finetune", finetune_recipe(args, eff_batch, lr), log, args.output_dir)
    summary = {"epochs": []}
    for epoch in range(start_at.epoch, args.epochs):
        seed_epoch(args.seed, epoch, rank)
        resumed = enter_epoch(sampler, epoch, start_at, args)
        start = time.perf_counter()
        result = train_one_epoch(train_model, loader, optimizer, scaler, device, epoch, args,
                                 log, lr, loss_fn, resumed, saves=model)
        stopping = stop_pending(args, epoch)  # then checkpoint-last alone on the way out
        stats = {} if stopping else evaluate(model, val_loader, device, amp_dtype)
        record = epoch_record(epoch, result, time.perf_counter() - start,
                              **{f"val_{k}": v for k, v in stats.items()})
        summary["epochs"].append(record)
        if not main:
            continue
        log.write(**record)
        print(f"epoch {epoch}: loss {result.loss:.4f}, {evaluation_text(stats)}")
        save_epoch(args, model, optimizer, scaler, epoch, len(loader), stopping)
    summary.update(summary["epochs"][-1] if summary["epochs"] else {})
    summary["max_top1"] = max((r["val_top1"] for r in summary["epochs"] if "val_top1" in r),
                              default=None)
    return summary
