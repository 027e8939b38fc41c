"""The `mae` command: pretrain, finetune, linprobe, visualize, export, ablate, anomaly. Flags follow
facebookresearch/mae's main_pretrain.py / main_finetune.py / main_linprobe.py (both --data-path
and --data_path spellings work). Flags left unset get the built-in demo's settings when the run
is the demo (no --data-path, no --model), else the official recipe's.

Every flag and --config value is checked before anything runs or is written, with one `error:`
line naming the flag or key. Exit codes: 2 for a value wrong by itself (argparse's convention:
its own errors, our `type=` checks, --config flag values), 1 for what the model or command
refuses (an MAE config key, a --mask-ratio that keeps no patch of the model) or a run that
fails (missing data, an unreadable checkpoint, a non-finite loss). A training run stopped by
SIGTERM or SIGUSR1 saves its step and exits 0, by SIGINT 130 (`mae.train.preemption`)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch

import mae_kernels

from .checkpoints.files import TRUST_FLAG, CheckpointError
from .data.prefetch import DEFAULT_DEPTH
from .models.image import DECODERS, DEFAULT_CONFIG, MASK_TYPES, POS_EMBEDS


class UsageError(SystemExit):
    """A bad flag or config value: `main` prints it as one `error:` line and returns 2."""


def _checked(kind, test, rule: str):
    """An argparse `type=` that also checks config-file values: strings parse as on the command
    line; other values must already be of the kind (a bool is not a number, 32.7 not an int)."""
    def parse(value):
        if isinstance(value, str):
            try:
                number = kind(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {rule}, got {value!r}") from None
        elif isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value!r}")
        else:
            number = kind(value)
        if not math.isfinite(number) or not test(number):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value!r}")
        return number

    parse.__name__ = rule
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "a number > 0")
non_negative_float = _checked(float, lambda v: v >= 0, "a number >= 0")
probability = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
crop_scale = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
below_one = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
share = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
# 0 masks nothing (the loss is 0/0), 1 keeps nothing; the token count is checked per model.
mask_ratio = _checked(float, lambda v: 0 < v < 1,
                      "in (0, 1): a ratio that masks at least one token and keeps one")


def device(text) -> str:
    """--device: cpu, cuda, cuda:N (a GPU that is there) or mps (where available)."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda, cuda:N or "
                                         f"mps") from None
    if parsed.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise argparse.ArgumentTypeError(f"{text!r}: this torch is a CPU-only build "
                                             f"(torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is visible")
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: only {count} GPU(s) are visible")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: mae runs on cpu, cuda or mps")
    return text


