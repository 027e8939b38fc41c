"""Turns pytest-benchmark JSON into benchmarks/RESULTS.md and one bar chart PNG per suite.

    pytest benchmarks/ --benchmark-json=benchmarks/results.json
    python benchmarks/report.py [benchmarks/results.json]

Several inputs are merged: pytest-benchmark JSON files, and the JSON-lines files of single cases
that MAE_BENCH_CASES=FILE writes (benchmarks/conftest.py), which hold the cases of a run
stopped before pytest-benchmark wrote its JSON; a case in both counts once.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
TIMING_KEYS = {"impl", "variant", "bytes", "cuda_median_ms", "kernel_ms", "gb_per_s", "floor_ms",
               "floor_ratio", "copy_gb_per_s", "images_per_sec", "peak_memory_gib", "launches"}


def milliseconds(bench: dict) -> float:
    """The call time: CUDA events around each call on a GPU, pytest-benchmark's timer on CPU."""
    info = bench["extra_info"]
    return info.get("cuda_median_ms", bench["stats"]["median"] * 1e3)


def kernel_milliseconds(bench: dict) -> float | None:
    """The device time of the kernels one call launches (GPU runs only)."""
    return bench["extra_info"].get("kernel_ms")


def case_label(info: dict) -> str:
    parts = []
    for key, value in info.items():
        if key in TIMING_KEYS or key == "op":
            continue
        if isinstance(value, list):
            value = "x".join(map(str, value))
        parts.append(str(value).replace("torch.", "") if key != "norm_pix_loss"
                     else ("norm" if value else "raw"))
    return " ".join(parts)


def _speedup(base: float | None, ms: float) -> str:
    return f"{base / ms:.2f}x" if base else "-"


