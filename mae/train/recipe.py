"""The recipe a training command runs, said out loud: printed once at the start and written to
the run's log (a `kind: "recipe"` record in log.jsonl, and OUTDIR/recipe.json), every value
with where it came from:

- `flag`: the command line; `config`: the --config file;
- `demo` / `official`: the command's defaults for the built-in demo, or for a user's data or
  model (the official scripts' recipe; see each command's DEMO_DEFAULTS / OFFICIAL_DEFAULTS);
- `default`: the flag's own default (the official script's, the same for demo and official);
- `checkpoint`: read from the checkpoint being fine-tuned; `derived`: computed from the others.

`mae.cli.parse_args` records the first three in `args.sources`; a command's apply_defaults
adds what it fills in (`fill`).
"""
from __future__ import annotations

import json
from pathlib import Path

SOURCES = ("flag", "config", "demo", "official", "default", "checkpoint", "derived")


def fill(args, defaults: dict, label: str) -> None:
    """Sets the flags left None to `defaults`, recording `label` as their source."""
    sources = args.__dict__.setdefault("sources", {})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            sources[key] = label


def source_of(args, key: str) -> str:
    """Where `key`'s value came from; a value the command filled without `fill` (pretrain's
    demo or official table) is attributed to the recipe the run is, one still None to the
    flag's default."""
    known = getattr(args, "sources", {}).get(key)
    if known is not None:
        return known
    if getattr(args, key, None) is None:
        return "default"
    return "demo" if getattr(args, "demo", False) else "official"


def _entry(args, key: str, value=None, source: str | None = None, note: str | None = None):
    entry = {"value": getattr(args, key) if value is None else value,
             "source": source or source_of(args, key)}
    if note:
        entry["note"] = note
    return entry


def _lr(args, eff_batch: int, lr: float) -> dict:
    if args.lr is not None:
        return _entry(args, "lr", lr)
    scale = getattr(args, "lr_scale", 1.0)  # CrossMAE's predict_ratio / mask_ratio
    return _entry(args, "lr", lr, "derived",
                  f"blr {args.blr:g} x effective batch {eff_batch} / 256"
                  + (f" x {scale:.4g} (CrossMAE: predict_ratio / mask_ratio)"
                     if scale != 1.0 else ""))


def _common(args, model: dict, input_size: dict, patch_size: dict, eff_batch: int,
            lr: float) -> dict:
    return {"model": model, "input_size": input_size, "patch_size": patch_size,
            "epochs": _entry(args, "epochs"),
            "warmup_epochs": _entry(args, "warmup_epochs"),
            "batch_size": _entry(args, "batch_size", note=f"effective {eff_batch}"),
            "blr": _entry(args, "blr", note=None if args.lr is None else "unused: --lr is set"),
            "lr": _lr(args, eff_batch, lr),
            "min_lr": _entry(args, "min_lr"),
            "weight_decay": _entry(args, "weight_decay"),
            **_data(args),
            "deterministic": _deterministic(args)}


def _deterministic(args) -> dict:
    on = getattr(args, "deterministic", False)
    return _entry(args, "deterministic", on, note="on: deterministic algorithms, "
                  "CUBLAS_WORKSPACE_CONFIG=:4096:8, cuDNN deterministic, no benchmark" if on else
                  "off: on CUDA some backward kernels accumulate in any order")


def _data(args) -> dict:
    """Who reads, decodes and augments the images, and how far ahead of the step."""
    from ..data.gpu import decoding_note

    if getattr(args, "data_loader", None) is None:
        return {}
    note = (decoding_note(args.device) if args.data_loader == "gpu" else
            f"Pillow decodes and augments in {args.num_workers} DataLoader workers")
    return {"data_loader": _entry(args, "data_loader", note=note),
            "prefetch": _entry(args, "prefetch", note="in the training thread" if
                               args.prefetch == 0 or args.num_workers == 0 else
                               "batches ready on the device ahead of the step")}


def _switch(args, key: str, on: bool) -> dict:
    return _entry(args, key, note="on" if on else "off")


def crop_and_flip(args) -> dict:
    """The random resized crop and flips (timm's / torchvision's names)."""
    return {"scale": _entry(args, "scale", list(args.scale)),
            "ratio": _entry(args, "ratio", [round(r, 4) for r in args.ratio]),
            "hflip": _switch(args, "hflip", args.hflip > 0)}


def pretrain_recipe(args, eff_batch: int, lr: float) -> dict:
    config = args.model_config
    model = (_entry(args, "model") if args.model else
             {"value": "custom (--config model keys)", "source": "config"})
    patch = (_entry(args, "patch_size") if args.patch_size else
             {"value": config["patch_size"], "source": "derived", "note": "the model's"})
    return {**_common(args, model, _entry(args, "input_size"), patch, eff_batch, lr),
            "mask_ratio": _entry(args, "mask_ratio"),
            "mask_type": _entry(args, "mask_type", config["mask_type"],
                                None if args.mask_type else "default"),
            "norm_pix_loss": _entry(args, "norm_pix_loss", config["norm_pix_loss"]),
            **decoder_side(args, config),
            "video": _entry(args, "video"),
            # data/images.py's pre-training augmentation, main_pretrain.py's (no flag sets it)
            "augmentation": {"value": "random resized crop (scale 0.2-1, bicubic) + hflip 0.5",
                             "source": "official"}}


