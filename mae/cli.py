"""The `mae` command: pretrain, finetune, linprobe, visualize, export, ablate, anomaly. Flags follow
facebookresearch/mae's main_pretrain.py / main_finetune.py / main_linprobe.py (both --data-path
and --data_path spellings work). Flags left unset get the built-in demo's settings when the run
is the demo (no --data-path, no --model), else the official recipe's."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import TRUST_FLAG, CheckpointError
from .models import DEFAULT_CONFIG, MASK_TYPES


def _flag(parser, name: str, **kwargs):
    """--some-flag and --some_flag, as the official scripts spell them."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*names, **kwargs)


def _common(parser):
    _flag(parser, "device", default="cuda" if torch.cuda.is_available() else "cpu")
    _flag(parser, "seed", type=int, default=0)
    _flag(parser, "data-path", default=None,
          help="image folder (DIR/train/<class>/*, DIR/val/<class>/*); default: the built-in "
               "shapes data set")
    _flag(parser, "quiet", action="store_true", help="no progress bar")
    _trust(parser)


def _trust(parser):
    parser.add_argument(TRUST_FLAG, dest="unsafe_trust_checkpoint", action="store_true",
                        help="load checkpoints with full pickle, which can run code from the "
                             "file: only for files whose source you trust")


def _training(parser, batch_size: int, blr, weight_decay: float, min_lr: float):
    """The flags every training command shares; None defaults are filled in by the command."""
    _flag(parser, "batch-size", type=int, default=batch_size, help="per process")
    _flag(parser, "epochs", type=int, default=None)
    _flag(parser, "accum-iter", type=int, default=1)
    _flag(parser, "input-size", type=int, default=None)
    _flag(parser, "patch-size", type=int, default=None,
          help="a patch size other than the model's own")
    _flag(parser, "weight-decay", type=float, default=weight_decay)
    _flag(parser, "lr", type=float, default=None, help="absolute lr (default: blr * batch / 256)")
    _flag(parser, "blr", type=float, default=blr, help="base lr")
    _flag(parser, "min-lr", type=float, default=min_lr)
    _flag(parser, "warmup-epochs", type=float, default=None)
    _flag(parser, "amp", choices=["bf16", "fp16", "none"], default="none")
    _flag(parser, "compile", action="store_true")
    _flag(parser, "output-dir", default="./output_dir")
    _flag(parser, "resume", default="", help="a checkpoint, or 'auto' for the run's newest")
    _flag(parser, "save-every", type=int, default=20,
          help="epochs between numbered checkpoints (checkpoint-last.pth is written every epoch)")
    _flag(parser, "log-every", type=int, default=20, help="steps between log lines")
    _flag(parser, "num-workers", type=int, default=2)
    _flag(parser, "dataset-size", type=int, default=None, help="built-in data set size")