def op_table(benches: list[dict]) -> tuple[list[str], dict]:
    """One row per (case, implementation): call time and kernel time; GB/s, x floor and the
    comparisons use the kernel time where both sides have one, else the call time."""
    by_case = defaultdict(dict)
    for b in benches:
        info = b["extra_info"]
        by_case[case_label(info)][info["impl"]] = b
    lines = ["| case | impl | call ms | kernel ms | GB/s | x floor | launches | vs eager | "
             "vs compiled |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    chart = {}
    for case, impls in by_case.items():
        for impl, b in impls.items():
            info, ms, kernel = b["extra_info"], milliseconds(b), kernel_milliseconds(b)
            gbs = f"{info['gb_per_s']:.0f}" if "gb_per_s" in info else "-"
            floor = f"{info['floor_ratio']:.2f}" if "floor_ratio" in info else "-"
            launches = f"{info['launches']:g}" if "launches" in info else "-"
            kernel_ms = f"{kernel:.3f}" if kernel is not None else "-"
            lines.append(f"| {case} | {impl} | {ms:.3f} | {kernel_ms} | {gbs} | {floor} | "
                         f"{launches} | {_versus(impls.get('reference'), b)} | "
                         f"{_versus(impls.get('compiled'), b)} |")
            chart.setdefault(case, {})[impl] = kernel if kernel is not None else ms
    return lines, chart


def _versus(base: dict | None, bench: dict) -> str:
    """base's time over bench's: kernel times where both have one, else call times."""
    if base is None:
        return "-"
    if kernel_milliseconds(base) is not None and kernel_milliseconds(bench) is not None:
        return _speedup(kernel_milliseconds(base), kernel_milliseconds(bench))
    return _speedup(milliseconds(base), milliseconds(bench))


def step_table(benches: list[dict]) -> tuple[list[str], dict]:
    lines = ["| model | variant | batch | median ms | images/s | peak GiB | vs reference eager |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = {b["extra_info"]["model"]: milliseconds(b) for b in benches
            if b["extra_info"]["variant"] == "reference"}
    chart = {}
    for b in benches:
        info, ms = b["extra_info"], milliseconds(b)
        ips = info.get("images_per_sec", info["batch"] / (ms * 1e-3))
        peak = f"{info['peak_memory_gib']:.1f}" if "peak_memory_gib" in info else "-"
        lines.append(f"| {info['model']} | {info['variant']} | {info['batch']} | {ms:.1f} | "
                     f"{ips:.0f} | {peak} | {_speedup(base.get(info['model']), ms)} |")
        chart.setdefault(info["model"], {})[info["variant"]] = ips
    return lines, chart


def loader_table(benches: list[dict]) -> tuple[list[str], dict]:
    """Images per second of one process at each stage of the input pipeline, and what a worker
    sends to the main process per image."""
    lines = ["| stage | loader | batch | images/s per process | bytes per image to the main "
             "process |", "|---|---|---:|---:|---:|"]
    chart = {}
    for b in benches:
        info = b["extra_info"]
        ips = info.get("images_per_sec")
        rate = f"{ips:.0f}" if ips else "-"
        sent = f"{info['bytes_per_image']:,}" if "bytes_per_image" in info else "-"
        lines.append(f"| {info['stage']} | {info['impl']} | {info.get('batch', 1)} | {rate} | "
                     f"{sent} |")
        chart.setdefault(info["stage"], {})[info["impl"]] = ips or 0
    return lines, chart


def pipeline_table(benches: list[dict]) -> tuple[list[str], dict]:
    """The training step fed by the real loader against the same step fed from memory
    (benchmarks/test_pipeline.py): images/s of each, their ratio, the training thread's data
    wait, and the loader alone."""
    lines = ["| loader | prefetch | model, batch, workers | images/s fed by the loader | "
             "images/s fed from memory | ratio | data wait ms/step | share of the step | "
             "loader alone images/s | training-thread syncs/epoch |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    chart = {}
    for b in benches:
        info = b["extra_info"]
        syncs = info.get("training_thread_syncs")
        lines.append(f"| {info['loader']} | {info['prefetch']} | {info['model']}, "
                     f"{info['batch']}, {info['workers']} | {info['images_per_sec']:.1f} | "
                     f"{info['memory_images_per_sec']:.1f} | {info['ratio']:.2f} | "
                     f"{info['data_wait_ms']:.2f} | {100 * info['data_wait_share']:.1f}% | "
                     f"{info['stage_images_per_sec']:.0f} | "
                     f"{'-' if info['device'] == 'cpu' or syncs is None else f'{syncs:g}'} |")
        chart[f"{info['loader']} prefetch {info['prefetch']}"] = {
            "fed by the loader": info["images_per_sec"],
            "fed from memory": info["memory_images_per_sec"]}
    return lines, chart


def generic_table(benches: list[dict]) -> tuple[list[str], dict]:
    """Any other group (a suite this script has no table for): each case's time and details."""
    lines = ["| case | median ms | details |", "|---|---:|---|"]
    chart = {}
    for b in benches:
        ms = milliseconds(b)
        lines.append(f"| {b['name']} | {ms:.3f} | {case_label(b['extra_info'])} |")
        chart[b["name"]] = {"median": ms}
    return lines, chart


def table_for(group: str, benches: list[dict]):
    """(table function, chart's y label) of a group of cases."""
    if group.startswith("pretrain step"):
        return step_table, "images/s"
    if group == "loader":
        return loader_table, "images/s"
    if group.startswith("pipeline"):
        return pipeline_table, "images/s"
    if all("impl" in b["extra_info"] for b in benches):
        return op_table, "ms (lower is better)"
    return generic_table, "ms (lower is better)"


def bar_chart(title: str, chart: dict, ylabel: str, path: Path) -> None:
    cases = list(chart)
    impls = sorted({i for c in chart.values() for i in c})
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    for k, impl in enumerate(impls):
        xs = [i + k * width for i in range(len(cases))]
        ax.bar(xs, [chart[c].get(impl, 0) for c in cases], width, label=impl)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load(paths: list[Path]) -> dict:
    """One pytest-benchmark document from JSON and JSON-lines inputs: the first machine_info,
    every case once."""
    data = {"machine_info": {}, "benchmarks": []}
    seen = set()
    for path in paths:
        if path.suffix == ".jsonl":
            cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            doc = json.loads(path.read_text())
            data["machine_info"] = data["machine_info"] or doc["machine_info"]
            data.setdefault("datetime", doc.get("datetime"))
            cases = doc["benchmarks"]
        for case in cases:
            if case["fullname"] not in seen:
                seen.add(case["fullname"])
                data["benchmarks"].append(case)
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="*", default=[HERE / "results.json"], type=Path)
    parser.add_argument("--output", default=HERE / "RESULTS.md", type=Path)
    parser.add_argument("--plots", default=HERE / "plots", type=Path)
    parser.add_argument("--no-plots", action="store_true",
                        help="tables only (the GPU run returns at most 8 files)")
    parser.add_argument("--note", action="append", default=[],
                        help="a line to print under the header (the GPU plan's build and "
                        "stages); repeatable")
    args = parser.parse_args(argv)
    data = load(args.json)
    machine = data["machine_info"]
    if not args.no_plots:
        args.plots.mkdir(parents=True, exist_ok=True)
    out = ["# Benchmark results", "",
           f"Measured on **{machine.get('device', machine.get('cpu', {}).get('brand_raw', '?'))}**"
           f" on {machine.get('date', (data.get('datetime') or '?')[:10])}: torch "
           f"{machine.get('torch')}, CUDA {machine.get('cuda')}, triton {machine.get('triton')}, "
           f"Python {machine.get('python_version')}.", "",
           "Generated by `python benchmarks/report.py` from `pytest benchmarks/ "
           "--benchmark-json=...`. GPU times rotate the inputs so that the L2 starts cold. "
           "`call ms` is the median of CUDA-event timings around each call: what the caller "
           "waits for, Python dispatch and launches included (at MAE sizes often more than "
           "the GPU work). `kernel ms` is the device time of the kernels one call launches "
           "(the profiler's, over 10 calls): what the GPU spends. GB/s, `x floor` (kernel time "
           "over the bandwidth floor: bytes that must move / measured device-to-device copy "
           "bandwidth) and the `vs` columns use the kernel time where both sides have one. "
           "CPU times are pytest-benchmark medians of wall time.", "",
           *(f"{note}  " for note in args.note), *([""] if args.note else [])]
    if not machine:
        out += ["Made from per-case lines only (a stopped run): the machine is not recorded.", ""]
    elif machine.get("cuda") is None or "CPU only" in str(machine.get("device", "")):
        out += ["This run had no GPU: the GPU cases (Triton kernels, CUDA extension, ViT-B/L "
                "training steps, bandwidth floors) were skipped, and no GPU figure is claimed "
                "here. CPU figures are pytest-benchmark medians of wall time.", ""]
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    for group, benches in groups.items():
        table, ylabel = table_for(group, benches)
        lines, chart = table(benches)
        slug = re.sub(r"[^\w.-]+", "_", group).strip("_")  # a file name: no "/" or ":"
        out += [f"## {group}", ""]
        if not args.no_plots:
            bar_chart(group, chart, ylabel, args.plots / f"{slug}.png")
            out += [f"![{group}](plots/{slug}.png)", ""]
        out += [*lines, ""]
    args.output.write_text("\n".join(out))
    print(f"wrote {args.output}" + ("" if args.no_plots else
                                    f" and {len(groups)} plots in {args.plots}"))


if __name__ == "__main__":
    main()
