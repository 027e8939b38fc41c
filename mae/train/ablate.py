"""`mae ablate`: the MAE paper's ablations (mask ratio, Figure 5; decoder depth, Table 1a; mask
sampling, Table 1f) in miniature on the built-in data: one short pre-training per setting, each
probed linearly on the held-out split. Writes `ablation.md` (tables shaped like the paper's),
`ablation.json` and `ablation.png` (linear-probe top-1 and wall time per setting). One axis
varies at a time around the demo's default (mask ratio 0.75, the demo model's decoder depth,
random sampling), as in the paper."""
from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..models.image import MASK_TYPES, MODEL_CONFIGS  # noqa: E402
from .pretrain import DEMO_DEFAULTS  # noqa: E402

BASE = {"mask_ratio": 0.75, "mask_type": "random",
        "decoder_depth": MODEL_CONFIGS[DEMO_DEFAULTS["model"]]["decoder_layers"]}
AXES = (("mask ratio", "mask_ratio"), ("decoder depth", "decoder_depth"),
        ("mask sampling", "mask_type"))


def parse_list(text: str, kind, flag: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{flag} must be a comma-separated list, got {text!r}") from None


def settings(values: dict[str, list]) -> list[dict]:
    """Each run's setting: BASE with one key changed; the base setting runs once for all axes."""
    unique = []
    for key, options in values.items():
        for value in options:
            run = {**BASE, key: value}
            if run not in unique:
                unique.append(run)
    return unique


def run_setting(setting: dict, args, out: Path, parse_args) -> dict:
    """Pre-trains and probes one setting; `parse_args` is the CLI's, so that each run gets
    exactly the defaults the documented commands get."""
    from .linprobe import linprobe
    from .pretrain import pretrain

    common = ["--device", args.device] + ["--quiet"] * args.quiet
    start = time.perf_counter()
    summary = pretrain(parse_args([
        "pretrain", *common, "--num-workers", str(args.num_workers), "--norm-pix-loss",
        "--epochs", str(args.epochs),
        "--dataset-size", str(args.dataset_size), "--mask-ratio", str(setting["mask_ratio"]),
        "--decoder-depth", str(setting["decoder_depth"]), "--mask-type", setting["mask_type"],
        "--output-dir", str(out)]))
    pretrain_seconds = time.perf_counter() - start
    probe = linprobe(parse_args([
        "linprobe", *common, "--checkpoint", str(out / "checkpoint-last.pth"),
        "--epochs", str(args.probe_epochs), "--train-size", str(args.dataset_size),
        "--val-size", str(args.probe_val_size)]))
    return {**setting, "linprobe_top1": probe["top1"],
            "final_loss": summary["epochs"][-1]["loss"], "pretrain_seconds": pretrain_seconds,
            "total_seconds": time.perf_counter() - start}


def tables(results: list[dict]):
    """(axis name, key, rows) for each axis that varies: numbers sorted, names in run order."""
    for name, key in AXES:
        rows = [r for r in results if all(r[k] == v for k, v in BASE.items() if k != key)]
        if not isinstance(BASE[key], str):
            rows.sort(key=lambda r: r[key])
        if len(rows) > 1:
            yield name, key, rows


def write_markdown(results: list[dict], path: Path, header: str) -> None:
    lines = [header, ""]
    for name, key, rows in tables(results):
        lines += [f"| {name} | linear probe top-1 (%) | final loss | pre-train + probe (s) |",
                  "|---|---|---|---|"]
        lines += [f"| {r[key]} | {r['linprobe_top1']:.1f} | {r['final_loss']:.3f} | "
                  f"{r['total_seconds']:.0f} |" for r in rows]
        lines.append("")
    path.write_text("\n".join(lines))


def plot(results: list[dict], path: Path) -> None:
    panels = list(tables(results))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 3.6),
                             squeeze=False)
    for ax, (name, key, rows) in zip(axes[0], panels):
        xs = [str(r[key]) for r in rows]
        ax.plot(xs, [r["linprobe_top1"] for r in rows], "o-", color="tab:blue")
        ax.set_xlabel(name)
        ax.set_ylabel("linear probe top-1 (%)", color="tab:blue")
        time_ax = ax.twinx()
        time_ax.bar(xs, [r["total_seconds"] for r in rows], alpha=0.2, color="tab:gray")
        time_ax.set_ylabel("wall time (s)", color="tab:gray")
        ax.set_zorder(time_ax.get_zorder() + 1)
        ax.patch.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablate(args, parse_args) -> list[dict]:
    values = {"mask_ratio": parse_list(args.mask_ratios, float, "mask-ratios"),
              "decoder_depth": parse_list(args.decoder_depths, int, "decoder-depths"),
              "mask_type": parse_list(args.mask_types, str, "mask-types")}
    unknown = set(values["mask_type"]) - set(MASK_TYPES)
    if unknown:
        raise ValueError(f"--mask-types must be among {MASK_TYPES}, got {sorted(unknown)}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    for setting in settings(values):
        name = (f"ratio{setting['mask_ratio']:g}-depth{setting['decoder_depth']}-"
                f"{setting['mask_type']}")
        results.append(run_setting(setting, args, out / name, parse_args))
        print(json.dumps(results[-1]))
        (out / "ablation.json").write_text(json.dumps(results, indent=1))
    header = (f"Built-in data, `{DEMO_DEFAULTS['model']}` at {DEMO_DEFAULTS['input_size']}px, "
              f"patch {DEMO_DEFAULTS['patch_size']}, norm-pix loss; {args.epochs} pre-training "
              f"epochs of {args.dataset_size} images per setting, linear probe {args.probe_epochs}"
              f" epochs; {len(results)} runs, {time.perf_counter() - start:.0f} s in all on "
              f"{args.device}.")
    write_markdown(results, out / "ablation.md", header)
    plot(results, out / "ablation.png")
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.png'}")
    return results
