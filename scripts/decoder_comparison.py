"""The learning comparison of docs/decoders.md: MAE, CrossMAE (25% of the patches predicted) and
a Pixio-shaped model on the built-in data at the demo's size (ViT-Tiny encoder, 32 px, patch 8),
same epochs, data and seeds; each encoder's linear probe (the demo's, cls token and mean-pooled
patches) against a randomly initialised encoder of the same shape, and the decoder's FLOPs.

    python3 scripts/decoder_comparison.py --out runs/decoders --seeds 0 1 2    # the full run
    python3 scripts/decoder_comparison.py --out /tmp/dec --seeds 0 --epochs 10 --dataset-size 1024

Writes OUT/results.json and prints a markdown table. Wall times are printed per run; CPU figures
from a shared machine are not comparable (docs/decoders.md uses FLOPs for the saving).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae.cli import main, parse_args  # noqa: E402
from mae.train.linprobe import linprobe  # noqa: E402

# every family: the demo's ViT-Tiny encoder, 32 px, patch 8, norm-pix targets, the same lr
DEMO = ["--input-size", "32", "--patch-size", "8", "--blr", "5e-3", "--warmup-epochs", "1",
        "--norm-pix-loss", "--mask-ratio", "0.75"]
FAMILIES = {
    "mae": ["--model", "mae_vit_tiny_patch16"],
    # CrossMAE's recipe on the demo's decoder (128 wide, 2 blocks): 25% of the patches predicted,
    # weighted feature maps of every block and the input, its lr scaling
    "crossmae": ["--model", "crossmae_vit_tiny_patch16"],
    # the same at MAE's lr: the recipe's factor predict_ratio / mask_ratio (1/3) off
    "crossmae_mae_lr": ["--model", "crossmae_vit_tiny_patch16", "--no-lr-scale"],
    # Pixio's shape: 8 cls tokens, learned positions, masking units of 2x2 patches (4x4 would
    # leave one unit on the demo's 4x4 grid), a decoder as deep as the encoder (12 blocks)
    "pixio": ["--model", "pixio_vit_tiny_patch16", "--mask-grid", "2", "--drop-path", "0"],
}


def probe(checkpoint: Path, global_pool: bool, random_init: bool, args) -> float:
    argv = ["linprobe", "--checkpoint", str(checkpoint), "--epochs", str(args.probe_epochs),
            "--train-size", str(args.probe_size), "--val-size", "1000", "--quiet",
            "--device", "cpu", "--threads", str(args.threads)]
    argv += ["--global-pool"] * global_pool + ["--random-init"] * random_init
    return linprobe(parse_args(argv))["top1"]


def run(family: str, seed: int, args) -> dict:
    out = args.out / f"{family}-seed{seed}"
    start = time.perf_counter()
    argv = ["pretrain", *DEMO, *FAMILIES[family], "--epochs", str(args.epochs), "--seed",
            str(seed), "--dataset-size", str(args.dataset_size), "--num-workers", "1",
            "--threads", str(args.threads), "--quiet", "--device", "cpu", "--output-dir",
            str(out)]
    if main(argv) != 0:
        raise SystemExit(f"pretraining {family} (seed {seed}) failed")
    seconds = time.perf_counter() - start
    checkpoint = out / f"checkpoint-{args.epochs - 1}.pth"
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")
              if json.loads(line).get("kind") == "epoch"]
    result = {"family": family, "seed": seed, "pretrain_seconds": seconds,
              "first_loss": losses[0], "last_loss": losses[-1]}
    for pool in (False, True):
        name = "patch_mean" if pool else "cls"
        result[f"probe_{name}"] = probe(checkpoint, pool, False, args)
        result[f"random_{name}"] = probe(checkpoint, pool, True, args)
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    rows = ["| model | seeds | probe top-1, cls (random init) | probe top-1, mean-pooled (random "
            "init) | loss first -> last |", "|---|---|---|---|---|"]
    for family in FAMILIES:
        runs = [r for r in results if r["family"] == family]
        if not runs:
            continue

        def mean(key, runs=runs):
            return sum(r[key] for r in runs) / len(runs)

        rows.append(f"| {family} | {len(runs)} | {mean('probe_cls'):.1f} "
                    f"({mean('random_cls'):.1f}) | {mean('probe_patch_mean'):.1f} "
                    f"({mean('random_patch_mean'):.1f}) | {mean('first_loss'):.3f} -> "
                    f"{mean('last_loss'):.3f} |")
    return "\n".join(rows)


def main_cli(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--epochs", type=int, default=40, help="the demo's 40")
    parser.add_argument("--dataset-size", type=int, default=4096, help="the demo's 4096")
    parser.add_argument("--probe-epochs", type=int, default=60)
    parser.add_argument("--probe-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    results = [run(family, seed, args) for seed in args.seeds for family in args.families]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    main_cli()