def output_dir(text) -> str:
    """--output-dir: a folder, or one that can be made (nothing on its path is a file); made
    only when the run starts writing."""
    if not isinstance(text, str):
        raise argparse.ArgumentTypeError(f"must be a path, got {text!r}")
    path = Path(text)
    existing = next(p for p in (path, *path.parents, Path.cwd()) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, a file"
        raise argparse.ArgumentTypeError(f"{text!r} {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: {existing} is not writable")
    return text


def default_threads(num_workers: int) -> int:
    """torch's intra-op threads when --threads is not given: OMP_NUM_THREADS where set (torchrun
    sets it), else this process's share of the cores less its DataLoader workers, at least 1."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]):
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, per_process - num_workers)


def _threads(parser):
    # NOTE: measured on a shared 2-core machine, the demo's pre-training (768 images, batch 64,
    # 2 DataLoader workers): 1 torch thread ran 54 and 62 images/s (25 and 28 s), 2 threads
    # 24 images/s (46 s) and once over 120 s; hence the cores less the workers by default.
    _flag(parser, "threads", type=positive_int, default=None,
          help="torch's intra-op threads (default: OMP_NUM_THREADS if set, else the cores "
               "less --num-workers, at least 1)")


def _flag(parser, name: str, **kwargs):
    """--some-flag and --some_flag, as the official scripts spell them."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    parser.add_argument(*names, **kwargs)


def _device(parser):
    _flag(parser, "device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")


def _common(parser):
    _device(parser)
    _threads(parser)
    _flag(parser, "seed", type=non_negative_int, default=0)
    _flag(parser, "data-path", default=None,
          help="image folder (DIR/train/<class>/*, DIR/val/<class>/*); default: the built-in "
               "shapes data set; or WebDataset tar shards: 'train-{000000..000127}.tar', a "
               "'::' list, or the folder `mae shards` wrote")
    _flag(parser, "data-loader", choices=["pil", "gpu"], default=None,
          help="pil: Pillow decodes and augments in the DataLoader workers; gpu: the workers "
               "read files, the run's device decodes the JPEGs (nvJPEG through torchcodec or "
               "torchvision) and crops every image (the fused resized_crop op). Default: gpu "
               "on CUDA with torchcodec or torchvision, else pil")
    _flag(parser, "prefetch", type=non_negative_int, default=DEFAULT_DEPTH,
          help=f"batches a loader thread makes ready on the device ahead of the step "
               f"(default {DEFAULT_DEPTH}; 0: each in the training thread when the step asks; "
               f"--num-workers 0 implies 0). A high data_wait_ms in the log says the step "
               f"waits for data")
    _flag(parser, "quiet", action="store_true", help="no progress bar")
    _trust(parser)


def _trust(parser):
    parser.add_argument(TRUST_FLAG, dest="unsafe_trust_checkpoint", action="store_true",
                        help="load checkpoints with full pickle, which can run code from the "
                             "file: only for files whose source you trust")


# timm's interpolation names (timm.data.transforms: str_to_interp_mode, and 'random')
INTERPOLATIONS = ["bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random"]


def _augmentation(parser):
    """The random resized crop and flip every image-classification recipe draws, under timm's
    names (create_transform's scale / ratio / hflip, train.py's --scale / --ratio / --hflip);
    the defaults are torchvision's and main_finetune.py's / main_linprobe.py's."""
    _flag(parser, "scale", type=crop_scale, nargs=2, default=[0.08, 1.0], metavar=("LOW", "HIGH"),
          help="random resized crop: the range of the crop's area fraction (timm's scale; "
               "default 0.08 1). Small images: 0.5 1 or 0.8 1")
    _flag(parser, "ratio", type=positive_float, nargs=2, default=[3 / 4, 4 / 3],
          metavar=("LOW", "HIGH"), help="random resized crop: the range of the crop's aspect "
                                        "ratio (timm's ratio; default 3/4 4/3)")
    _flag(parser, "hflip", type=probability, default=0.5,
          help="horizontal flip probability (timm's hflip; default 0.5). 0 for images whose "
               "mirror image is another thing (characters, digits, text)")


def _training(parser, batch_size: int, blr, weight_decay: float, min_lr: float):
    """The flags every training command shares; None defaults are filled in by the command."""
    _flag(parser, "batch-size", type=positive_int, default=batch_size, help="per process")
    _flag(parser, "epochs", type=positive_int, default=None)
    _flag(parser, "accum-iter", type=positive_int, default=1)
    _flag(parser, "input-size", type=positive_int, default=None)
    _flag(parser, "patch-size", type=positive_int, default=None,
          help="a patch size other than the model's own")
    _flag(parser, "weight-decay", type=non_negative_float, default=weight_decay)
    _flag(parser, "lr", type=positive_float, default=None,
          help="absolute lr (default: blr * batch / 256)")
    _flag(parser, "blr", type=positive_float, default=blr, help="base lr")
    _flag(parser, "min-lr", type=non_negative_float, default=min_lr)
    _flag(parser, "warmup-epochs", type=non_negative_float, default=None)
    _flag(parser, "amp", choices=["bf16", "fp16", "none"], default="none")
    _flag(parser, "compile", action="store_true")
    _run(parser)
    _flag(parser, "num-workers", type=non_negative_int, default=2)
    _flag(parser, "dataset-size", type=positive_int, default=None, help="built-in data set size")


def _run(parser):
    """Where a training run writes, how it resumes, stops and logs."""
    _flag(parser, "output-dir", type=output_dir, default="./output_dir")
    _flag(parser, "resume", default="", help="a checkpoint, or 'auto' for the run's newest")
    _flag(parser, "requeue", action="store_true",
          help="in a SLURM job: after a stop by SIGUSR1 (sbatch --signal=USR1@SECONDS, the "
               "time-limit warning), `scontrol requeue` the job, which continues with --resume "
               "auto (SIGTERM, from scancel or a preemption, is not requeued)")
    _flag(parser, "save-every", type=positive_int, default=20,
          help="epochs between numbered checkpoints (checkpoint-last.pth is written every epoch)")
    _flag(parser, "deterministic", action="store_true",
          help="the same bits on GPUs too: PyTorch's deterministic algorithms (an op without "
               "one is an error), CUBLAS_WORKSPACE_CONFIG=:4096:8, cuDNN deterministic, no "
               "benchmark (the CPU is deterministic without it)")
    _flag(parser, "log-every", type=positive_int, default=20, help="steps between log lines")
    _flag(parser, "log-dir", type=output_dir, default=None,
          help="also write TensorBoard event files here (train_loss, lr, images_per_sec at "
               "epoch_1000x, as main_pretrain.py; needs tensorboard)")
    _flag(parser, "wandb", default=None, metavar="PROJECT",
          help="also log to this Weights & Biases project (offline without an API key; "
               "needs wandb)")


def _decoder_side(pre):
    """Pixio's and CrossMAE's options (docs/decoders.md); unset, the model's own."""
    _flag(pre, "decoder", choices=list(DECODERS), default=None,
          help="mae: self-attention over every token (MAE, Pixio); cross: CrossMAE's decoder, "
               "queries of the predicted patches cross-attending to the encoder")
    pre.add_argument("--cross-mae", "--cross_mae", dest="decoder", action="store_const",
                     const="cross", help="CrossMAE's spelling of --decoder cross")
    pre.add_argument("--predict-ratio", "--predict_ratio", "--kept-mask-ratio",
                     "--kept_mask_ratio", dest="predict_ratio", type=share, default=None,
                     help="--decoder cross: the share of all patches predicted, at most "
                          "--mask-ratio (CrossMAE's kept_mask_ratio; default: every masked "
                          "patch, or the named model's)")
    for name, what in (("weight-fm", "each decoder block reads its own weighted mixture of "
                                     "the encoder blocks' features"),
                       ("use-input", "the encoder's input is one of the mixed features"),
                       ("self-attn", "a self-attention layer in each decoder block")):
        _flag(pre, name, action=argparse.BooleanOptionalAction, default=None,
              help=f"--decoder cross (CrossMAE): {what}")
    _flag(pre, "no-lr-scale", action="store_true",
          help="--decoder cross: lr = blr * batch / 256, without CrossMAE's factor "
               "predict_ratio / mask_ratio")
    _flag(pre, "mask-grid", type=positive_int, default=None,
          help="mask units of N x N patches (Pixio: 4); N divides both sides of the grid")
    _flag(pre, "n-cls-tokens", type=positive_int, default=None, help="cls tokens (Pixio: 8)")
    _flag(pre, "pos-embed", choices=list(POS_EMBEDS), default=None,
          help="sincos: MAE's fixed tables; learned: Pixio's")
    _flag(pre, "drop-path", type=below_one, default=None,
          help="the encoder's stochastic depth, linear over the blocks up to it (Pixio: 0.4)")


def build_parser(config_defaults: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"mae-kernels {mae_kernels.__version__}")
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
    _flag(pre, "decoder-depth", type=non_negative_int, default=None,
          help="a decoder depth other than the model's (0: no decoder blocks, as the official "
               "code builds it)")
    _flag(pre, "mask-ratio", type=mask_ratio, default=None,
          help="default 0.75 (video: 0.9, VideoMAE's)")
    _flag(pre, "video", action="store_true",
          help="pre-train VideoMAE on clips (built-in: moving shapes; --data-path: folders "
               "of frames or video files) with tube masking")
    _flag(pre, "num-frames", type=positive_int, default=None,
          help="video: frames per clip (default 16; demo 8)")
    _flag(pre, "tubelet-size", type=positive_int, default=None,
          help="video: frames per tubelet (default 2)")
    _flag(pre, "sampling-rate", type=positive_int, default=4,
          help="video: frames between sampled frames")
    _flag(pre, "mask-type", choices=list(MASK_TYPES), default=None,
          help="mask sampling: random (official), block (BEiT-style rectangles) or grid (one "
               "patch of every 2x2 kept; needs --mask-ratio 0.75)")
    _flag(pre, "norm-pix-loss", action=argparse.BooleanOptionalAction, default=False)
    _flag(pre, "target", choices=["pixel", "norm_pix", "hog"], default=None,
          help="what the decoder predicts: pixels (norm_pix: --norm-pix-loss) or MaskFeat's "
               "HOG features (images; patch size a multiple of 8)")
    _flag(pre, "no-kernels", action="store_true", help="run the reference ops instead")
    _decoder_side(pre)
    _flag(pre, "fsdp", action="store_true",
          help="FSDP2: shard parameters, gradients and AdamW states over the processes "
               "(every block and the root; bf16 parameters, fp32 reduction under --amp bf16); "
               "checkpoints become sharded checkpoint-N/ folders. One process: a group of one "
               "(nothing sharded, same checkpoints)")
    _flag(pre, "grad-checkpointing", action="store_true",
          help="activation checkpointing: every block keeps its input only and recomputes "
               "the rest in the backward pass")
    _flag(pre, "online-probe", action="store_true",
          help="train a linear probe (BatchNorm + linear) beside the MAE on each step's "
               "detached encoder features (the mean of the kept tokens) and score it on the "
               "val split each epoch; needs labelled data (the built-in set, class folders)")
    _flag(pre, "probe-optimizer", choices=["adamw", "lars"], default="adamw",
          help="the online probe's optimizer (lars: main_linprobe.py's)")
    _flag(pre, "probe-lr", type=positive_float, default=None,
          help="the online probe's lr (default: AdamW 1e-3; LARS 0.1 * batch / 256)")
    _flag(pre, "probe-val-size", type=positive_int, default=None,
          help="built-in val images the online probe is scored on (default 1024)")
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
    _flag(fine, "config", default=None,
          help="YAML or JSON file of flags (e.g. scale: [0.5, 1.0], hflip: 0); flags on the "
               "command line override it")
    _flag(fine, "drop-path", type=below_one, default=0.1)
    _flag(fine, "clip-grad", type=positive_float, default=None)
    _flag(fine, "layer-decay", type=positive_float, default=None,
          help="layer-wise lr decay (default 0.65 for a ViT-B encoder, else 0.75; keyed on "
               "the architecture, named or read from --finetune)")
    _augmentation(fine)
    _flag(fine, "train-interpolation", choices=INTERPOLATIONS, default="bicubic",
          help="the training crop's resampling (timm's name; default bicubic, "
               "main_finetune.py's; random: bilinear or bicubic per image)")
    _flag(fine, "vflip", type=probability, default=0.0,
          help="vertical flip probability (timm's vflip)")
    _flag(fine, "color-jitter", type=non_negative_float, default=None,
          help="colour jitter strength (timm's color_jitter; default off, main_finetune.py's; "
               "timm skips it when RandAugment is on)")
    _flag(fine, "aa", default=None, help="RandAugment policy ('none': off)")
    _flag(fine, "smoothing", type=below_one, default=0.1)
    _flag(fine, "reprob", type=probability, default=None, help="random erasing probability")
    _flag(fine, "remode", default="pixel")
    _flag(fine, "recount", type=positive_int, default=1)
    _flag(fine, "mixup", type=non_negative_float, default=None)
    _flag(fine, "cutmix", type=non_negative_float, default=None)
    _flag(fine, "cutmix-minmax", type=probability, nargs=2, default=None)
    _flag(fine, "mixup-prob", type=probability, default=1.0)
    _flag(fine, "mixup-switch-prob", type=probability, default=0.5)
    _flag(fine, "mixup-mode", choices=["batch", "pair", "elem"], default="batch")
    _flag(fine, "global-pool", action="store_true", default=True)
    fine.add_argument("--cls-token", "--cls_token", dest="global_pool", action="store_false",
                      help="classify from the cls token instead of the pooled patches")
    _flag(fine, "nb-classes", type=positive_int, default=None, help="default: the data set's")
    _flag(fine, "eval", action="store_true", help="evaluate --resume's weights only")
    _flag(fine, "dist-eval", action="store_true",
          help="accepted for main_finetune.py command lines: evaluation is always split "
               "across the processes")
    _flag(fine, "val-size", type=positive_int, default=None, help="built-in validation set size")

    probe = sub.add_parser("linprobe", help="linear probing of a pre-trained encoder")
    _common(probe)
    probe.add_argument("--finetune", "--checkpoint", dest="checkpoint", required=True,
                       help="pre-trained checkpoint (ours, official MAE, or .safetensors)")
    _flag(probe, "model", default=None,
          help="vit_{tiny,small,base,large}_patch16 or vit_huge_patch14, for checkpoints that "
               "do not say (official ones); ours are read as saved")
    _flag(probe, "batch-size", type=positive_int, default=None,
          help="per process (default 512, main_linprobe.py's; demo 256)")
    _flag(probe, "accum-iter", type=positive_int, default=1)
    _flag(probe, "epochs", type=positive_int, default=90)
    _flag(probe, "lr", type=positive_float, default=None,
          help="absolute lr (default: blr * batch * accum-iter / 256)")
    _flag(probe, "blr", type=positive_float, default=0.1)
    _flag(probe, "min-lr", type=non_negative_float, default=0.0)
    _flag(probe, "weight-decay", type=non_negative_float, default=0.0)
    _flag(probe, "warmup-epochs", type=non_negative_float, default=10)
    _flag(probe, "global-pool", action="store_true", default=False,
          help="mean-pooled patches, not the cls token (the official default)")
    probe.add_argument("--cls-token", "--cls_token", dest="global_pool", action="store_false",
                       help="classify from the cls token (the default)")
    _flag(probe, "nb-classes", type=positive_int, default=None, help="default: the data set's")
    _flag(probe, "num-workers", type=non_negative_int, default=2)
    _flag(probe, "amp", choices=["bf16", "fp16", "none"], default="none",
          help="autocast of the encoder and head (official recipe)")
    _run(probe)  # the official recipe; the demo runs in a minute and writes nothing
    _flag(probe, "eval", action="store_true", help="evaluate --resume's probe only")
    _flag(probe, "dist-eval", action="store_true",
          help="accepted for main_linprobe.py command lines: evaluation is always split "
               "across the processes")
    _flag(probe, "random-init", action="store_true",
          help="probe a randomly initialised encoder of the same shape (a baseline)")
    _augmentation(probe)  # main_linprobe.py's crop and flip (not the demo: no augmentation)
    _flag(probe, "config", default=None,
          help="YAML or JSON file of flags; flags on the command line override it")
    _flag(probe, "train-size", type=positive_int, default=None)
    _flag(probe, "val-size", type=positive_int, default=None)
    probe.set_defaults(clip_grad=None, compile=False)

    vis = sub.add_parser("visualize", help="reconstruction figure for one image")
    _flag(vis, "checkpoint", required=True)
    _flag(vis, "image", required=True)
    vis.add_argument("-o", "--output", default="reconstruction.png")
    _flag(vis, "mask-ratio", type=mask_ratio, default=0.75)
    _flag(vis, "seed", type=non_negative_int, default=0)
    _trust(vis)

    export = sub.add_parser("export", help="write a checkpoint's weights as .safetensors, a "
                                           "Hugging Face ViTMAE directory or a timm encoder")
    _flag(export, "checkpoint", required=True)
    export.add_argument("-o", "--output", required=True,
                        help="a .safetensors file (safetensors, timm) or a directory (hf)")
    _flag(export, "format", choices=["safetensors", "hf", "timm"], default="safetensors",
          help="safetensors: our weights and args; hf: ViTMAEForPreTraining.from_pretrained's "
               "directory; timm: the encoder for timm's matching vit_* (strict=True)")
    _trust(export)

    plot = sub.add_parser("plot", help="draw a run's loss, lr and probe accuracy from its "
                                       "log.jsonl into RUN_DIR/curves.png")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run's --output-dir")
    plot.add_argument("-o", "--output", default=None, help="default: RUN_DIR/curves.png")

    ablate = sub.add_parser("ablate", help="the paper's ablation tables on the built-in data")
    _flag(ablate, "output-dir", type=output_dir, default="runs/ablate")
    _flag(ablate, "mask-ratios", default="0.15,0.5,0.75,0.9")
    _flag(ablate, "decoder-depths", default="1,2,4")
    _flag(ablate, "mask-types", default="random,block,grid")
    _flag(ablate, "epochs", type=positive_int, default=20)
    _flag(ablate, "dataset-size", type=positive_int, default=2048)
    _flag(ablate, "probe-epochs", type=positive_int, default=60)
    _flag(ablate, "probe-val-size", type=positive_int, default=1000)
    _flag(ablate, "num-workers", type=non_negative_int, default=1)
    _device(ablate)
    _threads(ablate)
    _flag(ablate, "quiet", action="store_true")

    anomaly = sub.add_parser("anomaly", help="anomaly maps from reconstruction error")
    _flag(anomaly, "checkpoint", required=True)
    _flag(anomaly, "image", default=None, help="one image: writes image / heat map / overlay")
    anomaly.add_argument("-o", "--output", default="anomaly.png")
    _flag(anomaly, "data-path", default=None, help="a folder of images: writes --csv")
    _flag(anomaly, "csv", default="anomaly.csv")
    _flag(anomaly, "synthetic", type=positive_int, default=None,
          help="evaluate on N held-out built-in images, half with synthetic defects: image and "
               "pixel AUROC (needs scikit-learn)")
    _flag(anomaly, "coverage", type=positive_int, default=4, help="times every patch is masked")
    _flag(anomaly, "mask-ratio", type=mask_ratio, default=0.75)
    _flag(anomaly, "batch-size", type=positive_int, default=50)
    _flag(anomaly, "seed", type=non_negative_int, default=0)
    _device(anomaly)
    _threads(anomaly)
    _trust(anomaly)

    shards = sub.add_parser("shards", help="write WebDataset tar shards of an image folder")
    shards.add_argument("source", metavar="DIR", help="DIR/train/<class>/*, DIR/val/<class>/* "
                                                       "(or DIR/<class>/*: the train split)")
    shards.add_argument("out", metavar="OUT", help="writes OUT/<split>-000000.tar ... and "
                                                    "OUT/<split>-index.json")
    _flag(shards, "shard-size", type=positive_int, default=1000, help="samples per shard")
    _flag(shards, "seed", type=non_negative_int, default=0,
          help="seeds the one shuffle of the samples (so each shard mixes the classes)")

    for command, values in (config_defaults or {}).items():
        sub.choices[command].set_defaults(**values)
    parser.commands = sub.choices
    return parser


def config_value(action: argparse.Action, key: str, value):
    """A --config value for a flag, checked as strictly as the command line checks it: through
    the flag's own `type=`, a real bool for switches, one of its choices."""
    def bad(rule: str):
        return UsageError(f"--config: {key} must be {rule}, got {value!r}")

    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if value is None:  # null: "unset", where the flag has an unset default (None or "")
        if action.default not in (None, ""):
            raise UsageError(f"--config: {key} must be a value, not null")
        return action.default
    values = value if action.nargs is not None else [value]
    if action.nargs is not None and (not isinstance(value, list) or len(value) != action.nargs):
        raise bad(f"a list of {action.nargs}")
    checked = []
    for item in values:
        if action.type is None and not isinstance(item, str):
            raise bad("a string")
        if action.type is not None:
            try:
                item = action.type(item)
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"--config: {key} {exc}") from None
        if action.choices is not None and item not in action.choices:
            raise bad(f"one of {list(action.choices)}")
        checked.append(item)
    return checked if action.nargs is not None else checked[0]


