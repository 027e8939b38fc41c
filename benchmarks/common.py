"""Timing and bandwidth helpers shared by the benchmark suites.

On CUDA every case is timed with CUDA events around each call, warm-up excluded, the median of
many calls, cycling through enough copies of the inputs that each call starts with a cold L2.
The bandwidth floor of a case is the bytes it must move (each input read once, each output
written once) over the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import functools
import os
import statistics

import torch

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


def kernel_launches(fn, inputs) -> int:
    """The GPU kernels one call of `fn(*inputs)` launches (after a warm-up), by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn(*inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*inputs)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


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
    """Time `fn(*inputs)`: CUDA events on a GPU (recorded in extra_info, with the kernel launch
    count), pytest-benchmark's own timer on CPU. Either way pytest-benchmark keeps the JSON."""
    benchmark.extra_info.update(info, bytes=bytes_moved)
    inputs = make_inputs()
    if not CUDA or benchmark.disabled:
        benchmark(fn, *inputs)
        return
    benchmark.extra_info["launches"] = kernel_launches(fn, inputs)
    sets = rotated(make_inputs, sum(tensor_bytes(t) for t in inputs
                                    if isinstance(t, torch.Tensor)))
    ms = cuda_median_ms(fn, sets)
    bandwidth = copy_bandwidth()
    floor_ms = bytes_moved / bandwidth * 1e3
    benchmark.extra_info.update(cuda_median_ms=ms, gb_per_s=bytes_moved / (ms * 1e-3) / 1e9,
                                floor_ms=floor_ms, floor_ratio=ms / floor_ms,
                                copy_gb_per_s=bandwidth / 1e9)

    def synced(*args):
        fn(*args)
        torch.cuda.synchronize()

    benchmark.pedantic(synced, args=sets[0], rounds=5, iterations=1, warmup_rounds=1)