def build_parser(config_defaults: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pre-train a Masked Autoencoder")
    _common(pre)
    _training(pre, batch_size=64, blr=None, weight_decay=0.05, min_lr=0.0)
    _flag(pre, "config", default=None,
          help="YAML or JSON file of flags and MAE config keys (e.g. encoder_dim); flags on "
               "the command line override it")
    _flag(pre, "model", default=None,
          help="demo: mae_vit_tiny_patch16 at 32px, patch 8; otherwise the official default "
               "mae_vit_large_patch16 at 224px (video: mae_videomae_{tiny,small,base}_patch16)")
    _flag(pre, "decoder-depth", type=int, default=None, help="a decoder depth other than the "
                                                             "model's")
    _flag(pre, "mask-ratio", type=float, default=None,
          help="default 0.75 (video: 0.9, VideoMAE's)")
    _flag(pre, "video", action="store_true",
          help="pre-train VideoMAE on clips (built-in: moving shapes; --data-path: folders "
               "of frames or video files) with tube masking")
    _flag(pre, "num-frames", type=int, default=None, help="video: frames per clip (default 16; "
                                                          "demo 8)")
    _flag(pre, "tubelet-size", type=int, default=None, help="video: frames per tubelet "
                                                            "(default 2)")
    _flag(pre, "sampling-rate", type=int, default=4, help="video: frames between sampled "
                                                          "frames")
    _flag(pre, "mask-type", choices=list(MASK_TYPES), default=None,
          help="mask sampling: random (official), block (BEiT-style rectangles) or grid (one "
               "patch of every 2x2 kept; needs --mask-ratio 0.75)")
    _flag(pre, "norm-pix-loss", action=argparse.BooleanOptionalAction, default=False)
    _flag(pre, "target", choices=["pixel", "norm_pix", "hog"], default=None,
          help="what the decoder predicts: pixels (norm_pix: --norm-pix-loss) or MaskFeat's "
               "HOG features (images; patch size a multiple of 8)")
    _flag(pre, "no-kernels", action="store_true", help="run the reference ops instead")
    pre.set_defaults(model_config=None, clip_grad=None)

    fine = sub.add_parser("finetune", help="fine-tune a pre-trained encoder (needs the "
                                           "[finetune] extra: timm)")
    _common(fine)
    _training(fine, batch_size=64, blr=None, weight_decay=0.05, min_lr=1e-6)
    _flag(fine, "model", default=None,
          help="vit_{tiny,small,base,large}_patch16 or vit_huge_patch14; default: the "
               "architecture saved in --finetune, else vit_large_patch16 (demo: vit_tiny)")
    _flag(fine, "finetune", default="", help="pre-trained checkpoint to start from "
                                            "(ours, official MAE, or .safetensors)")
    _flag(fine, "random-init", action="store_true",
          help="train the ViT of --finetune from random weights: the from-scratch baseline "
               "with the same architecture, recipe and budget")
    _flag(fine, "drop-path", type=float, default=0.1)
    _flag(fine, "clip-grad", type=float, default=None)
    _flag(fine, "layer-decay", type=float, default=None,
          help="layer-wise lr decay (default 0.65 for vit_base, else 0.75)")
    _flag(fine, "color-jitter", type=float, default=None)
    _flag(fine, "aa", default=None, help="RandAugment policy ('none': off)")
    _flag(fine, "smoothing", type=float, default=0.1)
    _flag(fine, "reprob", type=float, default=None, help="random erasing probability")
    _flag(fine, "remode", default="pixel")
    _flag(fine, "recount", type=int, default=1)
    _flag(fine, "mixup", type=float, default=None)
    _flag(fine, "cutmix", type=float, default=None)
    _flag(fine, "cutmix-minmax", type=float, nargs=2, default=None)
    _flag(fine, "mixup-prob", type=float, default=1.0)
    _flag(fine, "mixup-switch-prob", type=float, default=0.5)
    _flag(fine, "mixup-mode", choices=["batch", "pair", "elem"], default="batch")
    _flag(fine, "global-pool", action="store_true", default=True)
    fine.add_argument("--cls-token", "--cls_token", dest="global_pool", action="store_false",
                      help="classify from the cls token instead of the pooled patches")
    _flag(fine, "nb-classes", type=int, default=None, help="default: the data set's")
    _flag(fine, "eval", action="store_true", help="evaluate --resume's weights only")
    _flag(fine, "dist-eval", action="store_true",
          help="accepted for main_finetune.py command lines: evaluation is always split "
               "across the processes")
    _flag(fine, "val-size", type=int, default=None, help="built-in validation set size")

    probe = sub.add_parser("linprobe", help="linear probing of a pre-trained encoder")
    _common(probe)
    _flag(probe, "checkpoint", required=True)
    _flag(probe, "batch-size", type=int, default=256)
    _flag(probe, "epochs", type=int, default=90)
    _flag(probe, "blr", type=float, default=0.1)
    _flag(probe, "weight-decay", type=float, default=0.0)
    _flag(probe, "warmup-epochs", type=float, default=10)
    _flag(probe, "global-pool", action="store_true", help="mean-pooled patches, not cls token")
    _flag(probe, "random-init", action="store_true",
          help="probe a randomly initialised encoder of the same shape (a baseline)")
    _flag(probe, "train-size", type=int, default=None)
    _flag(probe, "val-size", type=int, default=None)

    vis = sub.add_parser("visualize", help="reconstruction figure for one image")
    _flag(vis, "checkpoint", required=True)
    _flag(vis, "image", required=True)
    vis.add_argument("-o", "--output", default="reconstruction.png")
    _flag(vis, "mask-ratio", type=float, default=0.75)
    _flag(vis, "seed", type=int, default=0)
    _trust(vis)

    export = sub.add_parser("export", help="write a checkpoint's weights as .safetensors")
    _flag(export, "checkpoint", required=True)
    export.add_argument("-o", "--output", required=True)
    _trust(export)

    ablate = sub.add_parser("ablate", help="the paper's ablation tables on the built-in data")
    _flag(ablate, "output-dir", default="runs/ablate")
    _flag(ablate, "mask-ratios", default="0.15,0.5,0.75,0.9")
    _flag(ablate, "decoder-depths", default="1,2,4")
    _flag(ablate, "mask-types", default="random,block,grid")
    _flag(ablate, "epochs", type=int, default=20)
    _flag(ablate, "dataset-size", type=int, default=2048)
    _flag(ablate, "probe-epochs", type=int, default=60)
    _flag(ablate, "probe-val-size", type=int, default=1000)
    _flag(ablate, "num-workers", type=int, default=1)
    _flag(ablate, "device", default="cuda" if torch.cuda.is_available() else "cpu")
    _flag(ablate, "quiet", action="store_true")

    anomaly = sub.add_parser("anomaly", help="anomaly maps from reconstruction error")
    _flag(anomaly, "checkpoint", required=True)
    _flag(anomaly, "image", default=None, help="one image: writes image / heat map / overlay")
    anomaly.add_argument("-o", "--output", default="anomaly.png")
    _flag(anomaly, "data-path", default=None, help="a folder of images: writes --csv")
    _flag(anomaly, "csv", default="anomaly.csv")
    _flag(anomaly, "synthetic", type=int, default=None,
          help="evaluate on N held-out built-in images, half with synthetic defects: image and "
               "pixel AUROC (needs scikit-learn)")
    _flag(anomaly, "coverage", type=int, default=4, help="times every patch is masked")
    _flag(anomaly, "mask-ratio", type=float, default=0.75)
    _flag(anomaly, "batch-size", type=int, default=50)
    _flag(anomaly, "seed", type=int, default=0)
    _flag(anomaly, "device", default="cuda" if torch.cuda.is_available() else "cpu")
    _trust(anomaly)

    for command, values in (config_defaults or {}).items():
        sub.choices[command].set_defaults(**values)
    parser.commands = sub.choices
    return parser


def read_config(path, parser: argparse.ArgumentParser, command: str) -> dict:
    """A --config file as parser defaults: flag names (dashes or underscores) set flags, MAE
    config keys (DEFAULT_CONFIG, e.g. encoder_dim) go to `model_config`. Parsed with
    yaml.safe_load / json, which build plain data only."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SystemExit(f"error: --config {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of keys to values")
    actions = {a.dest: a for a in parser.commands[command]._actions}
    defaults, model_config = {}, {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest == "img_size":
            dest = "input_size"
        if dest == "use_kernels":
            dest, value = "no_kernels", not value
        if dest in actions and dest not in ("help", "config", "model_config"):
            action = actions[dest]
            if action.type in (int, float) and value is not None:
                try:
                    value = action.type(value)
                except (TypeError, ValueError):
                    raise SystemExit(f"error: --config {path}: {key} must be a number, "
                                     f"got {value!r}") from None
            if action.choices is not None and value not in action.choices:
                raise SystemExit(f"error: --config {path}: {key} must be one of "
                                 f"{list(action.choices)}, got {value!r}")
            defaults[dest] = value
        elif dest in DEFAULT_CONFIG:
            model_config[dest] = value
        else:
            raise SystemExit(f"error: --config {path}: unknown key {key!r} (neither a "
                             f"`mae {command}` flag nor an MAE config key)")
    if model_config:
        defaults["model_config"] = model_config
    return defaults


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        defaults = read_config(args.config, parser, args.command)
        args = build_parser({args.command: defaults}).parse_args(argv)
    if getattr(args, "resume", None) == "":
        args.resume = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from .engine import NonFiniteLossError

    try:
        if args.command == "pretrain":
            from .pretrain import pretrain

            pretrain(args)
        elif args.command == "finetune":
            from .finetune import finetune

            finetune(args)
        elif args.command == "linprobe":
            from .linprobe import linprobe

            linprobe(args)
        elif args.command == "visualize":
            from .visualize import visualize

            visualize(args)
        elif args.command == "export":
            from .checkpoint import export_safetensors, load_checkpoint

            state = load_checkpoint(args.checkpoint, trust=args.unsafe_trust_checkpoint)
            print(f"wrote {export_safetensors(state, args.output)}")
        elif args.command == "anomaly":
            from .anomaly import anomaly

            anomaly(args)
        else:
            from .ablate import ablate

            ablate(args, parse_args)
    except (NonFiniteLossError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        from . import distributed

        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
