"""The `mae` command: pretrain, linprobe, visualize. Flags follow facebookresearch/mae's
main_pretrain.py / main_linprobe.py (both --data-path and --data_path spellings work)."""
from __future__ import annotations

import argparse
import sys

import torch


def _flag(parser, name: str, **kwargs):
    """--some-flag and --some_flag, as the official scripts spell them."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*names, **kwargs)


def _common(parser):
    _flag(parser, "device", default="cuda" if torch.cuda.is_available() else "cpu")
    _flag(parser, "seed", type=int, default=0)
    _flag(parser, "batch-size", type=int, default=64, help="per process")
    _flag(parser, "data-path", default=None,
          help="image folder (DIR/train/<class>/*); default: the built-in shapes data set")
    _flag(parser, "quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pre-train a Masked Autoencoder")
    _common(pre)
    _flag(pre, "model", default="mae_vit_tiny_patch16")
    _flag(pre, "input-size", type=int, default=32)
    _flag(pre, "patch-size", type=int, default=8,
          help="overrides the model's patch size (0: the model's own)")
    _flag(pre, "mask-ratio", type=float, default=0.75)
    _flag(pre, "norm-pix-loss", action="store_true")
    _flag(pre, "epochs", type=int, default=40)
    _flag(pre, "accum-iter", type=int, default=1)
    _flag(pre, "weight-decay", type=float, default=0.05)
    _flag(pre, "lr", type=float, default=None, help="absolute lr (default: blr * batch / 256)")
    _flag(pre, "blr", type=float, default=5e-3,
          help="base lr; the official ImageNet recipe uses 1.5e-4")
    _flag(pre, "min-lr", type=float, default=0.0)
    _flag(pre, "warmup-epochs", type=float, default=1)
    _flag(pre, "amp", choices=["bf16", "fp16", "none"], default="none")
    _flag(pre, "compile", action="store_true")
    _flag(pre, "no-kernels", action="store_true", help="run the reference ops instead")
    _flag(pre, "output-dir", default="./output_dir")
    _flag(pre, "resume", default="", help="a checkpoint, or 'auto' for the newest in --output-dir")
    _flag(pre, "save-every", type=int, default=1, help="epochs between checkpoints")
    _flag(pre, "log-every", type=int, default=20, help="steps between log lines")
    _flag(pre, "num-workers", type=int, default=2)
    _flag(pre, "dataset-size", type=int, default=None, help="built-in data set size")

    probe = sub.add_parser("linprobe", help="linear probing of a pre-trained encoder")
    _common(probe)
    _flag(probe, "checkpoint", required=True)
    probe.set_defaults(batch_size=256)
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "pretrain":
        from .pretrain import NonFiniteLossError, pretrain

        if args.resume == "":
            args.resume = None
        try:
            pretrain(args)
        except NonFiniteLossError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            from . import distributed

            distributed.shutdown()
    elif args.command == "linprobe":
        from .linprobe import linprobe

        linprobe(args)
    else:
        from .visualize import visualize

        visualize(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
