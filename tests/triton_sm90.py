"""Compiles every Triton kernel for Hopper (sm_90) ahead of time, without a GPU, exactly as the
launchers would launch it at MAE sizes, and reports the width of its global loads and stores and,
from the cubin ptxas made (cuobjdump's resource usage), its registers and stack frame per thread:
ptxas spills registers to the stack frame, and these kernels hold nothing else there.

Run with TRITON_INTERPRET unset (tests/test_triton_compile.py does): the launchers run on CPU
tensors with their kernels' `run` replaced by recorders, then each recorded launch is compiled
with the specialisations Triton's JIT makes for it on an sm_90 device: the kernel's own binder
(the function `JITFunction.run` calls) reads the arguments, so integers equal to 1 become
constants, integers divisible by 16 and pointers aligned to 16 bytes get the divisibility hint,
as on the GPU. What it cannot see: a pointer's alignment is read from the CPU tensor, whose
storage is 64-byte aligned where CUDA's caching allocator gives 512; the offsets of views are
the same on both, so the hints are too.
Prints one JSON object: {kernel: {"compiled": n, "loads": [...], "stores": [...], "resources":
[{"regs": r, "stack": bytes, "args": {integer or constexpr argument: value}}, one per launch]}},
and the resources as a table on stderr.
"""
import json
import re
import subprocess
import sys
import tempfile
import warnings

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from mae_kernels import augment, hog, loss, masking, patches, queries, reference, unshuffling

warnings.filterwarnings("ignore")
STRATEGIES = {masking.RANDOM: "random", masking.BLOCK: "block", masking.GRID: "grid",
              masking.UNITS: "units"}
TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)


