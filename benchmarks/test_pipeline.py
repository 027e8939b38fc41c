"""The input pipeline measured end to end: the real pre-training step (`engine.train_one_epoch`:
forward, backward, AdamW, the loss check and the log) fed by the real loader (DataLoader
workers on a folder of ImageNet-sized JPEGs cut from real photographs, made here; the loader
thread with `--prefetch` 2, or 0 for the serial baseline), against the same step fed the same
batches already on the device. Both loaders: `pil` (Pillow decodes and augments in the
workers) and `gpu` (the workers read files; nvJPEG and the fused crop in the loader thread).

Each case records, for the steady part of an epoch (every log window but the first, which
holds the workers' start):
- `images_per_sec`: loader-fed; `memory_images_per_sec`: memory-fed; `ratio` of the two
  (1.0: the loader hides behind the step entirely);
- `data_wait_ms` per step and `data_wait_share` of the step: the training thread's wait;
- `stage_images_per_sec`: the loader alone, nothing else running;
- on CUDA, `training_thread_syncs`: host synchronisations in the training thread over the
  epoch (sync debug mode "warn", counted per thread): one per log window (the loss check reads
  the loss) is the step's own; more would be the data hand-off's.

On the CPU the loader and the step compete for the same cores: the figures are what they are.
The design target: a data wait under 5% of the step whenever the stage alone is faster than
the step. GPU: ViT-B/16 at 224, B=256, bf16, 8 workers (the GPU plan's loader stage).

    pytest benchmarks/test_pipeline.py --benchmark-json=pipeline.json
"""
from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time
import warnings

import pytest
import torch

from mae.cli import default_threads
from mae.data.gpu import GpuBatches, jpeg_decoder
from mae.data.images import ImageFolderDataset, collate_skipping
from mae.data.prefetch import Prefetcher
from mae.data.shards import open_dataset
from mae.models import build_model
from mae.models.image import MODEL_CONFIGS, resolve_config
from mae.train.engine import JsonLog, make_loader, train_one_epoch
from mae.train.optim import build_optimizer

from .common import CUDA, GPU_SIZES, jpeg_set

pytestmark = pytest.mark.pipeline
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (model config, batch, steps per epoch, log window, workers, files); on the CPU a 2-block
# ViT-Tiny, so that the suite's smoke run stays short
SIZES = {"vit_b": (MODEL_CONFIGS["mae_vit_base_patch16"], 256, 40, 10, 8, 512)} if GPU_SIZES \
    else {"small": ({**MODEL_CONFIGS["mae_vit_tiny_patch16"], "encoder_layers": 2}, 16, 8, 2, 2,
                    64)}
CASES = [pytest.param(size, loader, prefetch, marks=[pytest.mark.vit_b] if size == "vit_b"
                      else [], id=f"{size}-{loader}-prefetch{prefetch}")
         for size in SIZES for loader in ("gpu", "pil") for prefetch in (2, 0)]
INPUT = 224
ROUNDS = 3  # epochs of each feed; their medians are reported


class Records:
    """A log sink that keeps the step records (JsonLog's `sinks`)."""

    def __init__(self):
        self.steps = []

    def write(self, record: dict) -> None:
        if record.get("kind") == "step":
            self.steps.append(record)

    def steady(self, key: str) -> float:
        """The mean of `key` over the log windows after the first."""
        values = [r[key] for r in self.steps[1:]]
        return sum(values) / len(values)


class Repeated(torch.utils.data.Dataset):
    """`base`'s items over and over: an epoch of `length` samples from a few hundred files."""

    def __init__(self, base, length: int):
        self.base, self.length = base, length
        self.collate = getattr(base, "collate", collate_skipping)
        self.classes = base.classes

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.base[index % len(self.base)]


