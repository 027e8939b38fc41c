"""Timing and bandwidth helpers shared by the benchmark suites.

On CUDA every case has two times, both cycling through enough copies of the inputs that each
call starts with a cold L2, warm-up excluded:
- call time: CUDA events around each call, the median of many calls. At MAE sizes an op's GPU
  work is 10-25 us while its Python dispatch, checks and launches cost 50-100 us, so this is
  what a caller waits for, and often measures the host;
- kernel time: the device time of the kernels (and copies) one call launches, from the
  profiler's record of several calls: what the GPU spends, which the bandwidth floor and the
  comparisons between implementations use.
The bandwidth floor of a case is the bytes it must move (each input read once, each output
written once) over the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import functools
import math
import os
import random
import statistics

import pytest
import torch
from PIL import Image

CUDA = torch.cuda.is_available()
# The GPU's cases (MAE sizes) are parametrized on a GPU, or anywhere with MAE_BENCH_SIZES=gpu: the
# GPU plan's dry run (scripts/gpu_plan.py) counts them on a CPU machine, collecting only.
GPU_SIZES = CUDA or os.environ.get("MAE_BENCH_SIZES") == "gpu"
L2_FLUSH_BYTES = 256 * 2**20  # well above the 50 MiB L2 of an H100


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@functools.cache
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured once per run."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), rotations=None)
    return 2 * src.numel() / (ms * 1e-3)


def cuda_median_ms(fn, rotations: list | None, warmup: int = 10, reps: int = 100) -> float:
    """Median milliseconds of `fn(*rotations[i % n])` (or `fn()`), one CUDA-event pair per call."""
    args = rotations or [()]
    for i in range(warmup):
        fn(*args[i % len(args)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(*args[i % len(args)])
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def rotated(make_inputs, bytes_per_set: int) -> list:
    """Enough independent input sets that cycling through them defeats the L2 cache."""
    copies = max(2, -(-2 * L2_FLUSH_BYTES // max(bytes_per_set, 1)))
    return [make_inputs() for _ in range(min(copies, 64))]


def kernel_profile(fn, rotations: list, calls: int = 10) -> tuple[float, float]:
    """(device activities launched per call, their device milliseconds per call) of
    `fn(*rotations[i % n])` over `calls` calls, by the profiler (CUPTI's timestamps of each
    kernel, memset and copy), after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    fn(*rotations[0])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(*rotations[i % len(rotations)])
        torch.cuda.synchronize()
    device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(device) / calls, sum(e.time_range.elapsed_us() for e in device) / calls / 1e3


class Compiled:
    """`torch.compile(fn, **options)` for one benchmark case, checked to have compiled.

    Every case compiles the same reference function: past `recompile_limit` (8) variants of one
    code object dynamo gives up and runs it eagerly, silently, so dynamo starts from a clean
    state here, and each call asserts that the backend compiled a graph for this case.
    """

    def __init__(self, fn, backend: str = "inductor", **options):
        torch._dynamo.reset()
        self.graphs = 0
        self._backend = torch._dynamo.lookup_backend(backend)
        self._fn = torch.compile(fn, backend=self._record, **options)

    def _record(self, graph, example_inputs):
        self.graphs += 1
        return self._backend(graph, example_inputs)

    def __call__(self, *args, **kwargs):
        out = self._fn(*args, **kwargs)
        assert self.graphs, "torch.compile compiled no graph: this case ran eagerly"
        return out


def run_case(benchmark, fn, make_inputs, bytes_moved: int, **info):
    """Time `fn(*inputs)`: on a GPU its call time and kernel time (recorded in extra_info, with
    the launch count and the floor), pytest-benchmark's own timer on CPU. Either way
    pytest-benchmark keeps the JSON."""
    benchmark.extra_info.update(info, bytes=bytes_moved)
    inputs = make_inputs()
    if not CUDA or benchmark.disabled:
        benchmark(fn, *inputs)
        return
    sets = rotated(make_inputs, sum(tensor_bytes(t) for t in inputs
                                    if isinstance(t, torch.Tensor)))
    ms = cuda_median_ms(fn, sets)
    launches, kernel_ms = kernel_profile(fn, sets)
    assert kernel_ms > 0, "the profiler recorded no GPU work for this case"
    bandwidth = copy_bandwidth()
    floor_ms = bytes_moved / bandwidth * 1e3
    benchmark.extra_info.update(cuda_median_ms=ms, kernel_ms=kernel_ms, launches=launches,
                                gb_per_s=bytes_moved / (kernel_ms * 1e-3) / 1e9,
                                floor_ms=floor_ms, floor_ratio=kernel_ms / floor_ms,
                                copy_gb_per_s=bandwidth / 1e9)

    def synced(*args):
        fn(*args)
        torch.cuda.synchronize()

    benchmark.pedantic(synced, args=sets[0], rounds=5, iterations=1, warmup_rounds=1)


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "stereo_motorcycle")


def _photographs() -> list[Image.Image]:
    """scikit-image's bundled photographs (the test extra has it); where it is not installed
    (the GPU image), matplotlib's Grace Hopper portrait."""
    try:
        import skimage.data
    except ImportError:
        try:
            from matplotlib import cbook
        except ImportError:
            pytest.skip("no bundled photographs: needs scikit-image or matplotlib")
        with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as img:
            return [img.convert("RGB")]
    photos = []
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # a stereo pair
        photos.append(Image.fromarray(pixels).convert("RGB"))
    return photos


def jpeg_set(root, count: int):
    """root/train/photos/: `count` ImageNet-sized JPEGs (500x375, a quarter in portrait, quality
    90), random windows of real photographs (scikit-image's, or matplotlib's Grace Hopper where
    scikit-image is not installed), those smaller than a window first enlarged (bicubic).
    Returns root."""
    folder = root / "train" / "photos"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    photos = _photographs()
    for i in range(count):
        photo = photos[i % len(photos)]
        W, H = (500, 375) if i % 4 else (375, 500)  # a quarter in portrait, as in ImageNet
        grow = max(W / photo.width, H / photo.height, 1.0)
        if grow > 1:
            photo = photo.resize((math.ceil(photo.width * grow), math.ceil(photo.height * grow)),
                                 Image.BICUBIC)
        left, top = rng.randint(0, photo.width - W), rng.randint(0, photo.height - H)
        photo.crop((left, top, left + W, top + H)).save(folder / f"{i:04d}.jpg", quality=90)
    return root