def _number(text: str):
    """`text` as a float where it is one, else as it was (the model then names the key)."""
    try:
        return float(text)
    except ValueError:
        return text


def read_config(path, parser: argparse.ArgumentParser, command: str) -> dict:
    """A --config file as parser defaults: flag names (dashes or underscores) set flags, MAE
    config keys (DEFAULT_CONFIG, e.g. encoder_dim) go to `model_config`, checked by the model.
    Parsed with yaml.safe_load / json, which build plain data only."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"--config {path}: {exc}") from exc
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of keys to values")
    actions = {a.dest: a for a in parser.commands[command]._actions}
    defaults, model_config = {}, {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest == "img_size":
            dest = "input_size"
        if dest == "use_kernels":
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: use_kernels must be true or false, got "
                                 f"{value!r}")
            dest, value = "no_kernels", not value
        if dest in actions and dest not in ("help", "config", "model_config"):
            try:
                defaults[dest] = config_value(actions[dest], key, value)
            except UsageError as exc:
                raise UsageError(str(exc).replace("--config:", f"--config {path}:", 1)) from None
        elif dest in DEFAULT_CONFIG and command == "pretrain":
            if isinstance(DEFAULT_CONFIG[dest], float) and isinstance(value, str):
                value = _number(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
            model_config[dest] = value
        elif command == "pretrain":
            raise UsageError(f"--config {path}: unknown key {key!r} (neither a "
                             f"`mae {command}` flag nor an MAE config key)")
        else:  # the encoder's shape comes from its checkpoint
            raise UsageError(f"--config {path}: unknown key {key!r} (not a `mae {command}` "
                             f"flag)")
    if model_config:
        defaults["model_config"] = model_config
    return defaults


def check_mask_ratio(args) -> None:
    """`mae pretrain`'s model as the run will build it (on a copy of the arguments): its config
    keys are valid and --mask-ratio masks at least one token and keeps one (ValueError)."""
    from mae_kernels.masking import keep_count, predicted_count, tube_keep_count

    from .models.image import is_video
    from .train.pretrain import apply_defaults

    resolved = copy.copy(args)
    apply_defaults(resolved)
    config = resolved.model_config
    grid = [side // config["patch_size"] for side in
            (config["img_size"] if isinstance(config["img_size"], list)
             else [config["img_size"]] * 2)]
    # Pixio's masking draws units of mask_grid x mask_grid patches (1 for video)
    g = config["mask_grid"]
    per_frame = grid[0] * grid[1] // g**2
    ratio = resolved.mask_ratio
    video = is_video(config)
    tokens = f"{per_frame} " + (f"units of {g}x{g} patches" if g > 1 else "patches") \
        + (" per frame" if video else "")
    try:  # the count the model's masking op will use
        kept = (tube_keep_count if video else keep_count)(per_frame, ratio)
        if config["decoder"] == "cross" and config["predict_ratio"] is not None:
            predicted_count(per_frame, ratio, config["predict_ratio"], kept)
    except ValueError as exc:
        raise ValueError(f"--mask-ratio: {exc}" + (f" (of {tokens})" if g > 1 else "")) \
            from None
    masked = per_frame - kept
    if masked < 1:
        raise ValueError(f"--mask-ratio {ratio} masks {masked} and keeps {kept} of {tokens}: "
                         f"it must mask at least one and keep at least one")


def validate(args) -> None:
    """The checks that need more than one flag, before anything runs; fills in --threads."""
    if hasattr(args, "threads") and args.threads is None:
        args.threads = default_threads(getattr(args, "num_workers", 0))
    from .train.determinism import problem
    from .train.tracking import missing_package

    for error in (missing_package(args), problem(args)):
        if error:
            raise UsageError(error)
    video = getattr(args, "video", False)
    if hasattr(args, "data_loader") and args.data_loader is None:
        from .data.gpu import default_loader

        args.data_loader = default_loader(args.device, video)
    elif getattr(args, "data_loader", None) == "gpu" and video:
        raise UsageError("--data-loader gpu is for images: --video clips are decoded in the "
                         "DataLoader workers (use --data-loader pil)")
    if args.command == "pretrain":
        if args.online_probe and args.video:
            raise ValueError("--online-probe probes image MAEs; --video clips have no labels")
        check_mask_ratio(args)
        from .train.fsdp import check_args

        check_args(args)
    for name in ("scale", "ratio"):  # LOW HIGH ranges of the crop
        low_high = getattr(args, name, None)
        if low_high is not None and low_high[0] > low_high[1]:
            where = (f"--config {args.config}: {name}" if args.sources.get(name) == "config"
                     else f"--{name}")
            raise UsageError(f"{where} must be LOW HIGH with LOW <= HIGH, got "
                             f"{' '.join(map(str, low_high))}")


def given_on_command_line(argv, command: str) -> set[str]:
    """The flags (dests) the command line itself sets: parsed with every default suppressed."""
    parser = build_parser()
    actions = parser.commands[command]._actions
    for action in actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) & {a.dest for a in actions}


def value_sources(parser, argv, command: str, config: dict) -> dict:
    """Where each value comes from, for the recipe printout: 'flag', 'config' (--config file,
    flags and MAE config keys), 'default' (the flag's own default); flags left None are filled
    by the command (its demo or official defaults) and say so themselves."""
    sources = {a.dest: "default" for a in parser.commands[command]._actions
               if a.default is not None and a.default is not argparse.SUPPRESS}
    sources.update(dict.fromkeys([*config, *config.get("model_config", {})], "config"))
    sources.pop("model_config", None)
    sources.update(dict.fromkeys(given_on_command_line(argv, command), "flag"))
    return sources


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = {}
    if getattr(args, "config", None):
        defaults = read_config(args.config, parser, args.command)
        args = build_parser({args.command: defaults}).parse_args(argv)
    args.sources = value_sources(parser, argv, args.command, defaults)
    if getattr(args, "resume", None) == "":
        args.resume = None
    validate(args)
    return args


def main(argv=None) -> int:
    from .train.determinism import deterministic
    from .train.engine import NonFiniteLossError
    from .train.preemption import Interrupted, Preempted, StopSignals, requeue

    finished = False  # every rank ended the same work: they part in step (distributed.shutdown)
    try:
        args = parse_args(argv)
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        if args.command == "pretrain":
            from .train.pretrain import pretrain

            with StopSignals(), deterministic(args.deterministic):
                pretrain(args)
        elif args.command == "finetune":
            from .train.finetune import finetune

            with StopSignals(), deterministic(args.deterministic):
                finetune(args)
        elif args.command == "linprobe":
            from .train.linprobe import is_demo, linprobe

            # the official recipe stops at a step and saves it; the demo saves nothing
            with StopSignals() if not is_demo(args) else contextlib.nullcontext(), \
                    deterministic(args.deterministic):
                linprobe(args)
        elif args.command == "visualize":
            from .eval.visualize import visualize

            visualize(args)
        elif args.command == "export":
            from .checkpoints.files import export_safetensors, load_checkpoint
            from .checkpoints.interop import export_hf, export_timm, timm_call
            from .checkpoints.pretrained import check_saved_args

            state = load_checkpoint(args.checkpoint, trust=args.unsafe_trust_checkpoint)
            check_saved_args(state, args.checkpoint)
            if args.format == "hf":
                print(f"wrote {export_hf(state, args.output, args.checkpoint)}: "
                      f"transformers.ViTMAEForPreTraining.from_pretrained({args.output!r})")
            elif args.format == "timm":
                out, name, kwargs = export_timm(state, args.output, args.checkpoint)
                print(f"wrote {out}: {timm_call(name, kwargs, out)}")
            else:
                print(f"wrote {export_safetensors(state, args.output)}")
        elif args.command == "shards":
            from .data.shards import write_shards

            for split, pattern in write_shards(args.source, args.out, args.shard_size,
                                               args.seed).items():
                print(f"{split}: --data-path '{pattern}'")
        elif args.command == "anomaly":
            from .eval.anomaly import anomaly

            anomaly(args)
        elif args.command == "plot":
            from .eval.figures import save_curves

            print(f"wrote {save_curves(args.run_dir, args.output)}")
        else:
            from .train.ablate import ablate

            ablate(args, parse_args)
        finished = True
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as stopped:  # saved; the stop line and the exit code say so
        from .train import distributed

        finished = True
        if distributed.is_main():
            print(stopped.line(), flush=True)  # before the requeue, which signals this task
            outcome = requeue(args, stopped)
            if outcome:
                print(outcome, flush=True)
        return stopped.exit_code
    except Interrupted:
        print("error: interrupted by a second SIGINT: stopped without saving the step (the "
              "checkpoints already written are intact)", file=sys.stderr)
        return 128 + signal.SIGINT
    except (NonFiniteLossError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        from .train import distributed, tracking

        tracking.close_all()
        distributed.shutdown(synchronize=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