class Recorder:
    """Stands in for a kernel's `run`: keeps the arguments of each launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []
        kernel.run = self

    def __call__(self, *args, grid, warmup, **kwargs):
        self.calls.append((args, kwargs))


def compile_call(kernel, args, kwargs):
    """One recorded launch compiled as `JITFunction.run` compiles it on an sm_90 device; and
    what the JIT specialised: {"constants": runtime arguments it made constants (integers
    equal to 1), "divisible": those it hinted divisible by 16 (integers, aligned pointers)}."""
    binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(BACKEND, kwargs, bound,
                                                               specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    names = [param.name for param in kernel.params]
    specialised = {
        "constants": sorted(names[path[0]] for path in constexprs
                            if not kernel.params[path[0]].is_constexpr),
        "divisible": sorted(names[path[0]] for path, attr in attrs.items() if attr),
    }
    return triton.compile(src, target=TARGET, options=options.__dict__), specialised


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame bytes) per thread of the one kernel in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage",
                                f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return int(regs), int(stack)


def run_launchers(dtype):
    """Each launcher at MAE-B sizes (the kernels only record: outputs stay uninitialised)."""
    B, L, D, P, K = 8, 196, 768, 1, 49
    x = torch.randn(B, L, D).to(dtype)
    ids_restore = torch.stack([torch.randperm(L) for _ in range(B)])
    mask = (ids_restore >= K).float()
    f32 = torch.float32
    masking._masking_triton(x, torch.rand(B, L), None, None, K, 1, 1, masking.RANDOM, 0, f32)
    order, draws = reference.block_draws(torch.rand(B, L, 5), (0.3, 1 / 0.3))
    masking._masking_triton(x, order, draws, None, K, 1, 14, masking.BLOCK, 4, f32)
    offsets = torch.zeros(B, 2, dtype=torch.int64)
    masking._masking_triton(x, None, None, offsets, K, 1, 14, masking.GRID, 2, f32)
    # VideoMAE-B: 8 temporal positions of 14x14, 90% masked
    video = torch.randn(2, 8 * L, D).to(dtype)
    masking._masking_triton(video, torch.rand(2, L), None, None, 20, 8, 1, masking.RANDOM, 0, f32)
    # CrossMAE-B: 49 kept, 49 of the 147 masked predicted; Pixio at 256px: 4x4 units of 16x16
    masking._masking_triton(x, torch.rand(B, L), None, None, K, 1, 14, masking.RANDOM, 0, f32, 49)
    pixio = torch.randn(B, 256, D).to(dtype)
    masking._masking_triton(pixio, torch.rand(B, 16), None, None, 64, 1, 16, masking.UNITS, 4,
                            f32)
    ids_pred = torch.sort(torch.stack([torch.randperm(L)[:49] for _ in range(B)]), 1).values
    queries._queries_triton(torch.randn(1, 1, 512).to(dtype), torch.randn(1, P + L, 512).to(dtype),
                            ids_pred, P)
    queries._queries_backward_triton(torch.randn(B, 49, 512).to(dtype), ids_pred, L)
    dec = torch.randn(B, P + K, 512).to(dtype)
    unshuffling._unshuffle_triton(dec, torch.randn(1, 1, 512).to(dtype), ids_restore, P,
                                  torch.randn(1, P + L, 512).to(dtype))
    unshuffling._unshuffle_backward_triton(torch.randn(B, P + L, 512).to(dtype), ids_restore, K,
                                           P, dtype)
    imgs = torch.randn(B, 3, 224, 224).to(dtype)
    pred = torch.randn(B, L, 768).to(dtype)
    frame = imgs[:, :, None]  # the ops take videos: an image is one frame
    loss._mae_loss_triton(frame, pred, mask, 1, 16, True)
    loss._mae_loss_backward_triton(torch.tensor(1.0), frame, pred, mask, 1, 16, True)
    predicted = pred[:, :49].contiguous()  # CrossMAE: the predicted rows only
    loss._mae_loss_triton(frame, predicted, torch.ones(B, 49), 1, 16, True, False, None,
                          ids_pred)
    loss._mae_loss_backward_triton(torch.tensor(1.0), frame, predicted, torch.ones(B, 49), 1, 16,
                                   True, False, None, ids_pred)
    patches._unpatchify_triton(patches._patchify_triton(frame, 1, 16), 1, 16, 1, 14, 14, 3)
    # a view one element into its storage: the JIT gives its pointer no alignment hint
    unaligned = torch.randn(frame.numel() + 1).to(dtype)[1:].view(frame.shape)
    patches._patchify_triton(unaligned, 1, 16)
    hog._hog_triton(imgs, mask, 16, 9, 8)
    # VideoMAE-B: 16 frames of 224x224 in 2x16x16 tubelets
    videos = torch.randn(2, 3, 16, 224, 224).to(dtype)
    tubes = patches._patchify_triton(videos, 2, 16)
    patches._unpatchify_triton(tubes, 2, 16, 8, 14, 14, 3)
    tube_mask = (torch.rand(2, 8 * L) > 0.9).float()
    loss._mae_loss_triton(videos, tubes, tube_mask, 2, 16, True)
    loss._mae_loss_backward_triton(torch.tensor(1.0), videos, tubes, tube_mask, 2, 16, True)
    # the input pipeline: photos of ImageNet's typical 375x500 cropped to 224, both layouts
    data, image_offsets, shapes = augment.pack([torch.zeros(3, 375, 500, dtype=torch.uint8)] * B)
    boxes = torch.tensor([[10, 20, 300, 280]] * B)
    for p in (0, 16):
        augment._resized_crop_triton(data, image_offsets, shapes, boxes,
                                     torch.zeros(B, dtype=torch.bool), 224, [0.5] * 3,
                                     [0.25] * 3, dtype, p)


def run_long_masking():
    """Each masking strategy at 32x32 and 64x64 grids (S = 1024, 4096: ViT-B/16 at 512 and 1024
    px), 75% masked: where the sort's registers run out first."""
    for side in (32, 64):
        S, K = side * side, side * side // 4
        x = torch.randn(2, S, 768).to(torch.bfloat16)
        f32 = torch.float32
        masking._masking_triton(x, torch.rand(2, S), None, None, K, 1, 1, masking.RANDOM, 0, f32)
        order, draws = reference.block_draws(torch.rand(2, S, 5), (0.3, 1 / 0.3))
        masking._masking_triton(x, order, draws, None, K, 1, side, masking.BLOCK, 4, f32)
        offsets = torch.zeros(2, 2, dtype=torch.int64)
        masking._masking_triton(x, None, None, offsets, K, 1, side, masking.GRID, 2, f32)
        masking._masking_triton(x, torch.rand(2, S // 16), None, None, K, 1, side,
                                masking.UNITS, 4, f32)


def main():
    kernels = {
        "masking": masking._masking_kernel,
        "masking_gather": masking._gather_kept_kernel,
        "unshuffle": unshuffling._unshuffle_kernel,
        "unshuffle_backward": unshuffling._unshuffle_backward_kernel,
        "loss_forward": loss._loss_forward_kernel,
        "loss_backward": loss._loss_backward_kernel,
        "patchify": patches._patch_rows_kernel,
        "hog": hog._hog_kernel,
        "resized_crop": augment._resized_crop_kernel,
        "decoder_queries": queries._queries_kernel,
        "decoder_queries_backward": queries._queries_backward_kernel,
    }
    recorders = {name: Recorder(kernel) for name, kernel in kernels.items()}
    with set_wrap_triton_enabled(False):  # launch directly, as the op's eager kernel does
        for dtype in (torch.bfloat16, torch.float32):
            run_launchers(dtype)
        run_long_masking()
    report = {}
    for name, recorder in recorders.items():
        for args, kwargs in recorder.calls:
            # one entry per masking strategy (tube is random over several frames)
            key = f"{name}_{STRATEGIES[kwargs['STRATEGY']]}" if "STRATEGY" in kwargs else name
            entry = report.setdefault(key, {"compiled": 0, "loads": set(), "stores": set(),
                                            "resources": []})
            compiled, specialised = compile_call(recorder.kernel, args, dict(kwargs))
            ptx = compiled.asm["ptx"]
            regs, stack = resources(compiled.asm["cubin"])
            sizes = {name: value for name, value in zip(recorder.kernel.arg_names, args)
                     if isinstance(value, int)} | kwargs  # kwargs: constexprs, num_warps
            entry["resources"].append({"regs": regs, "stack": stack, "args": sizes,
                                       **specialised})
            print(f"{key:20} regs {regs:3} stack {stack:4} B  {sizes}", file=sys.stderr)
            entry["compiled"] += 1
            entry["loads"] |= set(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx))
            entry["stores"] |= set(re.findall(r"st\.global(?:\.[a-z0-9]+)*", ptx))
    print(json.dumps({k: {**v, "loads": sorted(v["loads"]), "stores": sorted(v["stores"])}
                      for k, v in report.items()}))


if __name__ == "__main__":
    main()