class InMemory:
    """A loader of batches already on the device, as `train_one_epoch` takes a DataLoader."""
    num_workers = 0

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class TrainingThreadSyncs:
    """Counts the host synchronisations CUDA's sync debug mode reports, per thread."""

    def __enter__(self):
        self.counts = collections.Counter()
        self._show, self._filters = warnings.showwarning, list(warnings.filters)

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message).lower():
                self.counts[threading.current_thread().name] += 1
            else:
                self._show(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always")
        if CUDA:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        warnings.filters[:] = self._filters


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    files = next(iter(SIZES.values()))[-1]
    return jpeg_set(tmp_path_factory.mktemp("pipeline"), files)


def run_args(size: str, prefetch: int, loader: str):
    model, batch, steps, window, workers, _ = SIZES[size]
    return argparse.Namespace(
        batch_size=batch, num_workers=workers, prefetch=prefetch, data_loader=loader,
        amp="bf16" if CUDA else "none", accum_iter=1, clip_grad=None, min_lr=0.0,
        warmup_epochs=1, epochs=100, log_every=window, quiet=True, world_size=1,
        output_dir=None, data_path="(the benchmark's JPEGs)", seed=0, steps=steps,
        model=model)


def epoch(model, optimizer, loader, args, prepare=None) -> Records:
    """One epoch of the real training loop; its step records."""
    records = Records()
    train_one_epoch(model, loader, optimizer, _scaler(), DEVICE, 1, args,
                    JsonLog(None, [records]), 1e-4, lambda m, imgs, _: m(imgs, 0.75).loss,
                    prepare=prepare, saves=model)
    return records


def _scaler():
    return torch.amp.GradScaler(DEVICE.type, enabled=False)


@pytest.fixture
def run_threads():
    """torch's threads as `mae` sets them (--threads' default: the cores less the workers),
    for both feeds; the suite's own count afterwards."""
    before = torch.get_num_threads()
    yield lambda workers: torch.set_num_threads(default_threads(workers))
    torch.set_num_threads(before)


@pytest.mark.parametrize("size, loader, prefetch", CASES)
def test_pipeline_step(benchmark, jpeg_folder, run_threads, size, loader, prefetch):
    args = run_args(size, prefetch, loader)
    run_threads(args.num_workers)
    torch.manual_seed(0)
    config = resolve_config({**args.model, "img_size": INPUT})
    model = build_model(config).to(DEVICE)
    optimizer = build_optimizer(model, 1e-4, 0.05)
    length = args.batch_size * args.steps
    if loader == "gpu":
        dataset = Repeated(open_dataset(str(jpeg_folder), INPUT, "train", True, loader="gpu",
                                        ship_jpegs=jpeg_decoder(DEVICE) is not None), length)
        prepare = GpuBatches(INPUT, DEVICE, seed=0)
    else:
        dataset = Repeated(ImageFolderDataset(jpeg_folder, INPUT, train=True), length)
        prepare = None
    _, data = make_loader(dataset, args, 0, 1, DEVICE)

    # the loader alone: every batch made ready on the device, kept for the memory-fed epoch
    start = time.perf_counter()
    with Prefetcher(data, DEVICE, prepare, depth=max(prefetch, 1)) as batches:
        kept = [next(batches)]
        first = time.perf_counter()
        kept += list(batches)
    if CUDA:
        torch.cuda.synchronize()
    stage = (len(kept) - 1) * args.batch_size / (time.perf_counter() - first)
    assert sum(b.images.shape[0] for b in kept) == length, "a file did not decode"

    benchmark.group = f"pipeline {size}"
    rounds = 1 if benchmark.disabled else ROUNDS
    epoch(model, optimizer, InMemory(kept), args)  # the allocator's and kernels' warm-up
    memory = [epoch(model, optimizer, InMemory(kept), args) for _ in range(rounds)]
    del kept
    fed = []
    with TrainingThreadSyncs() as syncs:
        benchmark.pedantic(lambda: fed.append(epoch(model, optimizer, data, args, prepare)),
                           rounds=rounds, iterations=1)
    fast, slow = median_steady(fed, "images_per_sec"), median_steady(memory, "images_per_sec")
    wait = median_steady(fed, "data_wait_ms")
    benchmark.extra_info.update(
        op="pipeline", loader=loader, prefetch=prefetch, batch=args.batch_size,
        model=f"{config['encoder_layers']} x {config['encoder_dim']} encoder",
        workers=args.num_workers, steps=args.steps, rounds=rounds, device=str(DEVICE),
        images_per_sec=fast, memory_images_per_sec=slow, ratio=fast / slow,
        data_wait_ms=wait, data_wait_share=wait / (1000 * args.batch_size / fast),
        stage_images_per_sec=stage, first_batch_seconds=first - start,
        training_thread_syncs=syncs.counts["MainThread"] / rounds,
        loader_thread_syncs=syncs.counts["mae-loader"] / rounds)
    assert all(len(r.steps) == args.steps // args.log_every for r in fed + memory)


def median_steady(runs: list[Records], key: str) -> float:
    """The median over the epochs of their steady `key` (the windows after the first)."""
    return statistics.median(r.steady(key) for r in runs)