def decoder_side(args, config: dict) -> dict:
    """The decoder and Pixio's options: the decoder always, the others where they differ from
    MAE's (CrossMAE's only with its decoder). A value the flag did not set is the model's."""
    from ..models.image import CROSS_KEYS, DEFAULT_CONFIG

    keys = ["decoder"] + [k for k in ("n_cls_tokens", "mask_grid", "pos_embed", "drop_path")
                          if config[k] != DEFAULT_CONFIG[k]]
    if config["decoder"] == "cross":
        keys += CROSS_KEYS
    entries = {}
    for key in keys:
        source = (source_of(args, key) if getattr(args, key, None) is not None else
                  "default" if config[key] == DEFAULT_CONFIG[key] else
                  "config" if args.model is None else "official")
        entries[key] = {"value": config[key], "source": source}
    if config["decoder"] == "cross" and config["predict_ratio"] is None:
        entries["predict_ratio"]["note"] = "every masked patch"
    return entries


def finetune_recipe(args, eff_batch: int, lr: float) -> dict:
    randaug = args.aa not in (None, "", "none")
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    jitter_off = ("off" if args.color_jitter in (None, 0) else
                  "off: timm skips colour jitter when RandAugment is on" if randaug else "on")
    vit = args.vit_config
    model = (_entry(args, "model") if args.model else
             {"value": f"{vit['encoder_layers']} blocks x {vit['encoder_dim']}",
              "source": "checkpoint"})
    patch = _entry(args, "patch_size", args.vit_config["patch_size"],
                   None if args.patch_size else "checkpoint")
    return {**_common(args, model, _entry(args, "input_size"), patch, eff_batch, lr),
            "layer_decay": _entry(args, "layer_decay"),
            "drop_path": _switch(args, "drop_path", args.drop_path > 0),
            "global_pool": _entry(args, "global_pool"),
            **crop_and_flip(args),
            "vflip": _switch(args, "vflip", args.vflip > 0),
            "train_interpolation": _entry(args, "train_interpolation"),
            "color_jitter": _entry(args, "color_jitter", note=jitter_off),
            "aa": _switch(args, "aa", randaug),
            "reprob": _switch(args, "reprob", args.reprob > 0),
            "mixup": _switch(args, "mixup", args.mixup > 0),
            "cutmix": _switch(args, "cutmix", args.cutmix > 0 or args.cutmix_minmax is not None),
            "smoothing": _entry(args, "smoothing",
                                note="off" if args.smoothing == 0 else
                                "in mixup's soft targets" if mixing else "on")}


def linprobe_recipe(args, config: dict, size_source: str, optimizer: str, lr: float,
                    eff_batch: int | None = None) -> dict:
    """`config`: the probed encoder's MAE config (saved in the checkpoint, or --model's at
    main_linprobe.py's 224px: `size_source` says which); `eff_batch` by default one process's."""
    model = (_entry(args, "model") if args.model else
             {"value": f"{config['encoder_layers']} blocks x {config['encoder_dim']}",
              "source": "checkpoint"})
    img = config["img_size"]
    recipe = {**_common(args, model, {"value": img, "source": size_source},
                        {"value": config["patch_size"], "source": size_source},
                        eff_batch or args.batch_size * args.accum_iter, lr),
              "optimizer": {"value": optimizer, "source": "demo" if args.demo else "official"},
              "global_pool": _entry(args, "global_pool"),
              "random_init": _entry(args, "random_init")}
    if args.demo:  # features are extracted once, from the images as they are
        recipe["augmentation"] = {"value": "none (the demo probes features of the "
                                           "un-augmented images, extracted once)",
                                  "source": "demo"}
    else:
        recipe.update(crop_and_flip(args))
    return recipe


def _text(entry: dict) -> str:
    value = entry["value"]
    shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
        if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)
    return shown + (f" ({entry['note']})" if entry.get("note") else "")


def announce(command: str, recipe: dict, log=None, output_dir=None) -> dict:
    """Prints the recipe once and writes it to the log and OUTDIR/recipe.json (where given)."""
    width = max(map(len, recipe))
    print(f"recipe of mae {command} (sources: {', '.join(SOURCES)}):")
    for key, entry in recipe.items():
        print(f"  {key:<{width}}  {_text(entry):<44} [{entry['source']}]")
    if log is not None:
        log.write(kind="recipe", command=command, recipe=recipe)
    if output_dir is not None:
        path = Path(output_dir) / "recipe.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": command, "recipe": recipe}, indent=1) + "\n")
    return recipe
